"""Switch the Toto loader's default torch.compile mode (both fallbacks) in the backtest script.

The loader resolves its mode twice: ``os.getenv("..TOTO.._MODE") or ... or "max-autotune"``
and then ``(<that name> or "").strip() or "max-autotune"``.  Both literals are the default
and both change.  The mode chain is told apart by what it configures: its environment
names name the compile mode, so a sibling chain for the compile backend (``TOTO_COMPILE_BACKEND
... or "inductor"``) is not a candidate.  Early scripts have no loader function and resolve
the mode inside ``if`` blocks of the module or of a method; that scope counts as the loader.
Other loaders (Kronos, Chronos), ``setdefault`` calls, docstrings and log messages never
match, because matching is on structure, not on text.
"""
from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from totopatch.patches import COMPILE_MODES as MODES, by_id
from totopatch.patches._cst import Segment, parse_segments, segment_lines, spliced
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

DEFAULT_MODE = by_id("compile-mode").options["compile_mode"]  # declared once, in the registry
MODULE_SCOPE = "<module>"


@dataclass(frozen=True)
class Site:
    """One default literal of the loader, the statement holding it and the path down to that."""

    literal: cst.SimpleString
    statement: cst.SimpleStatementLine | cst.SimpleStatementSuite
    path: tuple[cst.CSTNode, ...]
    scope: str
    segment: Segment


