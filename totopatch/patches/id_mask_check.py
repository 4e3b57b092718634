"""Let a CUDA graph capture the patch embedding: its id-mask check is left to the caller while capturing (embedding.py).

Upstream ``PatchEmbedding.forward`` asserts ``torch.eq(ids.min(-1).values, ids.max(-1).values).all()``
("Patches cannot span multiple datasets").  Reading that answer waits for the device, which is not
allowed while a CUDA graph is being recorded, so the ``cuda-graphs`` patch could not capture the prefill.
The patched assert skips the check only while the id mask's CUDA stream is being captured, and never
under torch.compile (``torch.compiler.is_compiling()`` comes first, so compiled code traces upstream's
check as before); the forecaster's graph path makes upstream's own check (``patchify_id_mask``, same
message) before every replay.  Everywhere else the check runs as upstream's: the same error, and
``python -O`` drops both.

Only an assert of that form inside a method named ``forward`` changes (the module-level
``patchify_id_mask`` keeps its check); exactly one must be found, or its patched form.
"""
from __future__ import annotations

import ast

import libcst as cst

from totopatch.patches._cst import parse_python, parse_statements, splice
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

MESSAGE = "Patches cannot span multiple datasets"


def guard(tensor: str) -> str:
    """The condition under which the check is skipped: ``tensor``'s stream is being captured, outside compile."""
    return (f"{tensor}.is_cuda and not torch.compiler.is_compiling() "
            "and torch.cuda.is_current_stream_capturing()")


# ---------------------------------------------------------------- Python's view: which asserts

def _ast_tensor(test: ast.expr) -> str | None:
    """``X`` of ``torch.eq(X.min(-1).values, X.max(-1).values).all()``, as a dotted name; None for another test."""
    if not (isinstance(test, ast.Call) and not test.args and not test.keywords
            and isinstance(test.func, ast.Attribute) and test.func.attr == "all"):
        return None
    eq = test.func.value
    if not (isinstance(eq, ast.Call) and isinstance(eq.func, ast.Attribute) and eq.func.attr == "eq"
            and isinstance(eq.func.value, ast.Name) and eq.func.value.id == "torch" and len(eq.args) == 2
            and not eq.keywords):
        return None
    names = [_reduced(arg, op) for arg, op in zip(eq.args, ("min", "max"))]
    return names[0] if names[0] is not None and names[0] == names[1] else None


def _reduced(node: ast.expr, op: str) -> str | None:
    """``X`` of ``X.<op>(-1).values``."""
    if not (isinstance(node, ast.Attribute) and node.attr == "values" and isinstance(node.value, ast.Call)):
        return None
    call = node.value
    minus_one = len(call.args) == 1 and not call.keywords and isinstance(call.args[0], ast.UnaryOp) and \
        isinstance(call.args[0].op, ast.USub) and isinstance(call.args[0].operand, ast.Constant) and \
        call.args[0].operand.value == 1
    if not (isinstance(call.func, ast.Attribute) and call.func.attr == op and minus_one):
        return None
    return ast.unparse(call.func.value) if isinstance(call.func.value, (ast.Name, ast.Attribute)) else None


def _is_message(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value == MESSAGE


def _unguarded(test: ast.expr) -> ast.expr:
    """The upstream check inside a patched test ``(<guard>) or <check>``, else the test itself."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or) and len(test.values) == 2:
        return test.values[1]
    return test


def _is_patched_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or) and len(test.values) == 2):
        return False
    tensor = _ast_tensor(test.values[1])
    return tensor is not None and ast.dump(test.values[0]) == ast.dump(ast.parse(guard(tensor), mode="eval").body)


def _forward_asserts(tree: ast.Module) -> tuple[list[ast.Assert], int]:
    """The id-mask asserts in methods named ``forward`` (upstream form), and how many are patched already."""
    upstream, patched = [], 0
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for method in (s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "forward"):
            for node in ast.walk(method):
                if not isinstance(node, ast.Assert) or not _is_message(node.msg):
                    continue
                if _is_patched_test(node.test):
                    patched += 1
                elif _ast_tensor(node.test) is not None:
                    upstream.append(node)
    return upstream, patched


# ---------------------------------------------------------------- LibCST: the edit

class _Guard(cst.CSTTransformer):
    def __init__(self, tensor: str) -> None:
        self.tensor = tensor

    def leave_Assert(self, original_node: cst.Assert, updated_node: cst.Assert) -> cst.Assert:
        left = cst.parse_expression(f"({guard(self.tensor)})")
        test = cst.BooleanOperation(left=left, operator=cst.Or(), right=updated_node.test)
        return updated_node.with_changes(test=test)


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    upstream, patched = _forward_asserts(parse_python(source))
    if len(upstream) + patched != 1:
        lines = tuple(node.lineno for node in upstream)
        raise Refusal(f'expected one `assert torch.eq(ids.min(-1).values, ids.max(-1).values).all(), "{MESSAGE}"` '
                      f"in a forward method, found {len(upstream) + patched}", lines)
    if not upstream:
        return Rewrite(source)
    (node,) = upstream
    where = (node.lineno, node.col_offset)
    lines, segments = parse_statements(source, MESSAGE, lambda n: isinstance(n, ast.Assert)
                                       and (n.lineno, n.col_offset) == where)
    (segment,) = segments
    tensor = _ast_tensor(node.test)
    assert tensor is not None
    splice(lines, segment, segment.module.visit(_Guard(tensor)).code)
    return Rewrite("".join(lines))


PATCH = Patch(
    id="id-mask-check",
    description="Let a CUDA graph capture the patch embedding: its id-mask check moves before replay (embedding.py)",
    targets=("embedding",),
    rewrite=rewrite,
)
