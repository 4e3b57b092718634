"""The known patches, in the order they are applied; revert walks it backwards.

Modules load lazily, so that ``status`` on an applied tree never imports LibCST.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from totopatch.spec import PatchRef

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# exact: upstream's random numbers (the same samples for a seed); same-law: only the kept steps drawn.
SAMPLING_MODES = ("exact", "same-law")

PATCHES: tuple[PatchRef, ...] = (
    # Not compiled_only: without .item() host syncs eager runs are faster too (same outputs): patched
    # eager 83.7 against 100.7 ms (decode), 25.2 against 33.0 ms (samples), final_h200_20261126.json.
    PatchRef("kv-cache", "kv_cache", ("util", "util_optimized")),
    PatchRef("sdpa-causal", "sdpa_causal", ("attention",), compiled_only=True),
    PatchRef("spacewise-mask", "spacewise_mask", ("transformer",), compiled_only=True),
    # After spacewise-mask, whose edit it stacks on in the same file. Opt-in: on the GPU with torch 2.11 it did not
    # shorten the first compiled call (28.1 s with, 27.2 s without, region_ab_h200_20261128_*); torch 2.13 on CPU
    # compiled 2.4x faster with it (compile_time_cpu_20261128.json).
    PatchRef("layer-region", "layer_region", ("transformer",), default=False, compiled_only=True),
    # The rotary tables once per model call, not per layer: about 200 fewer launches a forecast, same bits.
    PatchRef("rope-cache", "rope_cache", ("rope",)),
    # The two fixes a CUDA graph capture of the prefill needs; eager results stay bit-identical.
    PatchRef("scaler-constant", "scaler_constant", ("scaler",)),
    PatchRef("id-mask-check", "id_mask_check", ("embedding",)),
    # Its sampling option is the forecaster's default; TOTOPATCH_SAMPLING overrides it on every forecast.
    PatchRef("shared-prefill", "shared_prefill", ("forecaster",), env_option="sampling",
             options={"sampling": "exact"}),
    # After shared-prefill, whose block it stacks on in the same file.  Eager only: it steps aside under torch.compile.
    PatchRef("cuda-graphs", "cuda_graphs", ("forecaster",)),
    PatchRef("compile-mode", "compile_mode", ("backtest",), compiled_only=True, env_option="compile_mode",
             options={"compile_mode": "reduce-overhead"}),
)


def by_id(patch_id: str) -> PatchRef | None:
    return next((p for p in PATCHES if p.id == patch_id), None)


# The code every patch's output also goes through: LibCST splicing and line handling, decoding and line splitting.
_HERE = Path(__file__).resolve().parent
SHARED_CODE = (_HERE / "_cst.py", _HERE.parent / "textio.py")


def code_sha256(ref: PatchRef) -> str:
    """sha256 of the code that decides what ``ref`` writes: its module, its templates and the shared helpers.

    Read and hashed, never imported (no LibCST); a manifest entry records it, so a file patched by another
    totopatch version is told apart without running the patch.
    """
    return _code_sha256(ref.module)


@functools.lru_cache(maxsize=None)
def _code_sha256(module: str) -> str:
    own = sorted(name for name in _names() if name == f"{module}.py"
                 or (name.startswith(f"{module}_template") and name.endswith(".txt")))
    digest = hashlib.sha256()
    for path in [_HERE / name for name in own] + list(SHARED_CODE):
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(_file_sha256(path))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(os.listdir(_HERE))


@functools.lru_cache(maxsize=None)
def _file_sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def beneath(ref: PatchRef) -> tuple[PatchRef, ...]:
    """The patches applied before ``ref`` to a file it changes too: the file ``ref`` reads has their edits."""
    earlier = PATCHES[:PATCHES.index(ref)]
    return tuple(p for p in earlier if set(p.targets) & set(ref.targets))