def _or_operands(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    """Flatten ``a or b or c`` (however parenthesised) into its operands."""
    if isinstance(node, cst.BooleanOperation) and isinstance(node.operator, cst.Or):
        return _or_operands(node.left) + _or_operands(node.right)
    return [node]


def _is_name(node: cst.BaseExpression, value: str) -> bool:
    return isinstance(node, cst.Name) and node.value == value


def _is_env_getter(func: cst.BaseExpression) -> bool:
    """``os.getenv`` or ``os.environ.get``."""
    if not isinstance(func, cst.Attribute):
        return False
    if func.attr.value == "getenv":
        return _is_name(func.value, "os")
    inner = func.value
    return (func.attr.value == "get" and isinstance(inner, cst.Attribute) and inner.attr.value == "environ"
            and _is_name(inner.value, "os"))


def _toto_env_name(node: cst.BaseExpression) -> str | None:
    """The upper-cased name of ``os.getenv("..TOTO..")`` / ``os.environ.get("..TOTO..")``, else None."""
    if not isinstance(node, cst.Call) or len(node.args) != 1 or not _is_env_getter(node.func):
        return None
    arg = node.args[0]
    if arg.keyword is not None or arg.star or not isinstance(arg.value, cst.SimpleString):
        return None
    name = str(arg.value.evaluated_value).upper()
    return name if "TOTO" in name else None


def _mode_chain_default(value: cst.BaseExpression) -> cst.SimpleString | None:
    """The trailing literal of ``os.getenv("..TOTO.._MODE") or ... or "<mode>"``.

    Every lookup must name TOTO and at least one must name the compile mode, so that a chain
    for another setting (``TOTO_COMPILE_BACKEND``) is never taken for the mode chain.
    """
    *lookups, last = _or_operands(value)
    if not lookups or not isinstance(last, cst.SimpleString):
        return None
    names = [_toto_env_name(op) for op in lookups]
    if any(n is None for n in names) or not any(_names_the_mode(n) for n in names if n):
        return None
    return last


def _names_the_mode(env_name: str) -> bool:
    """``TOTO_COMPILE_MODE``, ``REAL_TOTO_COMPILE_MODE``: a ``MODE`` word, not ``TOTO_MODEL_ID``."""
    return "MODE" in env_name.replace("-", "_").split("_")


def _strip_fallback_default(value: cst.BaseExpression, chain_names: set[str]) -> cst.SimpleString | None:
    """The trailing literal of ``(<mode chain name> or "").strip() or "<mode>"`` (``or None`` is no literal)."""
    operands = _or_operands(value)
    if len(operands) != 2 or not isinstance(operands[1], cst.SimpleString):
        return None
    call = operands[0]
    if not isinstance(call, cst.Call) or call.args or not isinstance(call.func, cst.Attribute):
        return None
    inner = call.func.value
    if call.func.attr.value != "strip" or not isinstance(inner, cst.BooleanOperation):
        return None
    if not isinstance(inner.operator, cst.Or) or not isinstance(inner.right, cst.SimpleString):
        return None
    return operands[1] if isinstance(inner.left, cst.Name) and inner.left.value in chain_names else None


class _FindSites(cst.CSTVisitor):
    """Collect the mode defaults of assignments per scope; never descends into expressions."""

    def __init__(self) -> None:
        self.path: list[cst.CSTNode] = []
        self.scopes: list[str] = [MODULE_SCOPE]
        self.chain_sites: list[Site] = []
        self.strip_sites: list[Site] = []
        self._chain_names: dict[str, set[str]] = {}
        self.segment: Segment | None = None

    def visit_segment(self, segment: Segment) -> None:
        self.segment = segment
        segment.module.visit(self)

    def on_visit(self, node: cst.CSTNode) -> bool:
        self.path.append(node)
        if isinstance(node, (cst.FunctionDef, cst.ClassDef)):
            outer = "" if self.scopes[-1] == MODULE_SCOPE else f"{self.scopes[-1]}."
            self.scopes.append(outer + node.name.value)
        if isinstance(node, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
            for stmt in node.body:
                if isinstance(stmt, cst.Assign):
                    self._assign(stmt, node)
            return False
        return not isinstance(node, cst.BaseExpression)

    def on_leave(self, original_node: cst.CSTNode) -> None:
        self.path.pop()
        if isinstance(original_node, (cst.FunctionDef, cst.ClassDef)):
            self.scopes.pop()

    def _assign(self, node: cst.Assign, statement: cst.SimpleStatementLine | cst.SimpleStatementSuite) -> None:
        if len(node.targets) != 1 or not isinstance(node.targets[0].target, cst.Name):
            return
        name, scope = node.targets[0].target.value, self.scopes[-1]
        if (literal := _mode_chain_default(node.value)) is not None:
            self.chain_sites.append(Site(literal, statement, tuple(self.path), scope, self.segment))
            self._chain_names.setdefault(scope, set()).add(name)
        elif (literal := _strip_fallback_default(node.value, self._chain_names.get(scope, set()))) is not None:
            self.strip_sites.append(Site(literal, statement, tuple(self.path), scope, self.segment))


class _SetLiterals(cst.CSTTransformer):
    """Rewrite the given literals, walking only the paths that lead to them."""

    def __init__(self, sites: list[Site], mode: str) -> None:
        self.on_path = {id(node) for site in sites for node in site.path}
        self.literals = {id(site.literal) for site in sites}
        self.mode = mode

    def on_visit(self, node: cst.CSTNode) -> bool:
        return id(node) in self.on_path or isinstance(node, (cst.BaseExpression, cst.Assign))

    def leave_SimpleString(self, original_node: cst.SimpleString, updated_node: cst.SimpleString) -> cst.SimpleString:
        if id(original_node) not in self.literals:
            return updated_node
        quote = original_node.quote
        return updated_node.with_changes(value=f"{original_node.prefix}{quote}{self.mode}{quote}")


def _lines_of(sites: list[Site]) -> list[int]:
    """1-based file lines of the sites' literals (metadata is costly, so only for refusals and notes)."""
    return list(segment_lines([s.segment for s in sites], [s.literal for s in sites]))


def _find(segments: list[Segment]) -> list[Site]:
    """The default literals of the one Toto loader, or a Refusal naming the candidates."""
    finder = _FindSites()
    for segment in segments:
        finder.visit_segment(segment)
    scopes = sorted({s.scope for s in finder.chain_sites})
    if not scopes:
        raise Refusal("no Toto loader found: expected `os.getenv(\"...TOTO..._MODE\") or ... or \"<mode>\"`")
    if len(scopes) > 1:
        raise Refusal(f"ambiguous: TOTO compile-mode defaults in several places ({', '.join(scopes)})",
                      tuple(_lines_of(finder.chain_sites)))
    sites = finder.chain_sites + [s for s in finder.strip_sites if s.scope == scopes[0]]
    unknown = [s for s in sites if s.literal.evaluated_value not in MODES]
    if unknown:
        raise Refusal(f"loader default {unknown[0].literal.value} is not a known compile mode",
                      tuple(_lines_of(unknown)))
    return sites


def _mentions_toto(text: str) -> bool:
    return "TOTO" in text.upper()


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    mode = options.get("compile_mode", DEFAULT_MODE)
    lines, segments = parse_segments(source, _mentions_toto)
    sites = _find(segments)
    stale = [s for s in sites if s.literal.evaluated_value != mode]
    if not stale:
        return Rewrite(source)
    notes = ()
    if len(stale) < len(sites):
        numbers = ", ".join(map(str, _lines_of(stale)))
        notes = (f"finished a half-switched loader: only line {numbers} still had the old default",)
    changes = []
    for segment in {id(s.segment): s.segment for s in stale}.values():
        mine = [s for s in stale if s.segment is segment]
        changes.append((segment, segment.module.visit(_SetLiterals(mine, mode)).code))
    return Rewrite(spliced(source, lines, changes), notes)


PATCH = Patch(
    id="compile-mode",
    description="Set the Toto loader's default compile mode (both fallbacks) in the backtest script",
    targets=("backtest",),
    rewrite=rewrite,
)
