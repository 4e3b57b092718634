"""shared-prefill: found by structure, refused when unknown, exact revert; same seed, same samples as upstream."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import prefork
import pytest
import torch

from conftest import installed_toto_package, run_script, snapshot
from test_versions import package
from totopatch.patches import PATCHES, kv_cache, shared_prefill
from totopatch.spec import Refusal

FIXTURES = Path(__file__).parent / "fixtures" / "prefill"
sys.path.insert(0, str(FIXTURES))
import forecast_samples  # noqa: E402

VERSIONS = ["0.1.3", "0.1.4", "0.2.0"]
RTOL = 1e-5


def forecaster_source(version: str) -> str:
    return (package(version) / "inference" / "forecaster.py").read_text()


def without_block(source: str) -> str:
    start = source.index("\n\n\n" + shared_prefill.BEGIN)
    end = source.index(shared_prefill.END) + len(shared_prefill.END) + 1
    return source[:start] + "\n" + source[end:]


# ---------------------------------------------------------------- the rewrite


@pytest.mark.parametrize("version", VERSIONS)
def test_fixes_every_release_with_one_block_after_the_class(version) -> None:
    source = forecaster_source(version)
    patched = shared_prefill.rewrite(source, {}).source
    assert shared_prefill.rewrite(patched, {}).source == patched
    assert without_block(patched) == source
    compile(patched, "forecaster.py", "exec")
    assert not re.search(r"^\s*(import|from)\s+totopatch\b", patched, re.M)  # works without totopatch
    assert "TotoForecaster = TotoForecasterSharedPrefill  # totopatch shared-prefill: end" in patched
    assert "class TotoForecasterSharedPrefill(TotoForecaster):" in patched


def test_fixes_a_renamed_reformatted_class() -> None:
    source = forecaster_source("0.2.0").replace("TotoForecaster", "MyForecaster")
    source = source.replace("num_batches = num_samples // sampling_batch_size",
                            "num_batches = num_samples  //  sampling_batch_size  # a comment")
    patched = shared_prefill.rewrite(source, {}).source
    assert "class TotoForecasterSharedPrefill(MyForecaster):" in patched
    assert "MyForecaster = TotoForecasterSharedPrefill  # totopatch shared-prefill: end" in patched


REFUSED = [
    pytest.param(lambda s: s.replace("sample = distr.sample()", "sample = distr.sample((1,))"),
                 "not the code of a supported toto-ts release", id="other-sampling"),
    pytest.param(lambda s: s.replace("        num_exogenous_variables: int = 0,\n    ) -> Float[torch.Tensor, "
                                     "\"batch variate time_steps samples\"]:",
                                     "        num_exogenous_variables: int = 0,\n        seed: int = 0,\n"
                                     "    ) -> Float[torch.Tensor, \"batch variate time_steps samples\"]:"),
                 "parameters this patch does not know", id="new-parameter"),
    pytest.param(lambda s: s.replace("    def generate_samples(", "    def sample_paths("),
                 "no forecaster class", id="no-generate-samples"),
    pytest.param(lambda s: s + "\n\nclass Other:\n" + "".join(f"    def {name}(self):\n        pass\n" for name in (
                 "forecast", "generate_samples", "create_affine_transformed")), "ambiguous: 2 forecaster classes",
                 id="two-classes"),
    pytest.param(lambda s: s.replace("    replace_extreme_values,\n", ""), "does not import replace_extreme_values",
                 id="no-replace-extreme-values"),
    pytest.param(lambda s: s + "\n_totopatch_tile = None\n", "_totopatch_ name outside", id="name-clash"),
    pytest.param(lambda s: "x = 1\n", "no forecaster class", id="unrelated-module"),
]


@pytest.mark.parametrize("mutate, reason", REFUSED)
def test_refuses_unknown_shapes(mutate, reason) -> None:
    source = mutate(forecaster_source("0.2.0"))
    with pytest.raises(Refusal, match=re.escape(reason)):
        shared_prefill.rewrite(source, {})


def test_refuses_a_damaged_block_and_a_block_elsewhere() -> None:
    patched = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    with pytest.raises(Refusal, match="damaged shared-prefill block"):
        shared_prefill.rewrite(patched.replace("  # totopatch shared-prefill: end", ""), {})
    head, tail = patched.split("\n\n\n# totopatch shared-prefill: begin")
    moved = head.replace("\n\n\n@dataclass(frozen=True)", "\n\n\n# totopatch shared-prefill: begin" +
                         tail.rstrip("\n") + "\n\n\n@dataclass(frozen=True)", 1) + "\n"
    with pytest.raises(Refusal, match="not right after class TotoForecaster"):
        shared_prefill.rewrite(moved, {})


def test_an_outdated_block_is_replaced_with_a_note() -> None:
    patched = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    old = patched.replace("layers that share a slot are copied once", "older wording")
    again = shared_prefill.rewrite(old, {})
    assert again.source == patched and again.notes


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_applies_alone_and_with_every_patch_and_reverts_exactly(tmp_path, cli, version) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    for selection in [()] if version != "0.2.0" else [("shared-prefill",), ()]:
        ran = cli(root, "apply", *selection)
        assert ran.exit_code == 0, ran.stderr
        assert "TotoForecasterSharedPrefill" in (root / "toto" / "inference" / "forecaster.py").read_text()
        assert cli(root, "status", *selection, "--check").exit_code == 0
        assert cli(root, "revert").exit_code == 0
        assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


# ---------------------------------------------------------------- the samples


def load_forecaster(tmp_path: Path, name: str, source: str) -> ModuleType:
    """``source`` as a sibling module of the installed ``toto.inference.forecaster`` (relative imports work)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"toto.inference.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_samples(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        a, b = before[name], after[name]
        assert a.shape == b.shape, name
        rel = ((a - b).abs() / a.abs().clamp_min(1e-6)).max().item()
        assert rel <= RTOL, f"{name}: max relative difference {rel:.3g}"


