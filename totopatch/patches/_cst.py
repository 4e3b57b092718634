"""What every patch module shares: parse or refuse with Python's own line, and node line numbers."""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable

import libcst as cst

from totopatch.spec import Refusal
from totopatch.textio import parse_ast, syntax_error, vouch

Lines = Callable[[Iterable[int]], tuple[int, ...]]  # line numbers of body statements, for refusals only
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


@functools.cache
def template_text(name: str) -> str:
    """The text of a template file beside the patch modules (read once per process)."""
    return resources.files("totopatch.patches").joinpath(name).read_text(encoding="utf-8")


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
    """Whole statements of a file (lines ``start`` to ``end``, 0-based, end exclusive), parsed.

    ``indent`` is what was cut from the first line so that a nested statement parses on its own;
    ``splice`` puts it back.
    """

    start: int
    end: int
    module: cst.Module
    indent: str = ""


def split_lines(source: str) -> list[str]:
    """Lines with their endings, broken where Python breaks them (``\\n``, ``\\r\\n``, ``\\r``)."""
    return _LINE.findall(source)


def parse_segments(source: str, wanted: Callable[[str], bool]) -> tuple[list[str], list[Segment]]:
    """Parse with LibCST only the top-level statements whose text ``wanted`` accepts.

    LibCST builds a node per token, which costs about a second per 4,000 lines; Python's own
    parser finds the statements' line ranges in a tenth of that.  Each segment is whole
    lines of whole statements, so it round-trips through LibCST byte for byte.
    """
    lines = split_lines(source)
    segments = []
    for start, end in _ranges(source):
        text = "".join(lines[start:end])
        if wanted(text):
            try:
                segments.append(Segment(start, end, cst.parse_module(text)))
            except cst.ParserSyntaxError as exc:
                raise Refusal(f"not valid Python: {exc.message}", (start + exc.raw_line,)) from None
    return lines, segments


_DERIVED: dict[str, list[tuple[int, int]]] = {}  # spliced texts' statement ranges (``spliced``), newest last


def _ranges(source: str) -> list[tuple[int, int]]:
    """0-based line ranges of the top-level statements, from Python's parse or derived by ``spliced``."""
    known = _DERIVED.get(source)
    return known if known is not None else [(start, end) for start, end, _ in _statement_groups(parse_python(source))]


def spliced(source: str, lines: list[str], changes: list[tuple[Segment, str]]) -> str:
    """``source`` (split into ``lines``) with the changed segments' lines replaced by their new code.

    Python reads top-level statements independently: where one starts, at column 0, no bracket is
    open and no block goes on.  So when ``source`` parsed and each new code parses on its own,
    starts at column 0 and ends its last line (or ends the file), the result parses too, and its
    statements are the untouched ones shifted plus the new code's.  That is recorded, so checking
    the result (``textio.syntax_error``) and re-running the patch on it (``parse_segments``) need
    no parse of the whole file.  Where a change does not meet these conditions nothing is
    recorded, and the result is parsed in full like any other text.
    """
    old = _ranges(source)
    replaced = {(segment.start, segment.end): code for segment, code in changes}
    assert replaced.keys() <= set(old) and not any(s.indent for s, _ in changes), "takes parse_segments' segments"
    out: list[str] = []
    ranges: list[tuple[int, int]] = []
    provable = True
    done = 0
    for start, end in old:
        if (start, end) not in replaced:
            continue
        code = replaced[(start, end)]
        out += lines[done:start]
        shift = len(out) - start
        ranges += [(a + shift, b + shift) for a, b in old if done <= a and b <= start]
        new_ranges = _standalone_ranges(code)
        ended = code.endswith(("\n", "\r")) or end == len(lines)
        provable = provable and new_ranges is not None and ended
        ranges += [(len(out) + a, len(out) + b) for a, b in new_ranges or ()]
        out += split_lines(code)
        done = end
    shift = len(out) - done
    ranges += [(a + shift, b + shift) for a, b in old if done <= a]
    out += lines[done:]
    text = "".join(out)
    if provable and len(split_lines(text)) == len(out):
        _DERIVED[text] = ranges
        while len(_DERIVED) > 8:
            del _DERIVED[next(iter(_DERIVED))]
        vouch(text)
    return text


def _standalone_ranges(code: str) -> list[tuple[int, int]] | None:
    """The statement ranges of ``code`` parsed on its own from column 0, or None where it does not parse."""
    if code[:1].isspace():
        return None
    try:
        return [(start, end) for start, end, _ in _statement_groups(parse_ast(code))]
    except (SyntaxError, ValueError):
        return None


