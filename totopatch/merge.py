"""Take a patch's own change back out of a file the user has edited since: a three-way merge (merge3).

Lines are merged first; where both sides changed the same lines (a comment added to a patched line, an edit
of the blank line beside it), those lines are merged character by character, and where both changed the
same characters, text the user only added before or after the patch's change is kept around it.  Anything
else is a conflict.  The caller proves every merge by re-applying the patch (``plan_revert``).
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Sequence

from merge3 import Merge3

_LINE = re.compile(r"(?<=\n)")
_ANY_BREAK = re.compile(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)")  # after CRLF, a lone CR or LF: what Python reads as a line


def lines(text: str) -> list[str]:
    """Split on '\\n' only, keeping endings, so CRLF and odd characters survive the round trip."""
    return [part for part in _LINE.split(text) if part]


def unified(a: str, b: str, name: str, a_label: str = "a/", b_label: str = "b/") -> str:
    return "".join(difflib.unified_diff(lines(a), lines(b), a_label + name, b_label + name))


def three_way(base: str, ours: str, theirs: str) -> str | None:
    """Apply the change base->theirs onto ours, keeping every change ours made; None where both changed one text.

    Joining the pieces gives each side back exactly, so no byte (CR, CRLF, form feed, tab) is lost on the way.
    """
    return _merge(_pieces(base), _pieces(ours), _pieces(theirs), _by_character)


def _pieces(text: str) -> list[str]:
    """Lines with their endings: CRLF, a lone CR or LF (a CR-only file has as many lines as Python sees)."""
    return [part for part in _ANY_BREAK.split(text) if part]


class _Matcher(difflib.SequenceMatcher):  # type: ignore[type-arg]
    """difflib's matcher without its junk heuristic, which drops blank lines and brackets in long files."""

    def __init__(self, isjunk: object = None, a: Sequence[str] = "", b: Sequence[str] = "",
                 autojunk: bool = False) -> None:
        super().__init__(None, a, b, autojunk=False)


Resolve = Callable[[str, str, str], "str | None"]


def _merge(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str], on_conflict: Resolve) -> str | None:
    out: list[str] = []
    merger: Merge3[str] = Merge3(base, ours, theirs, sequence_matcher=_Matcher)  # type: ignore[arg-type]
    for group in merger.merge_groups():
        if group[0] == "conflict":
            resolved = on_conflict("".join(group[1]), "".join(group[2]), "".join(group[3]))
            if resolved is None:
                return None
            out.append(resolved)
        else:
            out.extend(group[1])
    return "".join(out)


def _by_character(base: str, ours: str, theirs: str) -> str | None:
    """Both sides changed the same lines: merge those lines character by character."""
    return _merge(base, ours, theirs, _around)


def _around(base: str, ours: str, theirs: str) -> str | None:
    """Both changed the same characters: keep what ours only added before or after them, around theirs."""
    if base and ours.count(base) == 1:
        before, after = ours.split(base)
        return before + theirs + after
    return None
