"""Whitespace and line-ending variants Python accepts, put into a source, and what a patch must make of them.

A ``Plan`` edits some lines of a source: bytes before its indentation that end in a form feed (Python
resets the column there), whitespace before its line ending, its line ending, one space between two
tokens, and whole lines of whitespace inserted before it.  Applied to the source it gives the variant
the patch reads; applied to the patch's own output on the plain source (its lines matched to the
source's) it gives what the patch must write for the variant: every byte outside the change as in the
variant, the changed lines with the variant's indentation bytes and line endings, the added lines in the
file's line ending.
"""
from __future__ import annotations

import codecs
import difflib
import functools
import io
import tokenize
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from conftest import SAMPLE_BACKTEST, installed_toto_package
from realistic_backtest import realistic_script
from totopatch.layout import TARGETS
from totopatch.patches import beneath, by_id
from totopatch.patches._cst import split_lines
from totopatch.spec import PatchRef, Refusal
from totopatch.textio import decode, syntax_error

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
RELEASES = ("0.1.3", "0.1.4", "0.2.0")
# each Toto target's path inside the toto package, from the layout every command uses
FILES = {key: spec.path.removeprefix("toto/") for key, spec in TARGETS.items()
         if spec.base == "toto" and not spec.optional}

PREFIXES = ("\f", " \f", "\t\f", "    \f", "\f\f")  # before the indentation: the column restarts after a form feed
TRAILING = (" ", "\t", "\f", " \f\t ")
ENDINGS = ("\n", "\r", "\r\n")
GAPS = ("\t", "\f", " \f ", "  ", "\t ")  # in place of one space between two tokens
BLANKS = ("\n", "\r", "\r\n", "\f\n", "  \t\n", " \f \r\n", "\t\r")
COOKIE = ("# -*- coding: latin-1 -*-\n", "# caf\xe9: a byte that only the cookie decodes\n")
WHOLE = ("as-is", "cr-only", "crlf", "mixed", "bom", "cookie", "no-final-newline", "crlf-bom-no-final-newline",
         "tabs")
LIBCST_BLOCKS = {"kv-cache", "shared-prefill"}  # patches whose added lines take the file's indentation


@dataclass(frozen=True)
class Edit:
    """What one line of the source gets."""

    prefix: str = ""
    trailing: str = ""
    ending: str | None = None  # None: the line's own
    gap: tuple[int, str] | None = None  # (column of a one-space gap between tokens, what replaces it)
    before: tuple[str, ...] = ()  # whole lines inserted above it
    tabs: bool = False  # each four spaces of the indentation as a tab

    def on(self, line: str) -> str:
        body = line.rstrip("\r\n")
        ending = line[len(body):] if self.ending is None else self.ending
        if self.gap is not None:
            col, text = self.gap
            assert body[col] == " ", (body, col)
            body = body[:col] + text + body[col + 1:]
        if self.tabs:
            body = tabbed(body)
        return self.prefix + body + self.trailing + ending


def tabbed(line: str) -> str:
    """The line with each four spaces of its indentation as one tab."""
    spaces = len(line) - len(line.lstrip(" "))
    return "\t" * (spaces // 4) + line[spaces - spaces % 4:]


Plan = dict[int, Edit]


@dataclass(frozen=True)
class Case:
    """One patch on one source: the source's lines, the patch's output on it, and how their lines match."""

    patch_id: str
    name: str
    lines: tuple[str, ...]
    out: tuple[str, ...]
    origin: tuple[int | None, ...]  # for each output line, the source line it replaces or keeps (None: added)
    changed: frozenset[int]  # source lines whose text the patch changes
    near: tuple[int, ...]  # source lines around the splice
    gaps: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False)  # one-space gaps per line
    starts_in_string: frozenset[int] = frozenset()  # lines a string literal runs into (an edit would change it)
    ends_in_string: frozenset[int] = frozenset()  # lines a string literal runs out of


