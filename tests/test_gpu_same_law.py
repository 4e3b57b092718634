"""Same-law sampling on CUDA, at the users' call, against the installed (unpatched) forecaster.

``forecast(context, prediction_length=1, num_samples=3072, samples_per_batch=384)`` in the Toto-Open-Base
shape with random weights (the output head's scaled as in test_same_law.py), several context lengths;
each side pools a few such calls per context (independent draws of the same law).  The statistics and
the negative controls are test_same_law.py's.  Skipped where CUDA is absent; on the device::

    pytest -m gpu -s tests/test_gpu_same_law.py
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import lawcheck
from test_same_law import ALPHA, GAIN, DTYPES, Sampling, outcome
from test_shared_prefill import forecaster_source, load_forecaster
from totopatch.patches import shared_prefill

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONTEXTS = (512, 1111, 2200)  # the users' series run from 512 to 2,200 points
REPEATS = 8  # calls pooled per context and side: 8 x 3072 samples
CALL = dict(prediction_length=1, num_samples=3072, samples_per_batch=384, use_kv_cache=True)
OFFSET = 100.0  # prices, as in fixtures/prefill/gpu_samples.py


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> ModuleType:
    source = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    return load_forecaster(tmp_path_factory.mktemp("gpu_same_law"), "forecaster_gpu_same_law", source)


@pytest.fixture(scope="module")
def base_model() -> Any:
    from totopatch.smoke import build_model

    model = build_model("base").model
    head = model.output_distribution
    with torch.no_grad():
        for layer in (head.loc_proj, head.scale_proj, head.mixture_weights, head.df):
            layer.weight.mul_(GAIN)
    return model.to("cuda")


def context(length: int) -> Any:
    from totopatch.smoke import make_series

    walk = make_series(1, length, "cuda", seed=length)
    return walk._replace(series=walk.series + OFFSET)


def pooled(forecaster: Any, length: int, seed: int) -> np.ndarray:
    """``REPEATS`` users' calls on one context: ``(variates, 1, REPEATS * 3072)``."""
    torch.manual_seed(seed)
    inputs = context(length)
    calls = [forecaster.forecast(inputs, **CALL).samples for _ in range(REPEATS)]
    samples = torch.cat(calls, dim=-1).reshape(1, 1, -1)
    assert calls[0].shape[-1] == CALL["num_samples"] and bool(torch.isfinite(samples).all())
    return samples.double().cpu().numpy()


def judge(reference: dict[int, np.ndarray], candidate: dict[int, np.ndarray]) -> lawcheck.Judgement:
    quantities = {}
    for length in CONTEXTS:
        quantities |= lawcheck.paired_quantities(reference[length], candidate[length], f"context{length}")
    return lawcheck.judge([lawcheck.compare(name, a, b, ALPHA / len(quantities)) for name, (a, b) in quantities.items()],
                          ALPHA)


@pytest.fixture(scope="module")
def draws(patched, base_model) -> dict[str, dict[int, np.ndarray]]:
    from toto.inference.forecaster import TotoForecaster

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out: dict[str, dict[int, np.ndarray]] = {"upstream": {}, "same-law": {}, **{c: {} for c in lawcheck.CONTROLS}}
    try:
        upstream, ours = TotoForecaster(base_model), patched.TotoForecaster(base_model)
        for i, length in enumerate(CONTEXTS):
            out["upstream"][length] = pooled(upstream, length, 100 + i)
            with Sampling("same-law"):
                out["same-law"][length] = pooled(ours, length, 200 + i)
                for j, control in enumerate(lawcheck.CONTROLS):
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(patched._TotopatchKeptLaw, "of", lawcheck.controlled(patched._TotopatchKeptLaw, control))
                        out[control][length] = pooled(ours, length, 300 + 10 * i + j)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    return out


def test_same_law_at_the_users_shape_has_upstreams_law(draws) -> None:
    verdict = judge(draws["upstream"], draws["same-law"])
    print(verdict.summary(), f"\n  smallest p {verdict.smallest_p(''):.3g}")
    assert verdict.same_law, verdict.summary()


@pytest.mark.parametrize("control", lawcheck.CONTROLS)
def test_each_negative_control_is_rejected_at_the_users_shape(draws, control) -> None:
    verdict = judge(draws["upstream"], draws[control])
    print(control, {length: f"{verdict.smallest_p(f'context{length}/'):.3g}" for length in CONTEXTS},
          f"first threshold {verdict.first_threshold:.3g}")
    for length in CONTEXTS:
        assert verdict.rejects(f"context{length}/"), f"{control} not rejected at context {length}:\n{verdict.summary()}"


def test_warm_forecast_time_exact_and_same_law(patched, base_model) -> None:
    """Not a goal check: the figures of this device, printed for the record (same process, alternating)."""
    forecaster = patched.TotoForecaster(base_model)
    inputs = context(1024)
    times: dict[str, list[float]] = {"exact": [], "same-law": []}
    for _ in range(6):
        for mode in times:
            with Sampling(mode):
                forecaster.forecast(inputs, **CALL)  # warm
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(5):
                    forecaster.forecast(inputs, **CALL)
                torch.cuda.synchronize()
                times[mode].append((time.perf_counter() - start) / 5 * 1e3)
    print(json.dumps({mode: {"median_ms": float(np.median(t)), "runs_ms": t} for mode, t in times.items()}))
    assert all(np.isfinite(t).all() for t in times.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction", [1, 9])
def test_every_dtype_completes_on_cuda_where_upstream_completes(patched, dtype, prediction) -> None:
    from toto.inference.forecaster import TotoForecaster

    from totopatch.smoke import build_model, make_series

    model = build_model("tiny").model.to("cuda")
    inputs = make_series(2, 24, "cuda", seed=6)
    scope = nullcontext()
    if dtype == "autocast-bfloat16":
        scope = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        model = model.to(dtype)
        inputs = inputs._replace(series=inputs.series.to(dtype))

    def run(forecaster: Any) -> Any:
        torch.manual_seed(7)
        return forecaster.forecast(inputs, prediction_length=prediction, num_samples=12, samples_per_batch=4).samples

    with scope:
        expected = outcome(lambda: run(TotoForecaster(model)))
        with Sampling("same-law"):
            found = outcome(lambda: run(patched.TotoForecaster(model)))
    assert found == expected
