"""shared-prefill's same-law sampling: upstream's distribution drawn only where the forecast keeps it.

The statistical proof compares, forecast by forecast, the mode's samples with upstream's (the real
forecaster in one case; elsewhere the patched forecaster's exact mode, which gives upstream's samples
for a seed: test_shared_prefill.py) by the statistics of ``lawcheck``, corrected for their number.
Negative controls, the mode with one known fault each, must be rejected by the same statistics in
every forecast: that is what shows the statistics could see such a fault.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lawcheck
from conftest import snapshot
from test_shared_prefill import forecaster_source, load_forecaster
from test_versions import package
from totopatch.patches import SAMPLING_MODES, shared_prefill
from totopatch.spec import Refusal

ALPHA = 1e-3  # family-wise: Holm over the p-values, and the DKW bounds of the quantile checks (Bonferroni)
MARGIN = 1e3  # a control's smallest p-value in each forecast is at least this far below Holm's first threshold
GAIN = 3.0  # the output head's random weights times this: components and weights as distinct as a trained model's


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> ModuleType:
    source = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    return load_forecaster(tmp_path_factory.mktemp("same_law"), "forecaster_same_law", source)


class Sampling:
    """``TOTOPATCH_SAMPLING`` set for a block, and restored after it."""

    def __init__(self, mode: str | None) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self.before = os.environ.get("TOTOPATCH_SAMPLING")
        if self.mode is None:
            os.environ.pop("TOTOPATCH_SAMPLING", None)
        else:
            os.environ["TOTOPATCH_SAMPLING"] = self.mode

    def __exit__(self, *exc: object) -> None:
        if self.before is None:
            os.environ.pop("TOTOPATCH_SAMPLING", None)
        else:
            os.environ["TOTOPATCH_SAMPLING"] = self.before


def mixture_model(seed: int, components: int) -> Any:
    """A tiny random-weight Toto whose output is a mixture of ``components`` Student-Ts.

    With the constructor's initialisation the components nearly coincide and the weights are near
    uniform, so that no statistic could tell permuted weights apart; the head's weights are scaled up.
    """
    from toto.model.toto import Toto

    from totopatch.model_shape import toto_kwargs

    torch.manual_seed(seed)
    kwargs = toto_kwargs("tiny") | {"output_distribution_kwargs": {"k_components": components}}
    model = Toto(**kwargs).model.eval()
    head = model.output_distribution
    with torch.no_grad():
        for layer in (head.loc_proj, head.scale_proj, head.mixture_weights, head.df):
            layer.weight.mul_(GAIN)
    return model


def series(variates: int, context: int, batch: int, seed: int) -> Any:
    from toto.data.util.dataset import MaskedTimeseries

    from totopatch.smoke import make_series

    parts = [make_series(variates, context, "cpu", seed=seed + b) for b in range(batch)]
    if batch == 1:
        return parts[0]
    return MaskedTimeseries(*(torch.stack(f) if torch.is_tensor(f[0]) else f[0] for f in zip(*parts)))


@dataclass(frozen=True)
class Case:
    name: str
    model_seed: int
    components: int
    variates: int
    context: int  # not a multiple of the patch (4) in most cases: the forecaster pads it
    prediction: int
    batch: int
    samples: int
    per_batch: int
    reference: str  # "upstream": the installed forecaster; "exact": the patched one's exact mode
    kv: bool = True


ONE_STEP = [
    Case("upstream-v1-c21-p1", 0, 2, 1, 21, 1, 1, 10_000, 2_000, "upstream"),
    Case("v2-c37-p4", 1, 3, 2, 37, 4, 1, 20_000, 2_000, "exact"),
    Case("v3-c16-p4", 2, 2, 3, 16, 4, 1, 20_000, 4_000, "exact"),
    Case("b2-v1-c30-p2", 3, 3, 1, 30, 2, 2, 20_000, 2_000, "exact"),
]
MULTI_STEP = [Case("multi-b2-v2-c22-p9", 4, 2, 2, 22, 9, 2, 4_000, 1_000, "exact")]


def forecast(forecaster: Any, case: Case, seed: int) -> np.ndarray:
    """The case's samples as ``(batch, variates, steps, samples)``."""
    torch.manual_seed(seed)
    inputs = series(case.variates, case.context, case.batch, seed=10 * case.model_seed + 1)
    samples = forecaster.forecast(inputs, prediction_length=case.prediction, num_samples=case.samples,
                                  samples_per_batch=case.per_batch, use_kv_cache=case.kv).samples
    samples = samples.reshape(case.batch, *samples.shape[-3:])
    assert samples.shape == (case.batch, case.variates, case.prediction, case.samples)
    return samples.numpy()