def _source_files(patch_id: str) -> list[tuple[str, str]]:
    """The sources the patch reads: its first target in every release (or the backtest scripts), as the
    patches applied before it to the same file leave them."""
    ref = by_id(patch_id)
    key = ref.targets[0]
    if key == "backtest":
        found = [("sample_backtest", SAMPLE_BACKTEST.decode())]
        found += [(p.name, p.read_text()) for p in sorted((FIXTURES / "backtest").glob("*.py"))]
        found += [("realistic-1500", realistic_script(1500))]
    else:
        found = []
        for release in RELEASES:
            parent = installed_toto_package() if release == "0.2.0" else ROOT / ".toto-versions" / release / "toto"
            found.append((f"{release}/{FILES[key]}", (parent / FILES[key]).read_text()))
    if patch_id == "kv-cache":
        found += [(p.name, p.read_text()) for p in sorted((FIXTURES / "kv").glob("fork_*.py"))]
    return [(name, _beneath_applied(ref, text)) for name, text in found]


def _beneath_applied(ref: PatchRef, text: str) -> str:
    for below in beneath(ref):
        text = below.load().rewrite(text, below.options).source
    return text


@functools.cache
def cases(patch_id: str) -> tuple[Case, ...]:
    return tuple(_case(patch_id, name, text) for name, text in _source_files(patch_id))


def _case(patch_id: str, name: str, text: str) -> Case:
    lines = tuple(split_lines(text))
    out = tuple(split_lines(by_id(patch_id).load().rewrite(text, {}).source))
    origin: list[int | None] = []
    changed: set[int] = set()
    hunks: list[int] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, lines, out, autojunk=False).get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            origin += range(i1, i2)
            changed.update(range(i1, i2) if tag == "replace" else ())
        else:
            assert tag == "insert", f"{patch_id} on {name}: expected same-length replacements or insertions"
            origin += [None] * (j2 - j1)
            while j1 > 0 and origin[j1 - 1] is not None and out[j1 - 1] == out[j2 - 1]:
                # the diff may put an added block below blank lines equal to its own first ones: slide it
                # up, right below the line the patch inserts it after
                origin[j1 - 1], origin[j2 - 1] = None, origin[j1 - 1]
                j1, j2 = j1 - 1, j2 - 1
        if tag != "equal":
            hunks += [i1, i2]
    near = sorted({i for h in hunks for i in range(h - 3, h + 3) if 0 <= i < len(lines)})
    gaps, starts, ends = _tokens(text)
    return Case(patch_id, name, lines, out, tuple(origin), frozenset(changed), tuple(near), gaps, starts, ends)


def _tokens(text: str) -> tuple[dict[int, tuple[int, ...]], frozenset[int], frozenset[int]]:
    """0-based line -> columns of single spaces between two tokens on it; lines that start and end in a string."""
    found: dict[int, list[int]] = {}
    starts: set[int] = set()
    ends: set[int] = set()
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            starts.update(range(token.start[0], token.end[0]))  # 1-based start+1..end, 0-based
            ends.update(range(token.start[0] - 1, token.end[0] - 1))
        if token.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
                          tokenize.COMMENT):
            previous = None
            continue
        if previous is not None and previous.end[0] == token.start[0] and token.start[1] - previous.end[1] == 1:
            found.setdefault(token.start[0] - 1, []).append(previous.end[1])
        previous = token
    return {line: tuple(cols) for line, cols in found.items()}, frozenset(starts), frozenset(ends)


# ---------------------------------------------------------------- building the variant and the expectation


def _may_end_early(line: str) -> bool:
    """A line ending in a backslash continuation: nothing may come between it and its line ending."""
    return line.rstrip("\r\n").endswith("\\")


def usable(case: Case, plan: Plan) -> Plan:
    """The plan without the edits that would change what Python reads: inside strings, after a backslash
    continuation, between the tokens the patch changes."""
    out: Plan = {}
    for index, edit in plan.items():
        line = case.lines[index]
        if _may_end_early(line) or index in case.ends_in_string:
            edit = replace(edit, trailing="")
        if index in case.starts_in_string:
            edit = replace(edit, prefix="", before=())
        if index > 0 and _may_end_early(case.lines[index - 1]):
            edit = replace(edit, before=())
        if edit.gap is not None and (index in case.changed or edit.gap[0] not in case.gaps.get(index, ())):
            edit = replace(edit, gap=None)
        out[index] = edit
    return out


