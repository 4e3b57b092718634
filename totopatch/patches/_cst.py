"""What every patch module shares: parse or refuse with Python's own line, and node line numbers."""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import libcst as cst

from totopatch.spec import Refusal
from totopatch.textio import parse_ast, syntax_error

Lines = Callable[[Iterable[int]], tuple[int, ...]]  # line numbers of body statements, for refusals only
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def parse(source: str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        error = syntax_error(source)  # Python's own line for the error (LibCST reports where it gave up)
        line = error[0] if error is not None and error[0] else exc.raw_line
        raise Refusal(f"not valid Python: {exc.message}", (line,)) from None


def lines_of(module: cst.Module, nodes: Iterable[cst.CSTNode]) -> tuple[int, ...]:
    """1-based start lines of ``nodes`` (metadata is costly: call it only for refusals and notes)."""
    from libcst.metadata import MetadataWrapper, PositionProvider  # 0.2 s to import: only when refusing

    positions = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    return tuple(positions[node].start.line for node in nodes)


@dataclass(frozen=True)
class Segment:
    """Whole top-level statements of a file (lines ``start`` to ``end``, 0-based, end exclusive), parsed."""

    start: int
    end: int
    module: cst.Module


def split_lines(source: str) -> list[str]:
    """Lines with their endings, broken where Python breaks them (``\\n``, ``\\r\\n``, ``\\r``)."""
    return _LINE.findall(source)


def parse_segments(source: str, wanted: Callable[[str], bool]) -> tuple[list[str], list[Segment]]:
    """Parse with LibCST only the top-level statements whose text ``wanted`` accepts.

    LibCST builds a node per token, which costs about a second per 4,000 lines; Python's own
    parser finds the statements' line ranges in a tenth of that.  Each segment is whole
    lines of whole statements, so it round-trips through LibCST byte for byte.
    """
    try:
        tree = parse_ast(source)
    except (SyntaxError, ValueError):
        line, message = syntax_error(source) or (None, "does not parse")
        raise Refusal(f"not valid Python: {message}", (line or 1,)) from None
    lines = split_lines(source)
    segments = []
    for start, end in _statement_ranges(tree):
        text = "".join(lines[start:end])
        if wanted(text):
            try:
                segments.append(Segment(start, end, cst.parse_module(text)))
            except cst.ParserSyntaxError as exc:
                raise Refusal(f"not valid Python: {exc.message}", (start + exc.raw_line,)) from None
    return lines, segments


def _statement_ranges(tree: ast.Module) -> list[tuple[int, int]]:
    """0-based line ranges of the top-level statements; statements sharing a line are merged."""
    ranges: list[tuple[int, int]] = []
    for node in tree.body:
        decorators = getattr(node, "decorator_list", [])
        start = min([node.lineno] + [d.lineno for d in decorators]) - 1
        end = node.end_lineno or node.lineno
        if ranges and start < ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
        else:
            ranges.append((start, end))
    return ranges


def marked_span(body: list[cst.BaseStatement], lines: Lines, begin: str, end: str, patch_id: str) -> range:
    """Indices of a marked block's statements (``begin`` comment above the first, ``end`` after the last)."""
    begins = [i for i, s in enumerate(body) if any(ln.comment and ln.comment.value.startswith(begin)
                                                   for ln in s.leading_lines)]
    ends = [i for i, s in enumerate(body) if isinstance(s, cst.SimpleStatementLine)
            and s.trailing_whitespace.comment and s.trailing_whitespace.comment.value.startswith(end)]
    if not begins and not ends:
        return range(0)
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise Refusal(f"damaged {patch_id} block: its begin/end markers do not pair up", lines(begins + ends))
    return range(begins[0], ends[0] + 1)


class _NameFinder(cst.CSTVisitor):
    def __init__(self, wanted: Callable[[str], bool]) -> None:
        self.wanted, self.found = wanted, False

    def visit_Name(self, node: cst.Name) -> bool:
        self.found = self.found or self.wanted(node.value)
        return False


def uses_name(node: cst.CSTNode, wanted: Callable[[str], bool]) -> bool:
    """Whether any name under ``node`` is one ``wanted`` accepts."""
    finder = _NameFinder(wanted)
    node.visit(finder)
    return finder.found


@functools.cache
def template_block(template: str) -> tuple[cst.BaseStatement, ...]:
    """A marked block's statements from its template text, two blank lines before the first (parsed once)."""
    parsed = cst.parse_module(template)
    first, *rest = parsed.body
    lead = [cst.EmptyLine(), cst.EmptyLine(), *parsed.header, *first.leading_lines]
    return (first.with_changes(leading_lines=lead), *rest)