def compare(case: Case, reference: np.ndarray, candidate: np.ndarray, count: int) -> list[lawcheck.Comparison]:
    quantities = {}
    for b in range(case.batch):
        quantities |= lawcheck.paired_quantities(reference[b], candidate[b], f"{case.name}/b{b}")
    return [lawcheck.compare(name, a, c, ALPHA / count) for name, (a, c) in quantities.items()]


def judge_all(cases: list[Case], reference: dict, candidate: dict) -> lawcheck.Judgement:
    count = sum(len(lawcheck.paired_quantities(reference[c.name][b], reference[c.name][b], "x"))
                for c in cases for b in range(c.batch))
    comparisons = [x for c in cases for x in compare(c, reference[c.name], candidate[c.name], count)]
    return lawcheck.judge(comparisons, ALPHA)


@pytest.fixture(scope="module")
def draws(patched) -> dict[str, dict[str, np.ndarray]]:
    """Every case's samples: the reference, the mode, and the mode with each control's fault."""
    from toto.inference.forecaster import TotoForecaster

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, dict[str, np.ndarray]] = {"reference": {}, "same-law": {}, **{c: {} for c in lawcheck.CONTROLS}}
    timings: dict[str, float] = {}
    try:
        for i, case in enumerate(ONE_STEP + MULTI_STEP):
            model = mixture_model(case.model_seed, case.components)
            upstream, ours = TotoForecaster(model), patched.TotoForecaster(model)
            with Sampling("exact"):
                out["reference"][case.name] = forecast(upstream if case.reference == "upstream" else ours, case, 100 + i)
            with Sampling("same-law"):
                start = time.perf_counter()
                out["same-law"][case.name] = forecast(ours, case, 200 + i)
                timings[case.name] = time.perf_counter() - start
                for j, control in enumerate(lawcheck.CONTROLS if case in ONE_STEP else ()):
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(patched._TotopatchKeptLaw, "of", lawcheck.controlled(patched._TotopatchKeptLaw, control))
                        out[control][case.name] = forecast(ours, case, 300 + 10 * i + j)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps({"same_law_s": timings}))
    return out


def test_same_law_samples_have_upstreams_law(draws) -> None:
    verdict = judge_all(ONE_STEP + MULTI_STEP, draws["reference"], draws["same-law"])
    print(verdict.summary(), f"\n  smallest p {verdict.smallest_p(''):.3g}")
    assert verdict.same_law, verdict.summary()


@pytest.mark.parametrize("control", lawcheck.CONTROLS)
def test_each_negative_control_is_rejected_in_every_forecast(draws, control) -> None:
    """The same statistics, the same correction: a location moved by a tenth of a scale, weights given to
    another component, or the patch before the kept one, each rejected with a wide margin."""
    verdict = judge_all(ONE_STEP, draws["reference"], draws[control])
    print(control, {case.name: f"{verdict.smallest_p(case.name):.3g}" for case in ONE_STEP},
          f"first threshold {verdict.first_threshold:.3g}")
    for case in ONE_STEP:
        assert verdict.rejects(case.name), f"{control} not rejected in {case.name}:\n{verdict.summary()}"
        smallest = verdict.smallest_p(case.name)
        assert smallest * MARGIN <= verdict.first_threshold, (case.name, smallest, verdict.first_threshold)


