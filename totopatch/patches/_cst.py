"""What every patch module shares: parse or refuse with Python's own line, and node line numbers."""
from __future__ import annotations

import ast
import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Container, Iterable, Sequence

import libcst as cst

from totopatch.spec import Refusal
from totopatch.textio import Problem, parse_ast, parse_problem, split_python_lines as split_lines, vouch

Lines = Callable[[Iterable[int]], tuple[int, ...]]  # line numbers of body statements, for refusals only


@functools.cache
def template_text(name: str) -> str:
    """The text of a template file beside the patch modules (read once per process)."""
    return resources.files("totopatch.patches").joinpath(name).read_text(encoding="utf-8")


def parse(source: str) -> Exact:
    """The whole module, checked by Python's own parser first (its grammar decides what is valid, at its line)."""
    parse_python(source)
    return parse_exact(source)


def replace_body(exact: Exact, start: int, stop: int, code: Sequence[str]) -> str:
    """The text with the top-level statements ``start:stop`` replaced by ``code`` (LibCST's, one string each).

    Only those statements' lines change (with the comments and blank lines above them, which LibCST
    counts as theirs); every other line is the user's, byte for byte.  The new lines take the text's
    line ending, and a text without a final line ending keeps none.
    """
    exact.prove()
    first, last = exact.line_of(start), exact.line_of(stop)
    head, tail = list(exact.lines[:first]), list(exact.lines[last:])
    new = [exact.added(line) for line in split_lines("".join(code))]
    if head and not _ending(head[-1])[1]:
        head[-1] += exact.newline  # the new code goes after the last line, which had no line ending
    if new and not tail and exact.lines and not _ending(exact.lines[-1])[1]:
        new[-1] = _ending(new[-1])[0]
    return joined(head + new + tail, range(len(head), len(head) + len(new)))


def joined(lines: Sequence[str], added: Container[int]) -> str:
    """``lines`` as one text, where no added line merges with its neighbour into one line break.

    A lone CR followed by a line that starts with LF is one CRLF to Python: the line between them would
    vanish.  So an added line there takes the other one-byte ending (CR for a blank LF line, LF for a
    line ending in CR), which Python and ``Exact.clean`` read alike.
    """
    out = list(lines)
    for i in range(len(out) - 1):
        if out[i].endswith("\r") and out[i + 1].startswith("\n"):
            if i + 1 in added:
                out[i + 1] = "\r" + out[i + 1][1:]
            elif i in added:
                out[i] = out[i][:-1] + "\n"
    return "".join(out)


def newline_of(lines: Sequence[str]) -> str:
    """The first line ending of ``lines`` (LF where there is none): the one the lines a patch adds take."""
    first = lines[0] if lines else "\n"
    return "\r\n" if first.endswith("\r\n") else "\r" if first.endswith("\r") else "\n"


def put_lines(lines: Sequence[str], start: int, stop: int, new: Sequence[str]) -> str:
    """``lines`` with ``lines[start:stop]`` replaced by the whole lines ``new`` (a patch's own, in the text's
    line ending), as one text: every other line is the user's, byte for byte.

    New lines after a last line without a line ending give it the text's; a text without a final line
    ending keeps none; no added line merges with a neighbour (``joined``).
    """
    out, new = list(lines), list(new)
    if out and stop == len(out) and not _ending(out[-1])[1]:
        if start == len(out):
            out[-1] += newline_of(out)
        if new:
            new[-1] = _ending(new[-1])[0]
    out[start:stop] = new
    return joined(out, range(start, start + len(new)))


def lines_of(module: cst.Module, nodes: Iterable[cst.CSTNode]) -> tuple[int, ...]:
    """1-based start lines of ``nodes`` (metadata is costly: call it only for refusals and notes)."""
    from libcst.metadata import MetadataWrapper, PositionProvider  # 0.2 s to import: only when refusing

    positions = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    return tuple(positions[node].start.line for node in nodes)


_LONE_CR = re.compile(r"\r(?!\n)")
_FF_INDENT = re.compile(r"[ \t\f]*\f")


