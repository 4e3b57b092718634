"""Make the rotary position tables once per model call, not once per layer (rope.py).

Toto's ``TimeAwareRotaryEmbedding.rotate_queries_and_keys`` makes its positions, frequencies and xpos scale
afresh in every time-wise layer, though one model call gives every layer the same ones: about 20 small
kernels a layer, 200 of the roughly 1,240 operations of a one-step forecast in the Toto-Open-Base shape.
Eager Toto on a GPU is bound by kernel launches, so each costs time.  The block of
``rope_cache_template.py.txt`` beside this module wraps the method: the tables are made by the same calls
and kept for one model call, in a scope that shared-prefill's block opens around each call it makes (inside
the cuda-graphs captures too), per key (shape, offset, dtype, device, the buffers' addresses and versions,
autocast, grad and inference mode, stream); outside a scope the method is upstream's.  The first call per
device, dtype and layout also runs upstream's method and compares the bits; where they differ, upstream's
method runs from then on.  Under torch.compile the method is upstream's.

Found by its markers; spliced in as whole lines after the class, in the file's line endings, so nothing else
in the file changes.
"""
from __future__ import annotations

import ast

from totopatch.patches._cst import (line_block, parse_python, put_block_after, split_lines, template_lines, template_text,
                                    top_level_imports)
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

BEGIN, END = "# totopatch rope-cache: begin", "# totopatch rope-cache: end"
CLASS, METHOD = "TimeAwareRotaryEmbedding", "rotate_queries_and_keys"
PARAMETERS = ("self", "q", "k", "seq_dim", "seq_pos", "seq_pos_offset")
_NEEDED_IMPORTS = ("torch", "apply_rotary_emb")


def _class(tree: ast.Module) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CLASS]
    if len(found) != 1:
        raise Refusal(f"expected one top-level class {CLASS}, found {len(found)}")
    methods = [n for n in found[0].body if isinstance(n, ast.FunctionDef) and n.name == METHOD]
    if len(methods) != 1:
        raise Refusal(f"expected one method {CLASS}.{METHOD}, found {len(methods)}", (found[0].lineno,))
    args = methods[0].args
    names = tuple(a.arg for a in args.posonlyargs + args.args)
    if names != PARAMETERS or args.vararg or args.kwarg or args.kwonlyargs:
        raise Refusal(f"{CLASS}.{METHOD} takes ({', '.join(names)}), expected ({', '.join(PARAMETERS)})",
                      (methods[0].lineno,), at=True)
    return found[0]


def _template() -> str:
    return template_text("rope_cache_template.py.txt")


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    tree = parse_python(source)
    lines = split_lines(source)
    cls = _class(tree)
    if missing := [n for n in _NEEDED_IMPORTS if n not in top_level_imports(tree)]:
        raise Refusal(f"the module does not import {', '.join(missing)} at top level, which the rope cache needs")
    block = line_block(lines, tree, BEGIN, END, "rope-cache")
    inside = set() if block is None else set(range(block[0], block[1] + 1))
    clash = [i + 1 for i, line in enumerate(lines) if i not in inside and "_totopatch_" in line]
    if clash:
        raise Refusal("the module already uses a _totopatch_ name outside the rope-cache block", tuple(clash))
    anchor = (cls.end_lineno or cls.lineno) - 1
    new, notes = put_block_after(source, lines, tree, anchor, block, template_lines(_template(), lines), "rope-cache",
                                 f"class {CLASS}")
    return Rewrite(new, notes)


PATCH = Patch(
    id="rope-cache",
    description="Make the rotary position tables once per model call, not in every layer (rope.py)",
    targets=("rope",),
    rewrite=rewrite,
)