def test_chains_that_do_not_decode_from_their_own_draws_are_rejected(draws) -> None:
    """Negative control for multi-step: the mode's samples with each step's values shuffled over the samples
    (the same marginals; a value no longer follows its own chain's earlier draws)."""
    rng = np.random.default_rng(0)
    shuffled = {}
    for case in MULTI_STEP:
        samples = draws["same-law"][case.name].copy()
        for index in np.ndindex(*samples.shape[:3]):
            samples[index] = samples[index][rng.permutation(samples.shape[-1])]
        shuffled[case.name] = samples
    verdict = judge_all(MULTI_STEP, draws["reference"], shuffled)
    print("shuffled chains", {case.name: f"{verdict.smallest_p(case.name):.3g}" for case in MULTI_STEP},
          f"first threshold {verdict.first_threshold:.3g}")
    marginals = [name for name, _, _ in verdict.rejected if re.search(r"/t\d+$", name)]
    assert not marginals  # the marginals are the mode's, and pass
    for case in MULTI_STEP:
        assert verdict.rejects(case.name) and verdict.smallest_p(case.name) * MARGIN <= verdict.first_threshold


# ---------------------------------------------------------------- what the mode keeps of upstream


def run(forecaster: Any, inputs: Any, prediction: int, samples: int = 12, per_batch: int = 4, kv: bool = True,
        **kwargs: Any) -> torch.Tensor:
    torch.manual_seed(7)
    return forecaster.forecast(inputs, prediction_length=prediction, num_samples=samples, samples_per_batch=per_batch,
                               use_kv_cache=kv, **kwargs).samples


@pytest.fixture(scope="module")
def tiny():
    from totopatch.smoke import build_model

    return build_model("tiny").model


@pytest.mark.parametrize("prediction, batch, kv", [(1, 1, True), (4, 2, True), (9, 1, True), (9, 2, False)])
def test_shape_dtype_and_finite_values_are_upstreams(patched, tiny, prediction, batch, kv) -> None:
    from toto.inference.forecaster import TotoForecaster

    inputs = series(3, 26, batch, seed=5)
    expected = run(TotoForecaster(tiny), inputs, prediction, kv=kv)
    with Sampling("same-law"):
        found = run(patched.TotoForecaster(tiny), inputs, prediction, kv=kv)
    assert (found.shape, found.dtype, found.device) == (expected.shape, expected.dtype, expected.device)
    assert bool(torch.isfinite(found).all())
    assert not torch.equal(found, expected)  # other random numbers: the mode is on


@pytest.mark.parametrize("prediction", [1, 3, 9])
def test_known_future_values_overwrite_the_samples_as_upstream(patched, tiny, prediction) -> None:
    from toto.inference.forecaster import TotoForecaster

    inputs = series(3, 32, 1, seed=2)._replace(num_exogenous_variables=1)
    future = torch.randn(1, prediction, generator=torch.Generator().manual_seed(7))
    expected = run(TotoForecaster(tiny), inputs, prediction, future_exogenous_variables=future)
    with Sampling("same-law"):
        found = run(patched.TotoForecaster(tiny), inputs, prediction, future_exogenous_variables=future)
    assert found.shape == expected.shape
    assert torch.equal(found[0, -1], expected[0, -1])  # the known variate: its future values in every sample
    assert torch.equal(found[0, -1], future[0, :, None].expand(prediction, 12))
    assert not torch.equal(found[0, :-1], expected[0, :-1])


def test_extreme_draws_are_replaced_as_upstream_replaces_them(patched, tiny, monkeypatch) -> None:
    original = patched._TotopatchKeptLaw.sample

    def extreme(self, count):
        drawn = original(self, count)
        drawn[..., 0] = float("inf")
        drawn[..., -1] = float("nan")
        return drawn

    monkeypatch.setattr(patched._TotopatchKeptLaw, "sample", extreme)
    with Sampling("same-law"):
        found = run(patched.TotoForecaster(tiny), series(1, 24, 1, seed=3), 4)
    assert torch.equal(found[:, :, 0], torch.zeros_like(found[:, :, 0]))
    assert torch.equal(found[:, :, -1], torch.zeros_like(found[:, :, -1]))
    assert bool((found[:, :, 1:3] != 0).all())