@dataclass(frozen=True)
class Exact:
    """A text as LibCST reads it back byte for byte (``module``), and the way back to the user's bytes.

    LibCST does not give back every byte Python accepts: it drops a form feed from a line's indentation
    (or copies it onto the lines after, or refuses the block), and the last line's lone CR.  So it gets
    ``clean``: the same lines, each lone CR as LF and each line's indentation cut after its last form
    feed (Python's tokenizer resets the column there, so the cut changes nothing it sees; lines that
    start inside a string keep theirs).  ``restore`` takes code in ``clean``'s terms back to the user's
    bytes: an untouched line is the user's line, and a changed line keeps the user's cut indentation
    and line ending.
    """

    lines: tuple[str, ...]
    clean: tuple[str, ...]
    module: cst.Module
    first_line: int = 1  # the file's line number of ``lines[0]``, for refusals

    def prove(self) -> None:
        """Refuse, at the file's line, unless LibCST's code for ``module`` is ``clean`` byte for byte.

        Run before any output is built from the module (a text that is only read needs no proof).
        """
        code = self.code
        if code != "".join(self.clean):
            again = split_lines(code)
            index = next((i for i, (a, b) in enumerate(zip(self.clean, again)) if a != b),
                         min(len(self.clean), len(again)) - 1)
            raise Refusal(f"LibCST cannot give back this line byte for byte ({self.lines[index]!r})",
                          (self.first_line + index,), at=True)

    @functools.cached_property
    def code(self) -> str:
        """LibCST's code for ``module``, ``Module.code`` byte for byte (made once: ``prove`` may run for each patch
        that reads this text), joined from its nodes' code, which the patches reuse (``statement_code``).

        ``Module.code`` writes the header, body and footer nodes in turn, as ``code_for_node`` writes each; then,
        for a module with a final line ending, adds one if nothing was written, and for one without, drops the
        last token.  A last node that writes any text wrote that token, so the module is its nodes' code with the
        last node's written alone in a module without a final line ending.  Otherwise LibCST writes it all.
        """
        module, count = self.module, len(self._nodes)
        if not count:
            return module.code
        last = self._piece(count - 1) if module.has_trailing_newline else _last_only(module).code
        if not last:
            return module.code
        return "".join(self._piece(i) for i in range(count - 1)) + last

    def statement_code(self, index: int) -> str:
        """LibCST's code for the module's top-level statement ``index``, as ``Module.code_for_node`` writes it
        (with the comments and blank lines above it, which LibCST counts as its own; made once)."""
        return self._piece(len(self.module.header) + index)

    def line_of(self, index: int) -> int:
        """The 0-based line of ``code`` where the top-level statement ``index`` starts (the comments and blank
        lines above it included; ``len(module.body)``: the line after the last statement)."""
        return sum(self._piece(i).count("\n") for i in range(len(self.module.header) + index))

    @functools.cached_property
    def _nodes(self) -> tuple[cst.CSTNode, ...]:
        return (*self.module.header, *self.module.body, *self.module.footer)

    @functools.cached_property
    def _pieces(self) -> list[str | None]:
        return [None] * len(self._nodes)

    def _piece(self, index: int) -> str:
        """The code of the module's ``index``-th node of header, body and footer (made once, when first asked)."""
        code = self._pieces[index]
        if code is None:
            code = self._pieces[index] = self.module.code_for_node(self._nodes[index])
        return code

    @property
    def newline(self) -> str:
        """The first line ending of the text (what LibCST takes as the module's), for the lines a patch adds."""
        return newline_of(self.lines)

    def restore(self, code: str) -> str:
        """The user's bytes for ``code``, LibCST's code for the module after a change (in ``clean``'s terms).

        Lines are matched one to one where the change kept their number (the patches that rewrite in
        place), else by a diff; lines without a match are the patch's own, in the text's line ending.
        """
        self.prove()
        new = split_lines(code)
        if len(new) == len(self.clean):
            return "".join(self._line(i, line) for i, line in enumerate(new))
        out: list[str] = []
        added: list[int] = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, self.clean, new, autojunk=False).get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                out += [self._line(i1 + k, new[j1 + k]) for k in range(j2 - j1)]
            else:
                added += range(len(out), len(out) + j2 - j1)
                out += [self.added(line) for line in new[j1:j2]]
        return joined(out, set(added))

    def _line(self, index: int, new: str) -> str:
        user, clean = self.lines[index], self.clean[index]
        if new == clean:
            return user
        cut = user[:len(user) - len(clean)]  # the indentation up to a form feed, or ""
        body, ending = _ending(new)
        return cut + body + (_ending(user)[1] if ending == _ending(clean)[1] else ending)

    def added(self, line: str) -> str:
        """A line the patch adds, in the text's line ending."""
        body, ending = _ending(line)
        return body + (self.newline if ending else "")


