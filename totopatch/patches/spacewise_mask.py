"""Build Toto's space-wise attention mask without a size-1 axis inside ``rearrange`` (transformer.py).

Upstream ``_get_mask`` does ``rearrange(mask, "... -> (batch seq_len) 1 variate1 variate2")`` and then
``.expand(-1, num_heads, -1, -1)``.  Once the decode step compiles as one graph, ``seq_len`` is
symbolic there, and inductor (torch 2.11 and 2.13 seen) indexes the expanded head axis as if it
were a patch axis: heads 1.. read the wrong rows, and compiled forecasts drift from eager.  Making
the axis with ``.unsqueeze(1)`` after the rearrange gives the same view, so eager results are
bit-identical, and inductor then broadcasts it correctly.
"""
from __future__ import annotations

import ast

import libcst as cst

from totopatch.patches._cst import parse_statements, splice
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

OLD = "batch seq_len variate1 variate2 -> (batch seq_len) 1 variate1 variate2"
NEW = "batch seq_len variate1 variate2 -> (batch seq_len) variate1 variate2"


def _is_rearrange(node: cst.BaseExpression, pattern: str) -> bool:
    """``rearrange(<x>, "<pattern>")`` (any quotes) with two positional arguments."""
    if not isinstance(node, cst.Call) or not isinstance(node.func, cst.Name) or node.func.value != "rearrange":
        return False
    if len(node.args) != 2 or any(a.keyword is not None or a.star for a in node.args):
        return False
    text = node.args[1].value
    return isinstance(text, cst.SimpleString) and pattern in (text.value[1:-1], text.value[3:-3])


def _is_patched(node: cst.Call) -> bool:
    """``rearrange(<x>, "<NEW>").unsqueeze(1)``."""
    func = node.func
    if not isinstance(func, cst.Attribute) or func.attr.value != "unsqueeze" or len(node.args) != 1:
        return False
    arg = node.args[0]
    one = arg.keyword is None and not arg.star and isinstance(arg.value, cst.Integer) and arg.value.value == "1"
    return one and _is_rearrange(func.value, NEW)


class _FindMaskCalls(cst.CSTVisitor):
    def __init__(self) -> None:
        self.upstream: list[cst.Call] = []
        self.patched = 0

    def visit_Call(self, node: cst.Call) -> bool:
        if _is_patched(node):
            self.patched += 1
            return False
        if _is_rearrange(node, OLD):
            self.upstream.append(node)
        return True


class _Unsqueeze(cst.CSTTransformer):
    def __init__(self, targets: list[cst.Call]) -> None:
        self.targets = {id(t) for t in targets}

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        if id(original_node) not in self.targets:
            return updated_node
        old = updated_node.args[1].value
        assert isinstance(old, cst.SimpleString)
        pattern = old.with_changes(value=old.value.replace(OLD, NEW))
        call = updated_node.with_changes(args=[updated_node.args[0], updated_node.args[1].with_changes(value=pattern)])
        return cst.Call(func=cst.Attribute(value=call, attr=cst.Name("unsqueeze")), args=[cst.Arg(cst.Integer("1"))])


def _may_rearrange(node: ast.AST) -> bool:
    """Python's view of the calls ``_FindMaskCalls`` looks at: only their statements are parsed with LibCST."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "rearrange"


def _find(module: cst.Module) -> _FindMaskCalls:
    finder = _FindMaskCalls()
    module.visit(finder)
    return finder


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    lines, segments = parse_statements(source, "rearrange", _may_rearrange)
    finders = [_find(segment.module) for segment in segments]
    count = sum(len(finder.upstream) + finder.patched for finder in finders)
    if count != 1:
        raise Refusal(f'expected one rearrange(mask, "{OLD}"), found {count}')
    upstream = [(segment, finder.upstream) for segment, finder in zip(segments, finders) if finder.upstream]
    if not upstream:
        return Rewrite(source)
    (segment, calls), = upstream
    splice(lines, segment, segment.module.visit(_Unsqueeze(calls)).code)
    return Rewrite("".join(lines))


PATCH = Patch(
    id="spacewise-mask",
    description="Build the space-wise mask's head axis with unsqueeze in transformer.py (inductor miscompiles it)",
    targets=("transformer",),
    rewrite=rewrite,
)
