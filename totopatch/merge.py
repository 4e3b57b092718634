"""Take a patch's own change back out of a file the user has edited since: a three-way merge (diff3).

The lines of the three texts are aligned where all three agree; in between, a stretch one side left as it
was takes the other side's; where both sides changed the same or neighbouring lines (a comment added to
a patched line, an edit of the blank line beside it), edits that only touch are combined, by line and
then by character.  Anything else is a conflict.  The caller proves every merge by re-applying the patch
(``plan_revert``).
"""
from __future__ import annotations

import difflib
import re
from typing import Iterator, Sequence

# diff3 over difflib, not the merge3 package: merge3 is GPL-2.0-or-later and totopatch is Apache-2.0.
_LINE = re.compile(r"(?<=\n)")
_PIECE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # a line with its CRLF, lone CR or LF, as Python reads it


def lines(text: str) -> list[str]:
    """Split on '\\n' only, keeping endings, so CRLF and odd characters survive the round trip."""
    return [part for part in _LINE.split(text) if part]


def unified(a: str, b: str, name: str, a_label: str = "a/", b_label: str = "b/") -> str:
    return "".join(difflib.unified_diff(lines(a), lines(b), a_label + name, b_label + name))


def three_way(base: str, ours: str, theirs: str) -> str | None:
    """Apply the change base->theirs onto ours, keeping every change ours made; None where both changed one text.

    Joining the pieces gives each side back exactly, so no byte (CR, CRLF, form feed, tab) is lost on the way.
    """
    out: list[str] = []
    for old, mine, new in _chunks(_pieces(base), _pieces(ours), _pieces(theirs)):
        if mine == new or new == old:  # unchanged, changed alike, or changed by ours only
            out.extend(mine)
        elif mine == old:
            out.extend(new)
        elif (combined := _touching("".join(old), "".join(mine), "".join(new))) is not None:
            out.append(combined)
        else:
            return None
    return "".join(out)


def _pieces(text: str) -> list[str]:
    """Lines with their endings: CRLF, a lone CR or LF (a CR-only file has as many lines as Python sees)."""
    return _PIECE.findall(text)


Chunk = tuple[Sequence[str], Sequence[str], Sequence[str]]  # the same stretch of base, ours and theirs


def _chunks(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> Iterator[Chunk]:
    """The three texts cut into stretches, alternately ones all three share and ones between them (diff3)."""
    at = (0, 0, 0)
    for z, a, b, n in _shared(base, ours, theirs):
        if (z, a, b) != at:
            yield base[at[0]:z], ours[at[1]:a], theirs[at[2]:b]
        if n:
            yield (base[z:z + n],) * 3
        at = (z + n, a + n, b + n)


def _shared(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """(base, ours, theirs start, length) of the runs of base that both sides kept, in order, and an empty one
    at the three ends: the overlaps of base's matches with ours and with theirs."""
    mine, new = _matching_blocks(base, ours), _matching_blocks(base, theirs)
    out: list[tuple[int, int, int, int]] = []
    i = j = 0
    while i < len(mine) and j < len(new):
        (z1, a, n1), (z2, b, n2) = mine[i], new[j]
        low, high = max(z1, z2), min(z1 + n1, z2 + n2)
        if low < high:
            out.append((low, a + low - z1, b + low - z2, high - low))
        if z1 + n1 < z2 + n2:
            i += 1
        else:
            j += 1
    return out + [(len(base), len(ours), len(theirs), 0)]


def _matching_blocks(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int, int]]:
    """difflib's matching blocks of ``a`` and ``b`` (no empty ones), on what lies between the common head and tail.

    The lines both share at the start and end are matched first; difflib then matches what is between,
    with its heuristic that lines found everywhere (blank lines, brackets) only extend a match: a
    4,300-line script merges in tens of milliseconds.  A poor match there costs a conflict: the caller
    accepts a merge only where re-applying the patch to it gives the user's file back.
    """
    most = min(len(a), len(b))
    head = _common(a, b)
    tail = next((k for k in range(most - head) if a[len(a) - 1 - k] != b[len(b) - 1 - k]), most - head)
    inner = difflib.SequenceMatcher(None, a[head:len(a) - tail], b[head:len(b) - tail]).get_matching_blocks()
    blocks = [(0, 0, head)] + [(i + head, j + head, k) for i, j, k in inner] + [(len(a) - tail, len(b) - tail, tail)]
    out: list[tuple[int, int, int]] = []
    for i, j, k in blocks:
        if k and out and out[-1][0] + out[-1][2] == i and out[-1][1] + out[-1][2] == j:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + k)
        elif k:
            out.append((i, j, k))
    return out


# The longest stretch whose edits are combined by character: a few lines, as a comment typed on a patched line
# needs.  difflib's cost grows as the product of the two sides' lengths (10,000 characters took seconds, a
# patch's whole block minutes), so a longer stretch is combined by line only, and is otherwise a conflict.
CHARACTERS = 2_000


def _touching(base: str, ours: str, theirs: str) -> str | None:
    """Both sides changed the same or neighbouring lines: combine their edits where none overlaps.

    Edits that only touch combine: a line added right after a line the patch changed, a comment typed at
    the end of it, a line ending changed beside it.  An insertion at the edge of the other side's edit
    goes on its outer side.  Lines are tried first, then characters (in a stretch of at most ``CHARACTERS``
    on each side); an edit within a run of equal items (a blank line added beside the patch's blank lines)
    may sit anywhere in that run, so it is tried at both ends.  Edits that overlap however they are placed
    are a conflict.
    """
    short = max(len(base), len(ours), len(theirs)) <= CHARACTERS
    for split in (_pieces, list) if short else (_pieces,):
        pieces = split(base), split(ours), split(theirs)
        for ours_left, theirs_left in ((True, True), (False, False), (True, False), (False, True)):
            edits = _edits(pieces[0], pieces[1], ours_left) + _edits(pieces[0], pieces[2], theirs_left)
            combined = _combine(pieces[0], edits)
            if combined is not None:
                return combined
    return None


Edit = tuple[int, int, tuple[str, ...]]  # (start, end, replacement) in the base's positions


def _combine(base: Sequence[str], edits: list[Edit]) -> str | None:
    """``base`` with every edit made; None where two overlap or two different insertions share a place."""
    out: list[str] = []
    at, last = 0, (-1, -1)
    for start, end, text in sorted(set(edits)):
        if start < at or (start == end and last == (start, end)):
            return None
        out += [*base[at:start], *text]
        at, last = end, (start, end)
    return "".join(out) + "".join(base[at:])


def _edits(base: Sequence[str], other: Sequence[str], left: bool) -> list[Edit]:
    """The edits that turn ``base`` into ``other``.

    Only what differs goes to difflib: the common head and tail are cut first, the tail first where
    ``left`` (an edit in a run of equal items then sits at the run's start), else the head first.
    """
    if left:
        tail = _common(base[::-1], other[::-1])
        head = _common(base[:len(base) - tail], other[:len(other) - tail])
    else:
        head = _common(base, other)
        tail = _common(base[head:][::-1], other[head:][::-1])
    a, b = base[head:len(base) - tail], other[head:len(other) - tail]
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return [(head + i1, head + i2, tuple(b[j1:j2])) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def _common(a: Sequence[str], b: Sequence[str]) -> int:
    """How many items ``a`` and ``b`` share at their start."""
    most = min(len(a), len(b))
    return next((k for k in range(most) if a[k] != b[k]), most)
