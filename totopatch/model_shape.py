"""The Toto model shapes used by the smoke test and the benchmarks, defined once.

``base`` is the shape of Toto-Open-Base-1.0 (12 layers of width 768, patch 64, 24 Student-t
components); ``tiny`` is a 4-layer model for CPU tests.  Both use dropout 0 and the SDPA attention
path (no xformers).  ``stabilize_with_global`` and ``scale_factor_exponent`` are passed explicitly with
the values toto-ts 0.1.3 to 0.2.0 take by default (True, 10.0), which are also the values the committed
GPU benchmark figures were measured with.
"""
from __future__ import annotations

from typing import Any

SCALER = "<class 'model.scaler.CausalPatchStdMeanScaler'>"
DISTRIBUTION = "<class 'model.distribution.MixtureOfStudentTsOutput'>"

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(patch_size=4, embed_dim=32, num_layers=4, num_heads=4, mlp_hidden_dim=64,
                 spacewise_every_n_layers=2, k_components=2, variates=3, context_length=32),
    "base": dict(patch_size=64, embed_dim=768, num_layers=12, num_heads=12, mlp_hidden_dim=3072,
                 spacewise_every_n_layers=12, k_components=24, variates=8, context_length=512),
}


def toto_kwargs(shape: str) -> dict[str, Any]:
    """The keyword arguments of ``toto.model.toto.Toto(...)`` for ``shape``."""
    s = SHAPES[shape]
    return dict(patch_size=s["patch_size"], stride=s["patch_size"], embed_dim=s["embed_dim"],
                num_layers=s["num_layers"], num_heads=s["num_heads"], mlp_hidden_dim=s["mlp_hidden_dim"],
                dropout=0.0, spacewise_every_n_layers=s["spacewise_every_n_layers"], scaler_cls=SCALER,
                output_distribution_classes=[DISTRIBUTION],
                output_distribution_kwargs={"k_components": s["k_components"]},
                spacewise_first=True, use_memory_efficient_attention=False,
                stabilize_with_global=True, scale_factor_exponent=10.0)
