"""The known patches, in the order they are applied (revert walks it backwards)."""
from __future__ import annotations

from totopatch.spec import Patch

from . import compile_mode, kv_cache

PATCHES: tuple[Patch, ...] = (kv_cache.PATCH, compile_mode.PATCH)


def by_id(patch_id: str) -> Patch | None:
    return next((p for p in PATCHES if p.id == patch_id), None)