def test_a_one_step_forecast_is_one_draw_at_the_users_shape(patched, tiny, monkeypatch) -> None:
    """num_samples 3072 in batches of 384 (the users' call): one draw of the kept patch, no full-context draw."""
    calls = []
    original = patched._TotopatchKeptLaw.sample
    monkeypatch.setattr(patched._TotopatchKeptLaw, "sample", lambda self, count: calls.append(count) or original(self, count))
    monkeypatch.setattr(patched, "_totopatch_last_steps", lambda *a: pytest.fail("a full-context draw"))
    with Sampling("same-law"):
        found = run(patched.TotoForecaster(tiny), series(1, 777, 1, seed=1), 1, samples=3072, per_batch=384)
    assert found.shape == (1, 1, 1, 3072) and calls == [3072]


def test_draws_are_split_only_to_stay_within_upstreams_draw_memory(patched) -> None:
    """Upstream draws per sampling batch (time steps x components) values per sample; a call here draws
    (kept steps) values per sample, so it may draw that ratio more samples than a sampling batch holds."""
    probs = torch.full((1, 1, 8, 2), 0.5)
    parts = torch.distributions.StudentT(torch.full((1, 1, 8, 2), 3.0), torch.zeros(1, 1, 8, 2), torch.ones(1, 1, 8, 2))
    base = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=probs), parts)
    distr = patched.TotoForecaster.create_affine_transformed(base, torch.zeros(1, 1, 8), torch.ones(1, 1, 8))
    law = patched._TotopatchKeptLaw.of(distr, 4)
    assert law.per_call(10) == 10 * 8 * 2 // 4
    assert law.sample(5).shape == (5, 1, 1, 4)


