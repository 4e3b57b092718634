"""Hand SDPA a plain bool for ``is_causal`` in Toto's attention.py.

Upstream passes ``is_causal=(attention_mask is None and seq_pos_offset == 0)``.  Once the KV
cache length is symbolic, that expression is a SymBool and ``scaled_dot_product_attention``
breaks the graph on it.  Wrapped as ``True if (...) else False`` the branch makes dynamo guard
on the comparison instead, so prefill and decode each compile to one graph with a constant.
The value is the same in eager.
"""
from __future__ import annotations

import ast

import libcst as cst

from totopatch.patches._cst import parse_statements, segment_lines, splice
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

SDPA = "scaled_dot_product_attention"


def _is_name(node: cst.CSTNode, *values: str) -> bool:
    return isinstance(node, cst.Name) and node.value in values


def _compares(node: cst.BaseExpression, left: str, operator: type, right: str) -> bool:
    """``<left> <operator> <right>`` with a single comparison."""
    if not isinstance(node, cst.Comparison) or len(node.comparisons) != 1 or not _is_name(node.left, left):
        return False
    target = node.comparisons[0]
    value = target.comparator
    right_ok = _is_name(value, right) or (isinstance(value, cst.Integer) and value.value == right)
    return isinstance(target.operator, operator) and right_ok


def _is_symbolic(node: cst.BaseExpression) -> bool:
    """``attention_mask is None and seq_pos_offset == 0`` (however parenthesised)."""
    return (isinstance(node, cst.BooleanOperation) and isinstance(node.operator, cst.And)
            and _compares(node.left, "attention_mask", cst.Is, "None")
            and _compares(node.right, "seq_pos_offset", cst.Equal, "0"))


def _is_plain(node: cst.BaseExpression) -> bool:
    """``True if (<symbolic>) else False``."""
    return (isinstance(node, cst.IfExp) and _is_symbolic(node.test) and _is_name(node.body, "True")
            and _is_name(node.orelse, "False"))


class _FindCausalArgs(cst.CSTVisitor):
    def __init__(self) -> None:
        self.symbolic: list[cst.Arg] = []
        self.plain: list[cst.Arg] = []
        self.other: list[cst.Arg] = []

    def visit_Call(self, node: cst.Call) -> None:
        if not _is_name(node.func, SDPA):
            return
        for arg in node.args:
            if arg.keyword is None or arg.keyword.value != "is_causal":
                continue
            if _is_symbolic(arg.value):
                self.symbolic.append(arg)
            elif _is_plain(arg.value):
                self.plain.append(arg)
            elif not _is_name(arg.value, "False", "True"):
                self.other.append(arg)


class _MakePlain(cst.CSTTransformer):
    def __init__(self, targets: list[cst.Arg]) -> None:
        self.targets = {id(a) for a in targets}

    def leave_Arg(self, original_node: cst.Arg, updated_node: cst.Arg) -> cst.Arg:
        if id(original_node) not in self.targets:
            return updated_node
        value = updated_node.value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        plain = cst.IfExp(test=value, body=cst.Name("True"), orelse=cst.Name("False"),
                          lpar=updated_node.value.lpar, rpar=updated_node.value.rpar)
        return updated_node.with_changes(value=plain)


def _may_call_sdpa(node: ast.AST) -> bool:
    """Python's view of the calls ``_FindCausalArgs`` looks at: only their statements are parsed with LibCST."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == SDPA


def _find(module: cst.Module) -> _FindCausalArgs:
    finder = _FindCausalArgs()
    module.visit(finder)
    return finder


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    lines, segments = parse_statements(source, SDPA, _may_call_sdpa)
    finders = [_find(segment.module) for segment in segments]
    if other := [arg for finder in finders for arg in finder.other]:
        raise Refusal(f"{SDPA} gets an is_causal expression this patch does not know",
                      segment_lines(segments, other))
    count = sum(len(finder.symbolic) + len(finder.plain) for finder in finders)
    if count != 1:
        raise Refusal(f"expected one SDPA call with is_causal=(attention_mask is None and seq_pos_offset == 0), "
                      f"found {count}")
    symbolic = [(segment, finder.symbolic) for segment, finder in zip(segments, finders) if finder.symbolic]
    if not symbolic:
        return Rewrite(source)
    (segment, args), = symbolic
    splice(lines, segment, segment.module.visit(_MakePlain(args)).code)
    return Rewrite("".join(lines))


PATCH = Patch(
    id="sdpa-causal",
    description="Pass SDPA a plain bool for is_causal in attention.py (no SymBool graph break)",
    targets=("attention",),
    rewrite=rewrite,
)
