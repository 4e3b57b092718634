"""Take a patch's own change back out of a file the user has edited since."""
from __future__ import annotations

import difflib
import re

_LINE = re.compile(r"(?<=\n)")


def lines(text: str) -> list[str]:
    """Split on '\\n' only, keeping endings, so CRLF and odd characters survive the round trip."""
    return [part for part in _LINE.split(text) if part]


def unified(a: str, b: str, name: str, a_label: str = "a/", b_label: str = "b/") -> str:
    return "".join(difflib.unified_diff(lines(a), lines(b), a_label + name, b_label + name))


def three_way(base: str, ours: str, theirs: str) -> str | None:
    """Apply the change base->theirs onto ours; None where it touches lines ours changed."""
    base_l, ours_l, theirs_l = lines(base), lines(ours), lines(theirs)
    where = _unchanged(base_l, ours_l)
    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base_l, theirs_l, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        span = _ours_span(where, i1, i2, len(base_l), len(ours_l))
        if span is None:
            return None
        edits.append((span, theirs_l[j1:j2]))
    for (start, end), replacement in reversed(edits):
        ours_l[start:end] = replacement
    return "".join(ours_l)


def _unchanged(base: list[str], ours: list[str]) -> dict[int, int]:
    """Map each base line that ours kept untouched to its index in ours."""
    mapping: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, base, ours, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            mapping[block.a + k] = block.b + k
    return mapping


def _ours_span(where: dict[int, int], i1: int, i2: int, n_base: int, n_ours: int) -> tuple[int, int] | None:
    """Where base[i1:i2] and the lines around it stand, untouched and contiguous, in ours."""
    first, last = max(i1 - 1, 0), min(i2 + 1, n_base)
    mapped = [where.get(k) for k in range(first, last)]
    if any(v is None for v in mapped) or any(b - a != 1 for a, b in zip(mapped, mapped[1:])):
        return None
    start = where[i1] if i1 in where else (where[i1 - 1] + 1 if i1 > 0 else 0)
    if i1 == n_base:
        start = where[i1 - 1] + 1 if i1 > 0 else n_ours
    return start, start + (i2 - i1)
