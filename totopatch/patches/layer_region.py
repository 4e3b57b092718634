"""Compile Toto's transformer layer once and stamp it out for every layer: a marked block in transformer.py.

torch.compile of the whole model traces and lowers all twelve layers one after the other, although
they differ only in their weights.  The block of ``layer_region_template.py.txt`` beside this module
subclasses the layer class and, when no KV cache is passed, runs its forward as a
``torch.compiler.nested_compile_region`` (torch 2.8 and later; a plain call elsewhere and in eager),
which torch.compile compiles the first time and reuses for each later layer of the same kind.  The
layer index is only read together with a KV cache, so the region leaves it out.  The original name
is then rebound to the subclass, so ``Transformer`` builds its layers from it.

Toto calls its layers without a cache where nothing is decoded after the prefill (the
shared-prefill patch's single-step forecasts, ``use_kv_cache=False``); with a cache the layers
run exactly as upstream.

The layer class is found by structure (a ``forward(self, layer_idx, inputs, attention_mask,
kv_cache)``), with Python's own parser; the block is spliced in as whole lines, in the file's
line endings, so nothing else in the file changes.
"""
from __future__ import annotations

import ast

from totopatch.patches._cst import line_block, parse_python, put_block_after, split_lines, template_lines, template_text
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

NEW_CLASS = "TransformerLayerCompiledOnce"
BEGIN, END = "# totopatch layer-region: begin", "# totopatch layer-region: end"
_BASE = "__LAYER_BASE__"
FORWARD = ("self", "layer_idx", "inputs", "attention_mask", "kv_cache")


def _params(function: ast.FunctionDef) -> tuple[str, ...] | None:
    """The plain positional parameter names, or None where there is ``*``, ``**`` or keyword-only."""
    args = function.args
    if args.vararg or args.kwarg or args.kwonlyargs:
        return None
    return tuple(a.arg for a in args.posonlyargs + args.args)


def _is_layer(node: ast.stmt) -> bool:
    return isinstance(node, ast.ClassDef) and any(
        isinstance(s, ast.FunctionDef) and s.name == "forward" and _params(s) == FORWARD for s in node.body)


def _find_layer(tree: ast.Module, block: tuple[int, int] | None) -> ast.ClassDef:
    inside = range(block[0], block[1] + 1) if block else range(0)
    found = [n for n in tree.body if _is_layer(n) and n.lineno - 1 not in inside]
    if not found:
        raise Refusal(f"no transformer layer class: expected a class with forward({', '.join(FORWARD)})")
    if len(found) > 1:
        names = ", ".join(n.name for n in found)  # type: ignore[attr-defined]
        raise Refusal(f"ambiguous: {len(found)} transformer layer classes ({names})", tuple(n.lineno for n in found))
    return found[0]  # type: ignore[return-value]


def _imports_torch(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "torch" and a.asname is None for a in n.names)
               for n in tree.body)


def _check_names(lines: list[str], block: tuple[int, int] | None) -> None:
    inside = range(block[0], block[1] + 1) if block else range(0)
    clash = [i + 1 for i, line in enumerate(lines) if i not in inside and (NEW_CLASS in line or "_totopatch_" in line)]
    if clash:
        raise Refusal(f"the module already uses the name {NEW_CLASS} or a _totopatch_ name outside a "
                      "layer-region block", tuple(clash))


def _template() -> str:
    return template_text("layer_region_template.py.txt")


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    tree = parse_python(source)
    lines = split_lines(source)
    block = line_block(lines, tree, BEGIN, END, "layer-region")
    layer = _find_layer(tree, block)
    _check_names(lines, block)
    if not _imports_torch(tree):
        raise Refusal("the module does not import torch at top level, which the layer region needs")
    anchor = (layer.end_lineno or layer.lineno) - 1
    wanted = template_lines(_template().replace(_BASE, layer.name), lines)  # for a layer class of that name
    new, notes = put_block_after(source, lines, tree, anchor, block, wanted, "layer-region", f"class {layer.name}")
    return Rewrite(new, notes)


PATCH = Patch(
    id="layer-region",
    description="Compile the transformer layer once and reuse it for every layer (transformer.py)",
    targets=("transformer",),
    rewrite=rewrite,
)
