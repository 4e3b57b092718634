"""Switch the Toto loader's default torch.compile mode (both fallbacks) in the backtest script.

The loader resolves its mode twice: ``os.getenv("..TOTO..") or ... or "max-autotune"`` and
then ``(<that name> or "").strip() or "max-autotune"``.  Both literals are the default and
both change.  Other loaders (Kronos, Chronos), ``setdefault`` calls, docstrings and log
messages never match, because matching is on structure, not on text.
"""
from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from totopatch.patches import COMPILE_MODES as MODES, by_id
from totopatch.patches._cst import lines_of, parse
from totopatch.spec import Options, Patch, Refusal, Rewrite

DEFAULT_MODE = by_id("compile-mode").options["compile_mode"]  # declared once, in the registry

_ENV_NAME = m.SimpleString(value=m.MatchIfTrue(lambda v: "TOTO" in v.upper()))
_TOTO_ENV_LOOKUP = m.Call(
    func=m.Attribute(value=m.Name("os"), attr=m.Name("getenv"))
    | m.Attribute(value=m.Attribute(value=m.Name("os"), attr=m.Name("environ")), attr=m.Name("get")),
    args=[m.Arg(value=_ENV_NAME)],
)


@dataclass(frozen=True)
class Site:
    """One default literal of the loader, the statement holding it and the path down to that."""

    literal: cst.SimpleString
    statement: cst.SimpleStatementLine
    path: tuple[cst.CSTNode, ...]
    function: str


def _or_operands(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    """Flatten ``a or b or c`` (however parenthesised) into its operands."""
    if isinstance(node, cst.BooleanOperation) and isinstance(node.operator, cst.Or):
        return _or_operands(node.left) + _or_operands(node.right)
    return [node]


def _env_chain_default(value: cst.BaseExpression) -> cst.SimpleString | None:
    """The trailing literal of ``os.getenv("..TOTO..") or ... or "<mode>"``."""
    operands = _or_operands(value)
    last = operands[-1]
    if len(operands) < 2 or not isinstance(last, cst.SimpleString):
        return None
    if not all(m.matches(op, _TOTO_ENV_LOOKUP) for op in operands[:-1]):
        return None
    return last


def _strip_fallback_default(value: cst.BaseExpression, env_names: set[str]) -> cst.SimpleString | None:
    """The trailing literal of ``(<env name> or "").strip() or "<mode>"``."""
    operands = _or_operands(value)
    if len(operands) != 2 or not isinstance(operands[1], cst.SimpleString):
        return None
    stripped = m.Call(func=m.Attribute(value=m.BooleanOperation(
        left=m.Name(m.MatchIfTrue(lambda n: n in env_names)), operator=m.Or(), right=m.SimpleString()),
        attr=m.Name("strip")))
    return operands[1] if m.matches(operands[0], stripped) else None


class _FindSites(cst.CSTVisitor):
    """Collect the default literals of assignments inside functions; never descends into expressions."""

    def __init__(self) -> None:
        self.path: list[cst.CSTNode] = []
        self.functions: list[str] = []
        self.env_sites: list[Site] = []
        self.strip_sites: list[Site] = []
        self._env_names: dict[str, set[str]] = {}

    def on_visit(self, node: cst.CSTNode) -> bool:
        self.path.append(node)
        if isinstance(node, cst.FunctionDef):
            self.functions.append(node.name.value)
        if isinstance(node, cst.SimpleStatementLine):
            if self.functions:
                for stmt in node.body:
                    if isinstance(stmt, cst.Assign):
                        self._assign(stmt, node)
            return False
        return not isinstance(node, cst.BaseExpression)

    def on_leave(self, original_node: cst.CSTNode) -> None:
        self.path.pop()
        if isinstance(original_node, cst.FunctionDef):
            self.functions.pop()

    def _assign(self, node: cst.Assign, statement: cst.SimpleStatementLine) -> None:
        if len(node.targets) != 1 or not isinstance(node.targets[0].target, cst.Name):
            return
        name, function = node.targets[0].target.value, self.functions[-1]
        if (literal := _env_chain_default(node.value)) is not None:
            self.env_sites.append(Site(literal, statement, tuple(self.path), function))
            self._env_names.setdefault(function, set()).add(name)
        elif (literal := _strip_fallback_default(node.value, self._env_names.get(function, set()))) is not None:
            self.strip_sites.append(Site(literal, statement, tuple(self.path), function))


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


def _find(module: cst.Module) -> list[Site]:
    """The default literals of the one Toto loader, or a Refusal naming the candidates."""
    finder = _FindSites()
    module.visit(finder)
    loaders = sorted({s.function for s in finder.env_sites})
    if not loaders:
        raise Refusal("no Toto loader found: expected `os.getenv(\"...TOTO...\") or ... or \"<mode>\"` in a function")
    if len(loaders) > 1:
        raise Refusal(f"ambiguous: TOTO compile-mode defaults in several functions ({', '.join(loaders)})",
                      lines_of(module, [s.literal for s in finder.env_sites]))
    sites = finder.env_sites + [s for s in finder.strip_sites if s.function == loaders[0]]
    unknown = [s.literal for s in sites if s.literal.evaluated_value not in MODES]
    if unknown:
        raise Refusal(f"loader default {unknown[0].value} is not a known compile mode", lines_of(module, unknown))
    return sites


def rewrite(source: str, options: Options) -> Rewrite:
    mode = options.get("compile_mode", DEFAULT_MODE)
    module = parse(source)
    sites = _find(module)
    stale = [s for s in sites if s.literal.evaluated_value != mode]
    if not stale:
        return Rewrite(source)
    notes = ()
    if len(stale) < len(sites):
        lines = ", ".join(map(str, lines_of(module, [s.literal for s in stale])))
        notes = (f"finished a half-switched loader: only line {lines} still had the old default",)
    return Rewrite(module.visit(_SetLiterals(stale, mode)).code, notes)


PATCH = Patch(
    id="compile-mode",
    description="Set the Toto loader's default compile mode (both fallbacks) in the backtest script",
    targets=("backtest",),
    rewrite=rewrite,
)
