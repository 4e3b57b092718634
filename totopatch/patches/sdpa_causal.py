"""Hand SDPA a plain bool for ``is_causal`` in Toto's attention.py.

Upstream passes ``is_causal=(attention_mask is None and seq_pos_offset == 0)``.  Once the KV
cache length is symbolic, that expression is a SymBool and ``scaled_dot_product_attention``
breaks the graph on it.  Wrapped as ``True if (...) else False`` the branch makes dynamo guard
on the comparison instead, so prefill and decode each compile to one graph with a constant.
The value is the same in eager.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from totopatch.patches._cst import lines_of, parse
from totopatch.spec import Options, Patch, Refusal, Rewrite

_CAUSAL_ARG = m.Arg(keyword=m.Name("is_causal"))
_SYMBOLIC = m.BooleanOperation(
    left=m.Comparison(left=m.Name("attention_mask"), comparisons=[m.ComparisonTarget(operator=m.Is(), comparator=m.Name("None"))]),
    operator=m.And(),
    right=m.Comparison(left=m.Name("seq_pos_offset"), comparisons=[m.ComparisonTarget(operator=m.Equal(), comparator=m.Integer("0"))]),
)
_PLAIN = m.IfExp(test=_SYMBOLIC, body=m.Name("True"), orelse=m.Name("False"))


class _FindCausalArgs(cst.CSTVisitor):
    def __init__(self) -> None:
        self.symbolic: list[cst.Arg] = []
        self.plain: list[cst.Arg] = []
        self.other: list[cst.Arg] = []

    def visit_Call(self, node: cst.Call) -> None:
        if not m.matches(node.func, m.Name("scaled_dot_product_attention")):
            return
        for arg in node.args:
            if not m.matches(arg, _CAUSAL_ARG):
                continue
            if m.matches(arg.value, _SYMBOLIC):
                self.symbolic.append(arg)
            elif m.matches(arg.value, _PLAIN):
                self.plain.append(arg)
            elif not m.matches(arg.value, m.Name("False") | m.Name("True")):
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


def rewrite(source: str, options: Options) -> Rewrite:
    module = parse(source)
    finder = _FindCausalArgs()
    module.visit(finder)
    if finder.other:
        raise Refusal("scaled_dot_product_attention gets an is_causal expression this patch does not know",
                      lines_of(module, finder.other))
    if len(finder.symbolic) + len(finder.plain) != 1:
        raise Refusal(f"expected one SDPA call with is_causal=(attention_mask is None and seq_pos_offset == 0), "
                      f"found {len(finder.symbolic) + len(finder.plain)}")
    if not finder.symbolic:
        return Rewrite(source)
    return Rewrite(module.visit(_MakePlain(finder.symbolic)).code)


PATCH = Patch(
    id="sdpa-causal",
    description="Pass SDPA a plain bool for is_causal in attention.py (no SymBool graph break)",
    targets=("attention",),
    rewrite=rewrite,
)