def _last_only(module: cst.Module) -> cst.Module:
    """``module`` with only its last node of header, body and footer, in its place."""
    if module.footer:
        return module.with_changes(header=(), body=(), footer=module.footer[-1:])
    if module.body:
        return module.with_changes(header=(), body=module.body[-1:], footer=())
    return module.with_changes(header=module.header[-1:], body=(), footer=())


def _ending(line: str) -> tuple[str, str]:
    body = line.rstrip("\r\n")
    return body, line[len(body):]


def clean_lines(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The text's lines and the same lines as LibCST can give them back (see ``Exact``)."""
    lines = tuple(split_lines(text))
    if "\f" not in text and not _LONE_CR.search(text):
        return lines, lines
    in_string = _string_lines(text) if "\f" in text else frozenset()
    clean = []
    for index, line in enumerate(lines):
        if line.endswith("\r"):
            line = line[:-1] + "\n"
        cut = _cut(line) if index not in in_string else 0
        if line[cut:]:
            line = line[cut:]
        clean.append(line)
    return lines, tuple(clean)


def _cut(line: str) -> int:
    """Where ``line`` starts to Python's tokenizer: after its leading whitespace up to the last form feed in it."""
    found = _FF_INDENT.match(line)
    return found.end() if found else 0


def _string_lines(text: str) -> frozenset[int]:
    """0-based lines that may start inside a string literal (all of them where Python cannot parse the text)."""
    try:
        tree = parse_ast(text)
    except (SyntaxError, ValueError):
        return frozenset(range(len(split_lines(text))))
    inside: set[int] = set()
    for node in ast.walk(tree):
        end = getattr(node, "end_lineno", None)
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and end is not None and end > node.lineno:
            inside.update(range(node.lineno, end))  # 1-based lines lineno+1..end, 0-based
    return frozenset(inside)


@functools.lru_cache(maxsize=16)
def parse_exact(text: str, first_line: int = 1) -> Exact:
    """Parse ``text`` (lines ``first_line``... of its file) with LibCST, as it can give the text back (``Exact``).

    A Refusal names the file's line where LibCST cannot parse the text; Python's parser is the judge of
    validity and is asked first by the callers, so such a line is LibCST's limit, not the user's error.
    The last 16 texts' results are kept (an ``Exact`` and its LibCST tree are immutable, about 1.5 MB for a
    1,200-line file): a process that checks the same file again, as the tests and the Python API do, parses
    it once.
    """
    lines, clean = clean_lines(text)
    try:
        module = cst.parse_module("".join(clean))
    except cst.ParserSyntaxError as exc:
        raise Refusal(f"LibCST cannot parse this valid Python ({exc.message.strip()})",
                      (first_line - 1 + exc.raw_line,), at=True) from None
    return Exact(lines, clean, module, first_line)


@dataclass(frozen=True)
class Segment:
    """Whole statements of a file (lines ``start`` to ``end``, 0-based, end exclusive), parsed.

    ``indent`` is what was cut from the first line so that a nested statement parses on its own;
    ``splice`` puts it back.
    """

    start: int
    end: int
    exact: Exact
    indent: str = ""

    @property
    def module(self) -> cst.Module:
        return self.exact.module


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
            segments.append(Segment(start, end, parse_exact(text, start + 1)))
    return lines, segments


_DERIVED: dict[str, list[tuple[int, int]]] = {}  # spliced texts' statement ranges (``spliced``), newest last


def _ranges(source: str) -> list[tuple[int, int]]:
    """0-based line ranges of the top-level statements, from Python's parse or derived by ``spliced``."""
    known = _DERIVED.get(source)
    return known if known is not None else [(start, end) for start, end, _ in _statement_groups(parse_python(source))]


def spliced(source: str, lines: list[str], changes: list[tuple[Segment, str]]) -> str:
    """``source`` (split into ``lines``) with the changed segments' lines replaced by their new code.

    The code is LibCST's (``segment.module``'s terms); its lines go back to the user's bytes (``Exact.restore``).

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
        segment = next(s for s, _ in changes if (s.start, s.end) == (start, end))
        code = segment.exact.restore(replaced[(start, end)])
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
        segments.append(Segment(start, end, parse_exact(text, start + 1), indent))
    return lines, segments


def splice(lines: list[str], segment: Segment, code: str) -> None:
    """Put a segment's new code (LibCST's) in place of its lines, in the user's bytes (segments are spliced last first)."""
    lines[segment.start:segment.end] = [segment.indent + segment.exact.restore(code)]