def test_later_steps_draw_only_the_kept_patch_and_chains_decode_the_draws_they_report(patched, tiny, monkeypatch) -> None:
    counts = []
    original = patched._TotopatchKeptLaw.sample
    monkeypatch.setattr(patched._TotopatchKeptLaw, "sample", lambda self, count: counts.append(count) or original(self, count))
    monkeypatch.setattr(patched, "_totopatch_last_steps", lambda *a: pytest.fail("a full-context draw"))
    seen = []
    decode = patched.TotoForecaster._totopatch_decode

    def spy(self, chain, *args, **kwargs):
        seen.append(chain[0].clone())
        return decode(self, chain, *args, **kwargs)

    monkeypatch.setattr(patched.TotoForecaster, "_totopatch_decode", spy)
    with Sampling("same-law"):
        found = run(patched.TotoForecaster(tiny), series(2, 24, 1, seed=4), 9, samples=12, per_batch=4)
    assert counts == [4, 1, 1] * 3  # per sampling batch: the first step for 4 chains, then one draw per chain
    first = torch.cat(seen).reshape(12, 1, 2, 4).permute(1, 2, 3, 0)
    assert torch.equal(found[:, :, :4], first)  # the draws each chain decodes from are its reported first step


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_student_t_draw_is_torchs_draw_bit_for_bit(patched, shape, seed, dtype) -> None:
    """The draw written without building ``StudentT`` (so that a CUDA graph can hold it): torch's random numbers
    and arithmetic, the same values for a seed, and the generator left where torch's draw leaves it."""
    generator = torch.Generator().manual_seed(seed)
    df = (0.5 + 10 * torch.rand(shape, generator=generator)).to(dtype)
    loc, scale = torch.randn(shape, generator=generator).to(dtype), (0.1 + torch.rand(shape, generator=generator)).to(dtype)
    torch.manual_seed(seed)
    expected, after = torch.distributions.StudentT(df, loc, scale, validate_args=False).sample(), torch.rand(2)
    torch.manual_seed(seed)
    found = patched._totopatch_student(df, loc, scale)
    assert found.dtype == expected.dtype and torch.equal(found, expected) and torch.equal(torch.rand(2), after)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), components=st.integers(1, 6), steps=st.integers(1, 3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_one_draw_pick_is_multinomials_pick(patched, rows, components, steps, seed, dtype) -> None:
    """A chain's one draw of the kept patch picks components as ``torch.multinomial(p, 1, True)`` does after its
    checks (made once, in ``of``): the same picks for a seed, without multinomial's two waits for the device."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(rows, 1, steps, components, generator=generator, dtype=dtype) + 0.01
    probs = probs / probs.sum(-1, keepdim=True)
    df = torch.full_like(probs, 3.0)
    law = patched._TotopatchKeptLaw(probs, (df, torch.zeros_like(probs), torch.ones_like(probs)),
                                    torch.zeros(rows, 1, steps, dtype=dtype), torch.ones(rows, 1, steps, dtype=dtype), 1.0)
    law.components = tuple(p.clone() for p in law.components)
    law.components[1].copy_(torch.arange(components, dtype=dtype).expand_as(probs))  # the component's loc = its index
    law.components[2].fill_(1e-30)  # a negligible scale: the draw is its component's index
    torch.manual_seed(seed)
    expected = torch.multinomial(probs.reshape(-1, components), 1, True).reshape(rows, 1, steps).to(dtype)
    torch.manual_seed(seed)
    found = law.sample(1)[0]
    assert torch.equal(found.round(), expected), (found, expected)


def test_an_unknown_distribution_samples_exactly(patched) -> None:
    normal = torch.distributions.Normal(torch.zeros(1, 1, 8), 1.0)
    assert patched._TotopatchKeptLaw.of(normal, 4) is None


# ---------------------------------------------------------------- failures: upstream's, and only upstream's


def outcome(call: Any) -> tuple:
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return ("raised", type(exc), str(exc).splitlines()[0] if str(exc) else "")
    return ("completed", tuple(out.shape), out.dtype)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, "autocast-bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction", [1, 9])
def test_every_dtype_completes_where_upstream_completes(patched, dtype, prediction) -> None:
    from toto.inference.forecaster import TotoForecaster

    from totopatch.smoke import build_model

    model = build_model("tiny").model
    inputs = series(2, 24, 1, seed=6)
    context = nullcontext()
    if dtype == "autocast-bfloat16":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        model = model.to(dtype)
        inputs = inputs._replace(series=inputs.series.to(dtype))
    with context:
        expected = outcome(lambda: run(TotoForecaster(model), inputs, prediction))
        with Sampling("same-law"):
            found = outcome(lambda: run(patched.TotoForecaster(model), inputs, prediction))
    assert found == expected


@pytest.mark.parametrize("prediction", [1, 9])
def test_mixture_weights_upstream_refuses_give_upstreams_error(patched, tiny, prediction) -> None:
    """NaN weights anywhere in the context, with distribution checks off (so that the draw sees them)."""
    from toto.inference.forecaster import TotoForecaster

    from totopatch.smoke import build_model

    model = build_model("tiny").model
    with torch.no_grad():
        model.output_distribution.mixture_weights.bias.fill_(float("nan"))
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        inputs = series(1, 24, 1, seed=2)
        expected = outcome(lambda: run(TotoForecaster(model), inputs, prediction))
        with Sampling("same-law"):
            found = outcome(lambda: run(patched.TotoForecaster(model), inputs, prediction))
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
    assert expected[0] == "raised" and found == expected


# ---------------------------------------------------------------- choosing the mode


def test_the_environment_chooses_the_mode_on_every_forecast(patched, monkeypatch) -> None:
    choose = patched._totopatch_sampling
    assert choose() == "exact"  # unset: the mode chosen at apply time, exact by default
    for value, mode in [("same-law", "same-law"), (" SAME-LAW ", "same-law"), ("exact", "exact"), ("", "exact"),
                        ("   ", "exact")]:
        monkeypatch.setenv("TOTOPATCH_SAMPLING", value)
        assert choose() == mode, value
    monkeypatch.setattr(patched, "_totopatch_sampling_default", "same-law")
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "")
    assert choose() == "same-law"
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "Exact")
    assert choose() == "exact"


def test_an_unrecognised_value_samples_exactly_and_warns_once(patched, tiny, monkeypatch) -> None:
    from toto.inference.forecaster import TotoForecaster

    monkeypatch.setattr(patched, "_totopatch_sampling_warned", set())
    monkeypatch.setattr(patched, "_totopatch_sampling_default", "same-law")
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "samelaw")
    inputs = series(1, 24, 1, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [run(patched.TotoForecaster(tiny), inputs, 4) for _ in range(2)]
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "TOTOPATCH_SAMPLING='samelaw' is not a sampling mode (exact, same-law): sampling exactly"]
    expected = run(TotoForecaster(tiny), inputs, 4)
    assert all(((f - expected).abs() <= 1e-5 * expected.abs().clamp_min(1e-6)).all() for f in found)


def test_the_patched_default_and_the_environment_over_it(tmp_path, tiny, monkeypatch) -> None:
    """Applied with same-law, a forecast draws the same law; TOTOPATCH_SAMPLING=exact gives upstream's samples."""
    from toto.inference.forecaster import TotoForecaster

    source = shared_prefill.rewrite(forecaster_source("0.2.0"), {"sampling": "same-law"}).source
    module = load_forecaster(tmp_path, "forecaster_same_law_default", source)
    inputs = series(2, 24, 1, seed=8)
    expected = run(TotoForecaster(tiny), inputs, 4)
    assert not torch.equal(run(module.TotoForecaster(tiny), inputs, 4), expected)
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "exact")
    found = run(module.TotoForecaster(tiny), inputs, 4)
    assert ((found - expected).abs() <= 1e-5 * expected.abs().clamp_min(1e-6)).all()