def parse_statements(source: str, hint: str, wanted: Callable[[ast.AST], bool]) -> tuple[list[str], list[Segment]]:
    """Parse with LibCST only the innermost statements holding a node of Python's tree that ``wanted`` accepts.

    Only top-level statements whose text holds ``hint`` are searched (the name a LibCST matcher
    compares with, which the source must then spell out).

    A simple statement alone on its lines is parsed by itself, its first line's indentation cut
    (continuation lines are inside brackets or after a backslash, where indentation does not count);
    any other (a compound header, ``a; b``, ``if x: y``) falls back to its whole top-level statement.
    ``wanted`` must accept at least every node the patch's LibCST matcher would: nodes outside the
    segments are never seen.
    """
    tree = parse_python(source)
    lines = split_lines(source)
    found: set[tuple[int, int, int]] = set()
    for start, end, group in _statement_groups(tree):
        if hint not in "".join(lines[start:end]):
            continue
        for node in group:
            found.update(_innermost(node, wanted, lines, (start, end, 0)))
    segments = []
    for start, end, col in sorted(found):
        if segments and start < segments[-1].end:
            continue  # nested in the previous one (a fallback to the whole top-level statement)
        indent = lines[start][:col]
        text = lines[start][col:] + "".join(lines[start + 1:end])
        try:
            segments.append(Segment(start, end, cst.parse_module(text), indent))
        except cst.ParserSyntaxError as exc:
            raise Refusal(f"not valid Python: {exc.message}", (start + exc.raw_line,)) from None
    return lines, segments


def splice(lines: list[str], segment: Segment, code: str) -> None:
    """Put a segment's new code in place of its lines (segments are spliced last first)."""
    lines[segment.start:segment.end] = [segment.indent + code]


def segment_lines(segments: Iterable[Segment], nodes: Iterable[cst.CSTNode]) -> tuple[int, ...]:
    """1-based file lines of ``nodes``, each inside one of ``segments`` (metadata is costly: refusals only)."""
    from libcst.metadata import MetadataWrapper, PositionProvider

    positions: dict[int, int] = {}
    for segment in {id(s): s for s in segments}.values():
        resolved = MetadataWrapper(segment.module, unsafe_skip_copy=True).resolve(PositionProvider)
        positions.update({id(node): segment.start + pos.start.line for node, pos in resolved.items()})
    return tuple(positions[id(node)] for node in nodes)


def parse_python(source: str) -> ast.Module:
    """Python's own parse of ``source`` (shared, cached), or a Refusal with Python's line."""
    try:
        return parse_ast(source)
    except (SyntaxError, ValueError):
        line, message = syntax_error(source) or (None, "does not parse")
        raise Refusal(f"not valid Python: {message}", (line or 1,)) from None


_SIMPLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Delete, ast.Raise, ast.Assert)
_TAIL = re.compile(r"[ \t\f]*(?:#[^\r\n]*)?(?:\r\n|\r|\n)?")


def _innermost(top: ast.stmt, wanted: Callable[[ast.AST], bool], lines: list[str],
               whole: tuple[int, int, int]) -> set[tuple[int, int, int]]:
    """(start, end, indentation) to parse for each wanted node under the top-level statement ``top``."""
    found: set[tuple[int, int, int]] = set()
    stack: list[tuple[ast.AST, ast.stmt]] = [(top, top)]
    while stack:
        node, enclosing = stack.pop()
        if isinstance(node, ast.stmt):
            enclosing = node
        if wanted(node):
            alone = _alone(enclosing, lines) if isinstance(enclosing, _SIMPLE) else None
            found.add(alone or whole)
        stack.extend((child, enclosing) for child in ast.iter_child_nodes(node))
    return found


def _alone(node: ast.stmt, lines: list[str]) -> tuple[int, int, int] | None:
    """The lines of a statement that has them to itself, and the width of its first line's indentation."""
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    first = lines[start]
    if node.end_col_offset is None or not set(first[:node.col_offset]) <= set(" \t\f"):
        return None  # (only one-byte characters before it, so the byte offset is the character offset)
    tail = lines[end - 1].encode("utf-8", "surrogatepass")[node.end_col_offset:].decode("utf-8", "surrogatepass")
    return (start, end, node.col_offset) if _TAIL.fullmatch(tail) else None


def _statement_groups(tree: ast.Module) -> list[tuple[int, int, list[ast.stmt]]]:
    """0-based line ranges of the top-level statements, with them; statements sharing a line are merged."""
    groups: list[tuple[int, int, list[ast.stmt]]] = []
    for node in tree.body:
        decorators = getattr(node, "decorator_list", [])
        start = min([node.lineno] + [d.lineno for d in decorators]) - 1
        end = node.end_lineno or node.lineno
        if groups and start < groups[-1][1]:
            groups[-1] = (groups[-1][0], max(end, groups[-1][1]), groups[-1][2] + [node])
        else:
            groups.append((start, end, [node]))
    return groups


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


def template_code(template: str, module: cst.Module) -> tuple[str, ...]:
    """The code of ``template_block(template)``'s statements as ``module.code_for_node`` writes them."""
    return _template_code(template, module.default_indent, module.default_newline)


@functools.cache
def _template_code(template: str, indent: str, newline: str) -> tuple[str, ...]:
    host = cst.Module(body=(), default_indent=indent, default_newline=newline)
    return tuple(host.code_for_node(s) for s in template_block(template))
