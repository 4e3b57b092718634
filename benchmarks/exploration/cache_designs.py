"""Candidate compile-friendly KV cache designs for Toto, installed by monkeypatching.

These are prototypes for the design exploration (``explore_designs.py`` beside this file);
the shipped patch is the LibCST rewrite in ``totopatch/patches/kv_cache.py``.  Nothing here copies
Toto's source: each design subclasses the installed ``toto.model.util.KVCache`` and
overrides only what it must.

Designs
-------
``naive``   the upstream prototype: every cache method wrapped in ``torch.compiler.disable``.
``mirror``  host-side int mirrors of the write heads and of the layer->cache map, so length
            queries need no ``.item()``; only ``append`` and ``__getitem__`` are disabled
            (a graph break before each cache write and read, none for length queries).
``static``  fully traceable: host int write heads, buffers taken from a process-wide pool so
            their address is stable across forecasts, marked with
            ``torch._dynamo.mark_static_address`` so cudagraph trees treat them as static and
            allow their in-place mutation; writes by slice assignment, reads by slicing.
``static_ic`` as ``static`` but writes with ``index_copy_`` along the sequence dim.

Extra patches outside ``util.py`` (``--extra``):
``causal``  SDPA's ``is_causal`` gets a plain bool (dynamo guards on ``offset == 0``), not a SymBool.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

DESIGNS = ("none", "naive", "mirror", "static", "static_ic", "static0")
EXTRAS = ("causal",)

# process-wide pool of KV buffers: (shape, dtype, device) -> free [(keys, values)]
_POOL: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
POOL_STATS = {"hits": 0, "misses": 0, "released": 0}


def _take(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    key = (tuple(shape), dtype, str(torch.device(device)))
    free = _POOL.setdefault(key, [])
    if free:
        POOL_STATS["hits"] += 1
        k, v = free.pop()
        k.zero_()
        v.zero_()
    else:
        POOL_STATS["misses"] += 1
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        torch._dynamo.mark_static_address(k)  # unguarded: an address change re-records, no recompile
        torch._dynamo.mark_static_address(v)
    return key, k, v


def _give_back(key: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
    POOL_STATS["released"] += 1
    _POOL.setdefault(key, []).append((k, v))


def _time_layer_map(cache: Any, time_cls: type) -> tuple[tuple[int, ...], int]:
    """layer index -> time-layer slot (0 for space layers, as upstream), and the slot count."""
    slots = [i for i in range(cache.num_layers) if isinstance(cache.transformer_layers[i].attention, time_cls)]
    m = [0] * cache.num_layers
    for slot, layer in enumerate(slots):
        m[layer] = slot
    return tuple(m), max(1, len(slots))


def make_classes(util: Any) -> dict[str, type]:
    base = util.KVCache
    time_cls = util.TimeWiseMultiheadAttention
    disable = torch.compiler.disable

    class NaiveKVCache(base):  # type: ignore[misc, valid-type]
        __getitem__ = disable(base.__getitem__)
        current_len = disable(base.current_len)
        seq_len = disable(base.seq_len)
        append = disable(base.append)
        reset = disable(base.reset)

    class MirrorKVCache(base):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            super().__post_init__()
            self._slot_of, n = _time_layer_map(self, time_cls)
            self._lens = [0] * n

        def current_len(self, cache_idx: int) -> int:
            return self._lens[cache_idx]

        def seq_len(self, layer_idx: int) -> int:
            return self._lens[self._slot_of[layer_idx]]

        @disable
        def append(self, layer_idx: int, kv: Any) -> None:
            slot = self._slot_of[layer_idx]
            keys, values = kv
            dim = 1 if self.use_memory_efficient_attention else 2
            start = self._lens[slot]
            end = start + keys.shape[dim]
            assert end <= self.max_seq_len, f"max_seq_len exceeded {end} > {self.max_seq_len}"
            self._keys[slot].narrow(dim, start, end - start).copy_(keys)
            self._values[slot].narrow(dim, start, end - start).copy_(values)
            self._lens[slot] = end

        @disable
        def __getitem__(self, layer_idx: int) -> Any:
            slot = self._slot_of[layer_idx]
            dim = 1 if self.use_memory_efficient_attention else 2
            end = self._lens[slot]
            return self._keys[slot].narrow(dim, 0, end), self._values[slot].narrow(dim, 0, end)

        def reset(self) -> None:
            self._keys.zero_()
            self._values.zero_()
            self._lens = [0] * len(self._lens)

    class StaticKVCache(base):  # type: ignore[misc, valid-type]
        """Traceable cache: host-side write heads, pooled static-address buffers."""

        _index_copy = False

        def __post_init__(self) -> None:
            assert self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads"
            self._slot_of, n = _time_layer_map(self, time_cls)
            hd = self.embed_dim // self.num_heads
            bv = self.batch_size * self.num_variates
            if self.use_memory_efficient_attention:
                shape = (n, bv, self.max_seq_len, self.num_heads, hd)
            else:
                shape = (n, bv, self.num_heads, self.max_seq_len, hd)
            key, self._keys, self._values = _take(shape, self.dtype, self.device)
            weakref.finalize(self, _give_back, key, self._keys, self._values)
            self._lens = [0] * n

        def current_len(self, cache_idx: int) -> int:
            return self._lens[cache_idx]

        def seq_len(self, layer_idx: int) -> int:
            return self._lens[self._slot_of[layer_idx]]

        def append(self, layer_idx: int, kv: Any) -> None:
            slot = self._slot_of[layer_idx]
            keys, values = kv
            dim = 1 if self.use_memory_efficient_attention else 2
            start = self._lens[slot]
            end = start + keys.shape[dim]
            assert end <= self.max_seq_len, "max_seq_len exceeded"
            if self._index_copy:
                idx = torch.arange(start, end, device=keys.device)
                self._keys[slot].index_copy_(dim, idx, keys)
                self._values[slot].index_copy_(dim, idx, values)
            elif dim == 2:
                self._keys[slot, :, :, start:end] = keys
                self._values[slot, :, :, start:end] = values
            else:
                self._keys[slot, :, start:end] = keys
                self._values[slot, :, start:end] = values
            self._lens[slot] = end

        def __getitem__(self, layer_idx: int) -> Any:
            slot = self._slot_of[layer_idx]
            end = self._lens[slot]
            if self.use_memory_efficient_attention:
                return self._keys[slot, :, :end], self._values[slot, :, :end]
            return self._keys[slot, :, :, :end], self._values[slot, :, :, :end]

        def reset(self) -> None:
            self._keys.zero_()
            self._values.zero_()
            self._lens = [0] * len(self._lens)

    class StaticIndexCopyKVCache(StaticKVCache):
        _index_copy = True

    class StaticZeroKVCache(StaticKVCache):
        """``static`` whose length queries guard on zero: a util.py-only try at a plain-bool
        ``seq_pos_offset == 0`` in attention (prefill sees the constant 0)."""

        def seq_len(self, layer_idx: int) -> int:
            n = self._lens[self._slot_of[layer_idx]]
            if n == 0:
                return 0
            return n

    return {
        "naive": NaiveKVCache,
        "mirror": MirrorKVCache,
        "static": StaticKVCache,
        "static_ic": StaticIndexCopyKVCache,
        "static0": StaticZeroKVCache,
    }


def install(design: str, extras: tuple[str, ...] = ()) -> str:
    """Swap the cache class (and optional extra patches) into the imported ``toto``."""
    import toto.model.attention as attention
    import toto.model.backbone as backbone
    import toto.model.transformer as transformer
    import toto.model.util as util

    notes = []
    if design != "none":
        cls = make_classes(util)[design]
        for mod in (util, backbone, transformer):
            mod.KVCache = cls
        notes.append(f"KVCache={cls.__name__}")
    for extra in extras:
        if extra == "causal":
            _install_causal(attention)
            notes.append("run_attention: is_causal=bool(...)")
        else:
            raise ValueError(f"unknown extra patch {extra!r}")
    return "; ".join(notes) or "unpatched"


def _install_causal(attention: Any) -> None:
    """Hand SDPA a Python bool for ``is_causal`` on the time-wise, SDPA path.

    Upstream computes ``attention_mask is None and seq_pos_offset == 0``; with a symbolic
    offset that is a SymBool and SDPA graph-breaks on it.  ``bool()`` makes dynamo guard
    on the comparison instead (prefill and decode each get one graph)."""
    from torch.nn.functional import scaled_dot_product_attention

    base = attention.BaseMultiheadAttention
    orig = base.run_attention
    time_axis = attention.AttentionAxis.TIME

    def run_attention(self, attention_mask, q, k, v, seq_pos_offset, dropout, seq_len, variate):
        if (
            self.attention_axis == time_axis
            and not self.use_memory_efficient_attention
            and not torch.is_tensor(attention_mask)
        ):
            # an `if` makes dynamo guard on the comparison; bool() alone hands back a SymBool
            causal = False
            if attention_mask is None and seq_pos_offset == 0:
                causal = True
            return scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout, is_causal=causal)
        return orig(self, attention_mask, q, k, v, seq_pos_offset, dropout, seq_len, variate)

    base.run_attention = run_attention