def _settle(case: Case, plan: Plan) -> Plan:
    """A lone CR ending right before a line that starts with LF would read as one CRLF: make it a CRLF itself."""
    pieces: list[tuple[str, int, int]] = []  # (text, source line, extra line number or -1 for the line itself)
    for index, line in enumerate(case.lines):
        edit = plan.get(index, Edit())
        pieces += [(extra, index, k) for k, extra in enumerate(edit.before)] + [(edit.on(line), index, -1)]
    for (text, index, k), (after, _, _) in zip(pieces, pieces[1:]):
        if text.endswith("\r") and after.startswith("\n"):
            edit = plan.get(index, Edit())
            if k < 0:
                plan[index] = replace(edit, ending="\r\n")
            else:
                plan[index] = replace(edit, before=edit.before[:k] + (text + "\n",) + edit.before[k + 1:])
    return plan


def whole_file(case: Case, kind: str, plan: Plan, choose: Callable[[int], str]) -> Plan:
    """``plan`` with a whole-file variant added: every line's ending, the last one's, or a cookie line on top."""
    plan = dict(plan)
    last = len(case.lines) - 1
    endings = {"cr-only": lambda i: "\r", "crlf": lambda i: "\r\n", "crlf-bom-no-final-newline": lambda i: "\r\n",
               "mixed": choose}.get(kind)
    if endings is not None:
        for index, line in enumerate(case.lines):
            if line.endswith(("\n", "\r")):
                plan[index] = replace(plan.get(index, Edit()), ending=endings(index))
        plan = {i: replace(e, before=tuple(x.rstrip("\r\n") + endings(i) for x in e.before)) for i, e in plan.items()}
    if kind in ("no-final-newline", "crlf-bom-no-final-newline") and case.lines[last].endswith(("\n", "\r")):
        plan[last] = replace(plan.get(last, Edit()), ending="")
    if kind == "tabs":
        for index in range(len(case.lines)):
            if index not in case.starts_in_string:
                plan[index] = replace(plan.get(index, Edit()), tabs=True)
    if kind == "cookie":
        first = plan.get(0, Edit())
        plan[0] = replace(first, before=COOKIE + first.before)
    return plan


@dataclass(frozen=True)
class Variant:
    data: bytes  # the file's bytes
    text: str
    expected: tuple[str, ...]  # what the patch may write, as text: an added block may sit anywhere in the
    #                            whitespace-only lines after the line it follows (LibCST decides whose they are)
    encode: Callable[[str], bytes]
    touched: frozenset[int]  # 1-based lines of the variant that the plan edited or inserted


def build(case: Case, plan: Plan, kind: str = "as-is") -> Variant:
    plan = _settle(case, dict(plan))
    variant: list[str] = []
    touched: set[int] = set()
    for index, line in enumerate(case.lines):
        edit = plan.get(index)
        if edit is None:
            variant.append(line)
            continue
        touched.update(range(len(variant) + 1, len(variant) + len(edit.before) + 2))
        variant += [*edit.before, edit.on(line)]
    text = "".join(variant)
    newline = _first_ending(variant)
    pieces: list[tuple[str, bool]] = []  # (line, added by the patch)
    for j, line in enumerate(case.out):
        index = case.origin[j]
        if index is None:
            body = line.rstrip("\r\n")
            if kind == "tabs" and case.patch_id in LIBCST_BLOCKS:
                body = _tabbed_block(case)[len([1 for _, added in pieces if added])].rstrip("\r\n")
            pieces.append((body + (newline if body != line else ""), True))
        else:
            edit = plan.get(index, Edit())
            pieces += [(extra, False) for extra in edit.before] + [(edit.on(line), False)]
    bom = codecs.BOM_UTF8 if "bom" in kind else b""
    encoding = "latin-1" if kind == "cookie" else "utf-8"
    final = text.endswith(("\n", "\r")) or not text
    expected = tuple(_text(p, newline, final) for p in _placements(pieces))
    return Variant(bom + text.encode(encoding), text, expected, lambda t: bom + t.encode(encoding),
                   frozenset(touched))


_TABBED: dict[tuple[str, str], list[str]] = {}


def _tabbed_block(case: Case) -> list[str]:
    """The lines a LibCST patch adds to the source indented with tabs: its block in the file's indentation.

    They are the patch's own code (LibCST re-indents statements, not docstrings or continuation lines),
    so they are taken from the patch's output on the tab-indented source, matched like ``Case.origin``.
    """
    key = (case.patch_id, case.name)
    if key not in _TABBED:
        text = "".join(line if i in case.starts_in_string else tabbed(line) for i, line in enumerate(case.lines))
        tabs = _case(case.patch_id, case.name, text)
        _TABBED[key] = [line for line, origin in zip(tabs.out, tabs.origin) if origin is None]
    return _TABBED[key]


