"""Make the causal scaler's minimum-scale constant on the device instead of copying it from the host (scaler.py).

Upstream ``compute_causal_statistics`` clamps with ``torch.max(torch.tensor(minimum_scale,
device=...), ...)``: a tensor built on the host and copied to the GPU on every model call.  That copy
waits for the device to finish the work queued before it, and it cannot be recorded into a CUDA
graph, so the ``cuda-graphs`` patch could not capture the prefill.  ``torch.full((), minimum_scale,
device=...)`` makes the same value (a Python float in the default dtype, like ``torch.tensor``) with a
fill on the device: bit-identical results, one host-device wait less per model call in eager.

Exactly one such call must be found (or its patched form); anything else is refused.
"""
from __future__ import annotations

import ast

import libcst as cst

from totopatch.patches._cst import parse_statements, splice
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

NAME = "minimum_scale"
UPSTREAM = f"torch.tensor({NAME}, device=...)"
PATCHED = f"torch.full((), {NAME}, device=...)"


def _is_torch(func: cst.BaseExpression, attr: str) -> bool:
    return (isinstance(func, cst.Attribute) and func.attr.value == attr and isinstance(func.value, cst.Name)
            and func.value.value == "torch")


def _is_name(arg: cst.Arg, value: str) -> bool:
    return arg.keyword is None and not arg.star and isinstance(arg.value, cst.Name) and arg.value.value == value


def _is_device(arg: cst.Arg) -> bool:
    return arg.keyword is not None and arg.keyword.value == "device" and not arg.star


def _is_upstream(node: cst.Call) -> bool:
    """``torch.tensor(minimum_scale, device=<any>)``, nothing else."""
    args = node.args
    return _is_torch(node.func, "tensor") and len(args) == 2 and _is_name(args[0], NAME) and _is_device(args[1])


def _is_patched(node: cst.Call) -> bool:
    """``torch.full((), minimum_scale, device=<any>)``."""
    args = node.args
    empty = len(args) == 3 and args[0].keyword is None and not args[0].star and \
        isinstance(args[0].value, cst.Tuple) and not args[0].value.elements
    return _is_torch(node.func, "full") and empty and _is_name(args[1], NAME) and _is_device(args[2])


class _Find(cst.CSTVisitor):
    def __init__(self) -> None:
        self.upstream: list[cst.Call] = []
        self.patched = 0

    def visit_Call(self, node: cst.Call) -> bool:
        if _is_patched(node):
            self.patched += 1
        elif _is_upstream(node):
            self.upstream.append(node)
        return True


class _OnDevice(cst.CSTTransformer):
    def __init__(self, targets: list[cst.Call]) -> None:
        self.targets = {id(t) for t in targets}

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        if id(original_node) not in self.targets:
            return updated_node
        func = updated_node.func
        assert isinstance(func, cst.Attribute)
        shape = cst.Arg(cst.Tuple(elements=[]), comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        return updated_node.with_changes(func=func.with_changes(attr=cst.Name("full")),
                                         args=[shape, *updated_node.args])


def _may_match(node: ast.AST) -> bool:
    """Python's view of the calls ``_Find`` looks at: only their statements are parsed with LibCST."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("tensor", "full")


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    lines, segments = parse_statements(source, NAME, _may_match)
    finders = []
    for segment in segments:
        finder = _Find()
        segment.module.visit(finder)
        finders.append(finder)
    count = sum(len(f.upstream) + f.patched for f in finders)
    if count != 1:
        raise Refusal(f"expected one {UPSTREAM} (or {PATCHED}), found {count}")
    upstream = [(segment, finder.upstream) for segment, finder in zip(segments, finders) if finder.upstream]
    if not upstream:
        return Rewrite(source)
    (segment, calls), = upstream
    splice(lines, segment, segment.module.visit(_OnDevice(calls)).code)
    return Rewrite("".join(lines))


PATCH = Patch(
    id="scaler-constant",
    description="Make the scaler's minimum-scale constant on the device, not copied from the host (scaler.py)",
    targets=("scaler",),
    rewrite=rewrite,
)
