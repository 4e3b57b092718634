"""Nothing a patch adds makes a forecast fail that upstream completes; where upstream fails, the error is upstream's.

Upstream's toto and a copy with every default patch applied each answer in a forecast server of their own (a
fresh process, ``fixtures/prefill/forecast_outcomes.py``); the same requests go to both, over dtypes and call
patterns, and the outcomes must be the same: both succeed with the same samples (within a tolerance of the
dtype), or both fail with the same exception type and message.  On this CPU torch has no half-precision gamma,
so half-precision sampling fails in upstream; servers started with ``--gamma-in-float32`` (both trees alike)
stand in for a device that has one, as CUDA does.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import given, settings, strategies as st

from forecast_servers import Request, Server, fully_patched, same_outcome
from test_shared_prefill import RTOL, forecaster_source, load_forecaster
from totopatch.patches import kv_cache, shared_prefill

from conftest import installed_toto_package

# name: (model dtype, autocast dtype or None)
DTYPES = {
    "float32": ("float32", None),
    "float64": ("float64", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "autocast-bfloat16": ("float32", "bfloat16"),
}


def tolerance(name: str) -> float:
    """Relative: the shared-prefill tests' 1e-5 where a dtype carries more than that, else two ulps of the dtype
    (both trees make the same operations on the same values; a kernel that sums in another order at another
    batch size moves a result by its rounding)."""
    model, autocast = DTYPES[name]
    return max(RTOL, 2 * torch.finfo(getattr(torch, autocast or model)).eps)


def request(name: str, **fields: object) -> Request:
    model, autocast = DTYPES[name]
    return Request(dtype=model, autocast=autocast, **fields)  # type: ignore[arg-type]


def assert_same(name: str, before: dict, after: dict) -> None:
    assert after["forecaster"] == "TotoForecasterSharedPrefill" and before["forecaster"] == "TotoForecaster"
    assert same_outcome(before, after), (before.get("error_type"), before.get("error"),
                                         after.get("error_type"), after.get("error"))
    if not before["ok"]:
        return
    assert after["fell_back"] is False  # the shared path itself gave these samples
    for key in ("samples", "mean"):
        a, b = before[key], after[key]
        if a is None:
            assert b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, key
        a, b = a.double(), b.double()
        assert torch.equal(a.isfinite(), b.isfinite()), key
        finite = a.isfinite()
        rel = ((a - b).abs() / a.abs().clamp_min(1e-6))[finite].max().item() if finite.any() else 0.0
        assert rel <= tolerance(name), f"{name} {key}: max relative difference {rel:.3g}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, bool], Server]]:
    """(tree, gamma in float32) -> its server, started on first use: "upstream" or "patched"."""
    patched = fully_patched(tmp_path_factory.mktemp("patched"))
    parents = {"upstream": installed_toto_package().parent, "patched": patched}
    started: dict[tuple[str, bool], Server] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[str, bool]) -> Server:
            tree, gamma = key
            folder = tmp_path_factory.mktemp(f"{tree}-{'float32-gamma' if gamma else 'gamma'}")
            started[key] = self[key] = Server(parents[tree], folder, *(["--gamma-in-float32"] if gamma else []))
            return started[key]

    yield Lazy()
    for server in started.values():
        server.close()


def both(servers: dict, req: Request, gamma: bool = False) -> tuple[dict, dict]:
    return servers["upstream", gamma].ask(req), servers["patched", gamma].ask(req)


# ---------------------------------------------------------------- the example, and the property

@pytest.mark.parametrize("name", ["bfloat16", "float16", "autocast-bfloat16"])
def test_half_precision_fails_with_upstreams_own_error_on_this_cpu(servers, name) -> None:
    """The users' call; upstream stops at torch's missing half-precision gamma, and so does the patched tree."""
    req = request(name, context=37, prediction=1, num_samples=3072, per_batch=384)
    before, after = both(servers, req)
    assert not before["ok"] and before["error_type"] == "NotImplementedError", before
    assert_same(name, before, after)


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_forecasts_as_upstream_where_half_precision_sampling_exists(servers, name) -> None:
    req = request(name, context=37, prediction=1, num_samples=768, per_batch=384)
    before, after = both(servers, req, gamma=True)
    assert before["ok"], before
    assert_same(name, before, after)


# (prediction length, num_samples, samples_per_batch): one step and several; num_samples None is a mean forecast;
# 5 of 2 and 0 of 3 are upstream's own failures (not divisible; no sampling batch to concatenate)
CALLS = [(1, 6, 3), (3, 6, 6), (9, 6, 2), (18, 4, 4), (9, None, 3), (1, 5, 2), (9, 0, 3)]


@settings(max_examples=60, deadline=None, print_blob=True)
@given(name=st.sampled_from(list(DTYPES)), call=st.sampled_from(CALLS), kv=st.booleans(),
       variates=st.sampled_from([1, 3]), context=st.sampled_from([29, 37]), gamma=st.booleans())
def test_every_call_has_upstreams_outcome(servers, name, call, kv, variates, context, gamma) -> None:
    prediction, num_samples, per_batch = call
    req = request(name, prediction=prediction, num_samples=num_samples, per_batch=per_batch, kv=kv,
                  variates=variates, context=context)
    assert_same(name, *both(servers, req, gamma))


@pytest.mark.slow
def test_a_forecaster_compiled_whole_runs_as_upstream(servers) -> None:
    """torch.compile over ``forecast`` itself traces the patches' code, where torch forbids its hints.

    The oracle is upstream's eager forecast of the same request: dynamo with the eager backend runs the same
    operations, and tracing upstream's whole forecast too would double this test's 25 s of tracing."""
    req = request("float32", context=32, prediction=5, num_samples=6, per_batch=3)
    before = servers["upstream", False].ask(req)
    after = servers["patched", False].ask(dataclasses.replace(req, compiled=True))
    assert_same("float32", before, after)


# ---------------------------------------------------------------- the parts, in this process


@pytest.fixture(scope="module")
def patched_module(tmp_path_factory):
    source = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    module = load_forecaster(tmp_path_factory.mktemp("outcomes"), "forecaster_outcomes", source)
    sys.modules[module.__name__] = module  # torch.compile looks a traced function's module up by name
    yield module
    del sys.modules[module.__name__]


def gamma_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributions.gamma as gamma

    native = gamma._standard_gamma
    monkeypatch.setattr(gamma, "_standard_gamma", lambda c: native(c.float()).to(c.dtype))


@pytest.mark.parametrize("float32_gamma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_kept_steps_check_never_raises_and_holds_wherever_sampling_does(patched_module, monkeypatch, dtype,
                                                                            float32_gamma) -> None:
    from gluonts.torch.distributions.studentT import StudentT

    if float32_gamma:
        gamma_in_float32(monkeypatch)
    shape = patched_module.TotoForecaster.create_affine_transformed
    kind = type(patched_module._totopatch_probe_mixture(shape, StudentT, torch.device("cpu"), torch.float32))
    cpu = torch.device("cpu")
    torch.manual_seed(7)
    stream = torch.rand(4)
    torch.manual_seed(7)
    agrees = patched_module._totopatch_tail_agrees(shape, kind, StudentT, cpu, dtype)
    assert torch.equal(torch.rand(4), stream)  # the generator as it was
    if dtype in (torch.bfloat16, torch.float16) and not float32_gamma:
        assert agrees is False  # torch cannot sample here: sample() then fails as upstream's does
        return
    distr = patched_module._totopatch_probe_mixture(shape, StudentT, cpu, dtype)
    torch.manual_seed(1234)
    expected = distr.sample()[:, :, -4:]
    torch.manual_seed(1234)
    assert agrees is torch.equal(patched_module._totopatch_tail_of_mixture(distr, 4), expected)
    assert agrees or dtype not in (torch.float32, torch.float64)  # full precision keeps the faster sampler


def test_a_failing_shared_path_hands_the_forecast_to_upstream_from_the_same_random_state(patched_module,
                                                                                        monkeypatch) -> None:
    from toto.inference.forecaster import TotoForecaster

    from totopatch.smoke import build_model, make_series

    model, walk = build_model("tiny").model, make_series(3, 32, "cpu")
    torch.manual_seed(5)
    expected = TotoForecaster(model).forecast(walk, prediction_length=6, num_samples=6, samples_per_batch=3).samples

    def broken(self, *args, **kwargs):
        torch.rand(100)  # draws, then fails
        raise RuntimeError("a bug in the shared path")

    monkeypatch.setattr(patched_module.TotoForecaster, "_totopatch_shared_samples", broken)
    failures = patched_module._totopatch_fallbacks["count"]
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="a bug in the shared path"):
        found = patched_module.TotoForecaster(model).forecast(walk, prediction_length=6, num_samples=6,
                                                              samples_per_batch=3).samples
    assert torch.equal(found, expected)
    assert patched_module._totopatch_fallbacks["count"] == failures + 1


def test_arguments_upstream_refuses_get_upstreams_error(patched_module) -> None:
    from toto.inference.forecaster import TotoForecaster

    from totopatch.smoke import build_model

    model = build_model("tiny").model
    errors = []
    for cls in (TotoForecaster, patched_module.TotoForecaster):
        with pytest.raises(TypeError) as raised:
            cls(model).generate_samples(torch.zeros(1, 1, 8), prediction_length=4)
        errors.append(str(raised.value))
    assert errors[0] == errors[1]


def test_the_kv_cache_overflow_is_upstreams_assertion(tmp_path, monkeypatch) -> None:
    import toto.model.backbone as backbone

    from totopatch.smoke import build_model

    util = (installed_toto_package() / "model" / "util.py").read_text()
    patched = load_forecaster(tmp_path, "util_overflow", kv_cache.rewrite(util, {}).source)
    model = build_model("tiny").model
    messages = []
    for cls in (backbone.KVCache, patched.KVCache):
        monkeypatch.setattr(backbone, "KVCache", cls)
        cache = model.allocate_kv_cache(batch_size=1, num_variates=1, max_time_steps=8, device="cpu",
                                        dtype=torch.float32)
        keys = torch.zeros(1, 9, 4, 8) if cache.use_memory_efficient_attention else torch.zeros(1, 4, 9, 8)
        with pytest.raises(AssertionError) as raised:  # 9 steps into a cache of 8
            cache.append(0, (keys, keys))
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and messages[0].startswith("max_seq_len exceeded")


def test_hints_inside_code_torch_compile_traces_step_aside(patched_module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.compile(lambda x: (patched_module._totopatch_dynamic_time(x), x + 1)[1], backend="eager")
        assert torch.equal(traced(torch.ones(2, 5)), torch.full((2, 5), 2.0))


def test_a_cache_made_inside_traced_code_works_as_upstreams(tmp_path, monkeypatch) -> None:
    """torch.compile over code that allocates the cache: the patched cache's hints and pool step aside."""
    import toto.model.backbone as backbone

    from totopatch.smoke import build_model

    util = (installed_toto_package() / "model" / "util.py").read_text()
    patched = load_forecaster(tmp_path, "util_traced", kv_cache.rewrite(util, {}).source)
    monkeypatch.setitem(sys.modules, patched.__name__, patched)  # torch.compile looks modules up by name
    model = build_model("tiny").model
    keys = torch.randn(1, 4, 2, 8)  # two patches: all the cache holds

    def filled(values: torch.Tensor) -> torch.Tensor:
        cache = model.allocate_kv_cache(batch_size=1, num_variates=1, max_time_steps=8, device="cpu",
                                        dtype=torch.float32)
        cache.append(0, (values, values))
        return cache[0][0] * 1.0

    found = []
    for cls in (backbone.KVCache, patched.KVCache):
        monkeypatch.setattr(backbone, "KVCache", cls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._dynamo.reset()
            found.append(torch.compile(filled, backend="eager")(keys))
    assert torch.equal(found[0], found[1]) and torch.equal(found[1], keys)
