"""The known patches, in the order they are applied; revert walks it backwards.

Modules load lazily, so that ``status`` on an applied tree never imports LibCST.
"""
from __future__ import annotations

from totopatch.spec import PatchRef

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

PATCHES: tuple[PatchRef, ...] = (
    PatchRef("kv-cache", "kv_cache", ("util", "util_optimized")),
    PatchRef("sdpa-causal", "sdpa_causal", ("attention",)),
    PatchRef("spacewise-mask", "spacewise_mask", ("transformer",)),
    PatchRef("shared-prefill", "shared_prefill", ("forecaster",)),
    PatchRef("compile-mode", "compile_mode", ("backtest",)),
)


def by_id(patch_id: str) -> PatchRef | None:
    return next((p for p in PATCHES if p.id == patch_id), None)