@pytest.fixture(scope="module")
def tiny_model():
    from totopatch.smoke import build_model

    return build_model("tiny").model


@pytest.fixture(scope="module")
def upstream_samples(tiny_model) -> dict:
    from toto.inference.forecaster import TotoForecaster

    return forecast_samples.run_cases(TotoForecaster, tiny_model, exogenous=True)


@pytest.mark.parametrize("cache", ["upstream-cache", "kv-cache-patched"])
def test_same_seed_same_samples_on_the_installed_release(tmp_path, monkeypatch, tiny_model, upstream_samples,
                                                         cache) -> None:
    import toto.model.backbone as backbone

    patched = load_forecaster(tmp_path, "forecaster_shared", shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source)
    assert patched.TotoForecaster.__name__ == "TotoForecasterSharedPrefill"
    if cache == "kv-cache-patched":
        util = (installed_toto_package() / "model" / "util.py").read_text()
        util_module = load_forecaster(tmp_path, "util_kv", kv_cache.rewrite(util, {}).source)  # same package depth
        monkeypatch.setattr(backbone, "KVCache", util_module.KVCache)
    assert_same_samples(upstream_samples, forecast_samples.run_cases(patched.TotoForecaster, tiny_model, exogenous=True))


def test_same_seed_same_samples_with_the_013_forecaster(tmp_path, tiny_model) -> None:
    """0.1.3's forecaster (0.1.4's is the same code) against its patched self, on the installed model."""
    source = forecaster_source("0.1.3")
    original = load_forecaster(tmp_path, "forecaster_013", source)
    patched = load_forecaster(tmp_path, "forecaster_013_shared", shared_prefill.rewrite(source, {}).source)
    assert_same_samples(forecast_samples.run_cases(original.TotoForecaster, tiny_model),
                        forecast_samples.run_cases(patched.TotoForecaster, tiny_model))