def segment_lines(segments: Iterable[Segment], nodes: Iterable[cst.CSTNode]) -> tuple[int, ...]:
    """1-based file lines of ``nodes``, each inside one of ``segments`` (metadata is costly: refusals only)."""
    from libcst.metadata import MetadataWrapper, PositionProvider

    positions: dict[int, int] = {}
    for segment in {id(s): s for s in segments}.values():
        resolved = MetadataWrapper(segment.module, unsafe_skip_copy=True).resolve(PositionProvider)
        positions.update({id(node): segment.start + pos.start.line for node, pos in resolved.items()})
    return tuple(positions[id(node)] for node in nodes)


def parse_python(source: str) -> ast.Module:
    """Python's own parse of ``source`` (shared, cached), or a Refusal at Python's line saying what to do."""
    try:
        return parse_ast(source)
    except (SyntaxError, ValueError):
        problem = parse_problem(source) or Problem(None, "does not parse")
        raise Refusal(problem.phrase, (problem.line,) if problem.line else (), at=True, hint=problem.hint) from None


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


# ---------------------------------------------------------------- whole-line blocks (cuda-graphs, layer-region, rope-cache)


def line_block(lines: Sequence[str], tree: ast.Module, begin: str, end: str, patch_id: str) -> tuple[int, int] | None:
    """0-based first and last line of a block of whole lines: ``begin`` starts its first line, ``end`` is on the
    line of a top-level statement that ends it.  None where there is none; a refusal where they do not pair up.

    ``begin`` may follow whitespace that ends in a form feed, where Python's tokenizer restarts the column (the
    comment is still at column 0 to it; ``Exact.clean`` cuts the same prefix)."""
    tops = {node.lineno - 1 for node in tree.body} | {(node.end_lineno or node.lineno) - 1 for node in tree.body}
    begins = [i for i, line in enumerate(lines) if line[_cut(line):].startswith(begin)]
    ends = [i for i, line in enumerate(lines) if end in line and i in tops]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise Refusal(f"damaged {patch_id} block: its begin/end markers do not pair up",
                      tuple(i + 1 for i in begins + ends))
    return begins[0], ends[0]


def top_level_imports(tree: ast.Module) -> set[str]:
    """The names a module's top-level imports bind (the first part of a dotted name)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def template_lines(template: str, lines: Sequence[str]) -> list[str]:
    """``template``'s lines in the line ending of ``lines``."""
    newline = newline_of(lines)
    return [line.replace("\n", newline) for line in split_lines(template)]


def put_block_after(source: str, lines: Sequence[str], tree: ast.Module, anchor: int, block: tuple[int, int] | None,
                    wanted: Sequence[str], patch_id: str, anchor_name: str) -> tuple[str, tuple[str, ...]]:
    """``source`` with the block ``wanted`` right after 0-based line ``anchor`` (two blank lines before it), or in
    place of ``block``, which must already be right after it; and the note for a block that was replaced."""
    if block is None:
        newline = newline_of(lines)
        return put_lines(lines, anchor + 1, anchor + 1, [newline, newline, *wanted]), ()
    between = [n for n in tree.body if anchor < n.lineno - 1 < block[0]]
    if block[0] <= anchor or between:
        raise Refusal(f"the {patch_id} block is not right after {anchor_name}", (block[0] + 1,))
    first = lines[block[0]]
    if [first[_cut(first):], *lines[block[0] + 1:block[1] + 1]] == list(wanted):
        return source, ()  # the block as written, but for a form feed before its first line (Python's column 0)
    new = put_lines(lines, block[0], block[1] + 1, wanted)
    return new, (() if new == source else (f"replaced a {patch_id} block written by another totopatch version",))