def _placements(pieces: list[tuple[str, bool]]) -> list[list[tuple[str, bool]]]:
    """The pieces, and the same with each run of added lines moved below the whitespace-only lines after it."""
    found = [pieces]
    for start in range(len(pieces)):
        if not pieces[start][1] or (start and pieces[start - 1][1]):
            continue
        end = start
        while end < len(pieces) and pieces[end][1]:
            end += 1
        after = end
        while after < len(pieces) and not pieces[after][1] and not pieces[after][0].strip(" \t\f\r\n"):
            after += 1
            found.append(pieces[:start] + pieces[end:after] + pieces[start:end] + pieces[after:])
    return found


def _text(pieces: list[tuple[str, bool]], newline: str, final: bool) -> str:
    """The lines joined as a patch joins them: no line ending lost inside, none added at the end, no merges."""
    lines = [line for line, _ in pieces]
    for i, line in enumerate(lines[:-1]):
        if not line.endswith(("\n", "\r")):
            lines[i] = line + newline  # a last line followed by added ones gets the file's line ending
    if lines and not final:
        lines[-1] = lines[-1].rstrip("\r\n")
    return "".join(_joined(lines, {i for i, (_, added) in enumerate(pieces) if added}))


def _first_ending(lines: list[str]) -> str:
    first = lines[0] if lines else "\n"
    return "\r\n" if first.endswith("\r\n") else "\r" if first.endswith("\r") else "\n"


def _joined(lines: list[str], added: set[int]) -> list[str]:
    """What the patches promise for an added line beside a lone CR: it never merges into one CRLF."""
    out = list(lines)
    for i in range(len(out) - 1):
        if out[i].endswith("\r") and out[i + 1].startswith("\n"):
            if i + 1 in added:
                out[i + 1] = "\r" + out[i + 1][1:]
            elif i in added:
                out[i] = out[i][:-1] + "\n"
    return out


def check(case: Case, variant: Variant) -> str:
    """Run the patch on the variant's bytes; its output must be the expectation, or a refusal at a touched line.

    Returns "changed", "refused" or "unchanged", for the tests' statistics.
    """
    assert syntax_error(variant.text) is None, "the variant must be valid Python"
    source = decode(variant.data)
    assert source.text == variant.text
    patch = by_id(case.patch_id).load()
    try:
        new = patch.rewrite(source.text, {}).source
    except Refusal as exc:
        assert exc.at and exc.lines, f"refused without naming the user's line: {exc}"
        assert set(exc.lines) <= variant.touched, f"refused at a line the variant did not touch: {exc}"
        return "refused"
    if new not in variant.expected:
        raise AssertionError(_first_difference(variant.expected[0], new))
    assert source.encode(new) == variant.encode(new)
    assert syntax_error(new) is None
    assert patch.rewrite(new, {}).source == new, "not stable on its own output"
    return "unchanged" if new == variant.text else "changed"


def _first_difference(expected: str, got: str) -> str:
    a, b = split_lines(expected), split_lines(got)
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"line {index + 1}: expected {a[index:index + 2]!r}, got {b[index:index + 2]!r} "
            f"({len(a)} lines expected, {len(b)} written)")


def every_kind_at(case: Case, lines: Iterable[int], k: int) -> Plan:
    """The ``k``-th value of every edit kind at each of ``lines`` (cycling, so each value lands on each line)."""
    plan: Plan = {}
    for n, index in enumerate(lines):
        gaps = case.gaps.get(index, ())
        step = k + n
        plan[index] = Edit(prefix=PREFIXES[step % len(PREFIXES)], trailing=TRAILING[step % len(TRAILING)],
                           ending=ENDINGS[step % len(ENDINGS)] if case.lines[index].endswith(("\n", "\r")) else None,
                           gap=(gaps[step % len(gaps)], GAPS[step % len(GAPS)]) if gaps else None,
                           before=(BLANKS[step % len(BLANKS)],))
    return usable(case, plan)


STEPS = max(len(PREFIXES), len(TRAILING), len(ENDINGS), len(GAPS), len(BLANKS))