def test_mean_forecasts_and_unknown_distributions_run_as_upstream(tmp_path, tiny_model) -> None:
    from toto.inference.forecaster import TotoForecaster

    patched = load_forecaster(tmp_path, "forecaster_shared", shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source)
    inputs = forecast_samples._inputs(3, 32, 1)
    means = [cls(tiny_model).forecast(inputs, prediction_length=9, num_samples=None).mean
             for cls in (TotoForecaster, patched.TotoForecaster)]
    assert torch.equal(*means)
    tile = patched._totopatch_tile
    assert patched._totopatch_tile_distribution(torch.distributions.Laplace(torch.zeros(1, 2), 1.0), 3, tile) is None
    normal = torch.distributions.Normal(torch.randn(2, 3), torch.rand(2, 3) + 0.1)
    tiled = patched._totopatch_tile_distribution(normal, 3, tile)
    assert torch.equal(tiled.loc, normal.loc.repeat(3, 1)) and torch.equal(tiled.scale, normal.scale.repeat(3, 1))


@pytest.fixture(scope="module")
def patched_module(tmp_path_factory) -> ModuleType:
    source = shared_prefill.rewrite(forecaster_source("0.2.0"), {}).source
    return load_forecaster(tmp_path_factory.mktemp("sampler"), "forecaster_sampler", source)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_tiled_categorical_draws_what_multinomial_draws(patched_module, batch) -> None:
    probs = torch.softmax(3 * torch.randn(batch, 2, 7, 5), dim=-1)
    upstream = torch.distributions.Categorical(probs=probs.repeat(4, 1, 1, 1))
    tiled = patched_module._TotopatchTiledCategorical(probs, 4, patched_module._totopatch_tile_view)
    torch.manual_seed(3)
    before = upstream.sample()
    torch.manual_seed(3)
    after = tiled.sample()
    assert tiled.batch_shape == upstream.batch_shape and torch.equal(before, after)
    assert torch.equal(tiled.probs, probs.repeat(4, 1, 1, 1))  # the model's probabilities, not normalised again


@pytest.mark.parametrize("bad", ["nan", "negative", "inf", "zero row"])
def test_a_tiled_categorical_refuses_what_multinomial_refuses(patched_module, bad) -> None:
    probs = torch.full((1, 1, 3, 4), 0.25)
    probs[0, 0, 1] = {"nan": float("nan"), "negative": -0.25, "inf": float("inf"), "zero row": 0.0}[bad]
    with pytest.raises(RuntimeError) as upstream:
        torch.multinomial(probs.reshape(-1, 4), 1, True)
    with pytest.raises(RuntimeError) as patched:
        patched_module._TotopatchTiledCategorical(probs, 4, patched_module._totopatch_tile)
    assert str(patched.value) == str(upstream.value).splitlines()[0]


def test_the_first_step_distribution_is_tiled_after_upstream_shapes_it(patched_module) -> None:
    from gluonts.torch.distributions import AffineTransformed

    base = torch.distributions.Normal(torch.randn(1, 1, 6), torch.rand(1, 1, 6) + 0.1)
    loc, scale = torch.randn(1, 1, 9), torch.rand(1, 1, 9) + 0.5
    affine = patched_module.TotoForecaster.create_affine_transformed(base, loc, scale)
    view = patched_module._totopatch_tile_view
    tiled = patched_module._totopatch_tile_affine(affine, patched_module._totopatch_tile_distribution(base, 3, view), 3, view)
    upstream = patched_module.TotoForecaster.create_affine_transformed(
        torch.distributions.Normal(base.loc.repeat(3, 1, 1), base.scale.repeat(3, 1, 1)), loc.repeat(3, 1, 1),
        scale.repeat(3, 1, 1))
    assert type(tiled) is AffineTransformed
    assert torch.equal(tiled.loc, upstream.loc) and torch.equal(tiled.scale, upstream.scale)
    torch.manual_seed(5)
    before = upstream.sample()
    torch.manual_seed(5)
    assert torch.equal(tiled.sample(), before)
    other = torch.distributions.TransformedDistribution(base, [])
    assert patched_module._totopatch_tile_affine(other, base, 3, view) is None


