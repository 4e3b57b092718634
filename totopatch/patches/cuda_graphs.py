"""Replay the one-step forecast's prefill from CUDA graphs: a marked block in forecaster.py, after shared-prefill's.

Eager Toto on a GPU is bound by kernel launches: a one-step forecast's prefill is a few hundred small
kernels.  The block of ``cuda_graphs_template.py.txt`` beside this module captures the backbone (scaler,
patch embedding, transformer, unembedding) once per input signature with ``torch.cuda.CUDAGraph``, with no
torch.compile, and replays it for later forecasts of that signature; the output head runs after it,
eagerly, so the distribution is built and checked as upstream builds it.  It rebinds
``_totopatch_prefill``, the one call through which the shared-prefill block runs its prefill, so it stacks
on that block (like layer-region on spacewise-mask) and goes right after it.

The capture needs two small fixes in the model, each its own patch: ``scaler-constant`` (no host copy in the
scaler) and ``id-mask-check`` (the embedding's id-mask check is made before each replay instead of inside
the graph).  Without them a capture fails, which is logged once; forecasts then run eagerly.  At run time
``TOTOPATCH_CUDA_GRAPHS=0`` turns the graph path off.

Found by its markers and the shared-prefill block's; spliced in as whole lines in the file's line
endings, so nothing else in the file changes.
"""
from __future__ import annotations

import ast

from totopatch.patches import shared_prefill
from totopatch.patches._cst import newline_of, parse_python, put_lines, split_lines, template_text
from totopatch.spec import NeedsBase, Options, Patch, Refusal, Rewrite, refuses_deep_trees

BEGIN, END = "# totopatch cuda-graphs: begin", "# totopatch cuda-graphs: end"
VARIABLE = "TOTOPATCH_CUDA_GRAPHS"
_NEEDED_IMPORTS = ("torch", "TotoBackbone")


def _is_ours(text: str) -> bool:
    return "_totopatch_" in text or "_Totopatch" in text or shared_prefill.NEW_CLASS in text


def _ends(lines: list[str], tree: ast.Module, marker: str) -> list[int]:
    """0-based lines that hold ``marker`` and end a top-level statement."""
    tops = {(node.end_lineno or node.lineno) - 1 for node in tree.body}
    return [i for i, line in enumerate(lines) if marker in line and i in tops]


def _marked(lines: list[str], tree: ast.Module, begin: str, end: str, patch_id: str) -> tuple[int, int] | None:
    """0-based first and last line of a marked block; None where there is none."""
    begins = [i for i, line in enumerate(lines) if line.startswith(begin)]
    ends = _ends(lines, tree, end)
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise Refusal(f"damaged {patch_id} block: its begin/end markers do not pair up",
                      tuple(i + 1 for i in begins + ends))
    return begins[0], ends[0]


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _check(lines: list[str], tree: ast.Module, blocks: list[tuple[int, int]]) -> None:
    if missing := [n for n in _NEEDED_IMPORTS if n not in _imported(tree)]:
        raise Refusal(f"the module does not import {', '.join(missing)} at top level, which the CUDA graphs need")
    inside = {i for start, stop in blocks for i in range(start, stop + 1)}
    clash = [i + 1 for i, line in enumerate(lines) if i not in inside and _is_ours(line)]
    if clash:
        raise Refusal("the module already uses a _totopatch_ name outside the shared-prefill and cuda-graphs blocks",
                      tuple(clash))


def _template() -> str:
    return template_text("cuda_graphs_template.py.txt")


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    tree = parse_python(source)
    lines = split_lines(source)
    prefill = _marked(lines, tree, shared_prefill.BEGIN, shared_prefill.END, "shared-prefill")
    if prefill is None:
        raise NeedsBase("no shared-prefill block: the CUDA graphs replay its forecast; apply shared-prefill first")
    block = _marked(lines, tree, BEGIN, END, "cuda-graphs")
    _check(lines, tree, [prefill] + ([block] if block else []))
    newline = newline_of(lines)
    wanted = [line.replace("\n", newline) for line in split_lines(_template())]
    if block is None:
        end = prefill[1] + 1
        return Rewrite(put_lines(lines, end, end, [newline, newline, *wanted]))
    between = [n for n in tree.body if prefill[1] < n.lineno - 1 < block[0]]
    if block[0] < prefill[1] or between:
        raise Refusal("the cuda-graphs block is not right after the shared-prefill block", (block[0] + 1,))
    new = put_lines(lines, block[0], block[1] + 1, wanted)
    if new == source:
        return Rewrite(source)
    return Rewrite(new, ("replaced a cuda-graphs block written by another totopatch version",))


PATCH = Patch(
    id="cuda-graphs",
    description="Replay one-step forecasts from captured CUDA graphs, no torch.compile (forecaster.py)",
    targets=("forecaster",),
    rewrite=rewrite,
)