def test_the_template_knows_the_registrys_modes(patched) -> None:
    assert patched._totopatch_sampling_modes == SAMPLING_MODES
    assert patched._totopatch_sampling_default == "exact"


def test_the_sampling_option_is_the_blocks_default_and_switching_it_is_said() -> None:
    source = forecaster_source("0.2.0")
    exact = shared_prefill.rewrite(source, {}).source
    same_law = shared_prefill.rewrite(source, {"sampling": "same-law"}).source
    assert exact == shared_prefill.rewrite(source, {"sampling": "exact"}).source
    assert '_totopatch_sampling_default = "same-law"' in same_law and '_totopatch_sampling_default = "exact"' in exact
    assert shared_prefill.rewrite(same_law, {"sampling": "same-law"}).source == same_law
    switched = shared_prefill.rewrite(same_law, {"sampling": "exact"})
    assert switched.source == exact and switched.notes == ("switched the default sampling from same-law to exact",)
    with pytest.raises(Refusal, match="'fast' is not a sampling mode"):
        shared_prefill.rewrite(source, {"sampling": "fast"})


def test_cli_applies_same_law_records_it_and_reverts_exactly(tmp_path, cli) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package("0.2.0"), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    bad = cli(root, "apply", "shared-prefill", "--sampling", "fast")
    assert bad.exit_code == 2 and "'fast' is not one of 'exact', 'same-law'" in bad.stderr
    assert cli(root, "apply", "shared-prefill", "--sampling", "same-law").exit_code == 0
    text = (root / "toto" / "inference" / "forecaster.py").read_text()
    assert '_totopatch_sampling_default = "same-law"' in text
    manifest = json.loads((root / ".totopatch" / "manifest.json").read_text())
    assert [e["options"] for e in manifest["entries"] if e["patch"] == "shared-prefill"] == [{"sampling": "same-law"}]
    status = cli(root, "status", "shared-prefill", "--check")
    assert status.exit_code == 0 and "(sampling=same-law)" in status.stdout
    other = cli(root, "apply", "shared-prefill", "--sampling", "exact")
    assert other.exit_code == 3 and "already applied with sampling=same-law" in other.stdout
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.builds(lambda mode, case, pad: pad + "".join(c.upper() if u else c for c, u in zip(mode, case)) + pad,
              st.sampled_from(SAMPLING_MODES), st.lists(st.booleans(), min_size=8, max_size=8),
              st.sampled_from(["", " ", "\t", "\n "]))),
    recorded=st.sampled_from(SAMPLING_MODES))
def test_status_and_the_forecaster_read_any_value_the_same_way(patched, value, recorded) -> None:
    """The report's reading of TOTOPATCH_SAMPLING (environment.py) is the forecaster's, for any value."""
    from totopatch import environment
    from totopatch.patches import PATCHES

    reported = environment.read({"TOTOPATCH_SAMPLING": value}, PATCHES, {"shared-prefill": {"sampling": recorded}})
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("TOTOPATCH_SAMPLING", value)
        mp.setattr(patched, "_totopatch_sampling_default", recorded)
        assert patched._totopatch_sampling() == reported.sampling