def test_extreme_values_are_replaced_as_upstream_replaces_them(patched_module) -> None:
    from toto.data.util.dataset import replace_extreme_values

    values = torch.tensor([1.5, float("nan"), float("inf"), -float("inf"), 3e38, -2e38, -0.0, 7.0])
    assert torch.equal(patched_module._totopatch_replace_extreme_values(values), replace_extreme_values(values))


def test_the_kept_steps_of_a_mixture_are_drawn_as_sample_draws_them(patched_module) -> None:
    from gluonts.torch.distributions.studentT import StudentT

    dists = torch.distributions
    probs = torch.softmax(torch.randn(1, 2, 10, 4), dim=-1)
    parts = StudentT(2.5 + torch.rand(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.rand(1, 2, 10, 4) + 0.1)
    model = dists.MixtureSameFamily(dists.Categorical(probs=probs), parts)
    shape = patched_module.TotoForecaster.create_affine_transformed
    view = patched_module._totopatch_tile_view
    distr = patched_module._totopatch_tile_affine(shape(model, torch.randn(1, 2, 10), torch.rand(1, 2, 10) + 1.0),
                                                  patched_module._totopatch_tile_distribution(model, 3, view), 3, view)
    torch.manual_seed(11)
    before = distr.sample()[:, :, -4:]
    after_stream = torch.rand(3)
    torch.manual_seed(11)
    after = patched_module._totopatch_last_steps(distr, 4, shape)
    assert torch.equal(before, after) and torch.equal(torch.rand(3), after_stream)  # the same draws, no more
    key = (type(distr), StudentT, probs.device, probs.dtype, patched_module._totopatch_autocast(probs.device))
    assert patched_module._totopatch_tail_checked[key] is True


def test_the_kept_steps_fall_back_to_sample_for_other_distributions(patched_module) -> None:
    normal = torch.distributions.Normal(torch.randn(3, 1, 8), 1.0)
    assert patched_module._totopatch_tail_of_mixture(normal, 4) is None
    torch.manual_seed(2)
    before = normal.sample()[:, :, -4:]
    torch.manual_seed(2)
    assert torch.equal(patched_module._totopatch_last_steps(normal, 4, None), before)


@pytest.mark.slow
def test_a_fully_patched_tree_gives_the_same_samples_without_totopatch(tmp_path, cli, upstream_samples) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(installed_toto_package(), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    assert cli(root, "apply").exit_code == 0
    run = subprocess.run([prefork.python(), str(FIXTURES / "forecast_samples.py"), "--toto-parent", str(root),
                          "--out", str(tmp_path / "after.pt"), "--exogenous"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    after = torch.load(tmp_path / "after.pt", weights_only=False)
    assert after.pop("forecaster") == "TotoForecasterSharedPrefill"
    assert_same_samples(upstream_samples, after)


def recompiles(parent: Path, prediction: int = 1) -> dict:
    return run_script(FIXTURES / "context_recompiles.py", "--toto-parent", str(parent), "--prediction", str(prediction))


@pytest.mark.slow
def test_a_new_context_length_is_not_a_recompile(tmp_path, cli) -> None:
    """The users' backtest: one-step forecasts, a new context length each; compiled, then no recompile.

    The control is the same tree without shared-prefill (and cuda-graphs, which stacks on it): upstream's
    forecaster, with a KV cache that itself never recompiles, recompiles on the second length."""
    beside = [p.id for p in PATCHES if p.default and "forecaster" not in p.targets]  # the other files' patches
    trees = {}
    for name, patches in (("control", beside), ("patched", ())):
        trees[name] = tmp_path / name
        shutil.copytree(installed_toto_package(), trees[name] / "toto", ignore=shutil.ignore_patterns("__pycache__"))
        assert cli(trees[name], "apply", *patches).exit_code == 0
    before, after = recompiles(trees["control"]), recompiles(trees["patched"])
    assert (before["forecaster"], after["forecaster"]) == ("TotoForecaster", "TotoForecasterSharedPrefill")
    assert before["recompiles"] >= 1  # what the patch removes: upstream's forecaster recompiles on the second length
    assert after["recompiles"] == 0 and after["limit_hits"] == 0
