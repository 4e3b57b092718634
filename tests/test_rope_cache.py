"""rope-cache: the rotary tables made once per model call, with upstream's bits.

- The rewrite: where the block goes, what it refuses, CRLF, an outdated block.
- The cached method against upstream's on one module, over any sequence of calls that changes what the tables
  depend on (length, offset, dtype, layout, the buffers in place or moved, grad and inference mode): a
  hypothesis state machine, upstream's method being the oracle at every step.
- It saves what it is for: the tables are made once per model call, not per time-wise layer, and never kept
  after the call (a change to the buffers through ``.data``, which no version counter sees, is seen).
- Whole forecasts, every release, both samplings, one step and several, one variate and several: the samples of
  the default patches equal bit for bit those of the same tree without rope-cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import prefork
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from test_versions import package
from totopatch.patches import rope_cache
from totopatch.spec import Refusal

VERSIONS = ["0.1.3", "0.1.4", "0.2.0"]
REPO = Path(__file__).resolve().parents[1]


def rope_source(version: str = "0.2.0") -> str:
    return (package(version) / "model" / "rope.py").read_text()


def load(text: str, name: str = "rope_under_test") -> types.ModuleType:
    """A module made from ``text`` (rope.py imports only torch, einops, jaxtyping and rotary_embedding_torch)."""
    module = types.ModuleType(name)
    sys.modules[name] = module  # torch.compile imports the module of the code it traces by name
    exec(compile(text, f"{name}.py", "exec"), module.__dict__)
    return module


# ---------------------------------------------------------------- the rewrite


@pytest.mark.parametrize("version", VERSIONS)
def test_the_block_goes_right_after_the_class_and_nothing_else_changes(version: str) -> None:
    before = rope_source(version)
    after = rope_cache.rewrite(before, {}).source
    assert after != before and rope_cache.rewrite(after, {}).source == after
    start = after.index(rope_cache.BEGIN)
    stop = after.index("\n", after.index(rope_cache.END)) + 1
    assert after[start - 2:start] == "\n\n" and after[:start - 2] + after[stop:] == before
    assert after[:start - 2].rstrip().endswith("return scale")  # the class's last line
    module = load(after)
    assert module.TimeAwareRotaryEmbedding.rotate_queries_and_keys is module._totopatch_rotate_queries_and_keys


def test_crlf_is_kept() -> None:
    before = rope_source().replace("\n", "\r\n")
    after = rope_cache.rewrite(before, {}).source
    assert after.count("\r\n") == after.count("\n")


def test_an_outdated_block_is_replaced_with_a_note() -> None:
    current = rope_cache.rewrite(rope_source(), {}).source
    old = current.replace("_totopatch_rope_proved = {}", "_totopatch_rope_proved = dict()")
    again = rope_cache.rewrite(old, {})
    assert again.source == current and again.notes


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda s: s.replace("class TimeAwareRotaryEmbedding", "class OtherEmbedding"), "expected one top-level class"),
    (lambda s: s.replace("def rotate_queries_and_keys", "def rotate_both"), "expected one method"),
    (lambda s: s.replace("seq_pos_offset: int = 0,", "seq_pos_offset: int = 0, extra=None,"), "takes"),
    (lambda s: s.replace("from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb",
                         "from rotary_embedding_torch import RotaryEmbedding"), "does not import apply_rotary_emb"),
    (lambda s: s + "\n_totopatch_mine = 1\n", "already uses a _totopatch_ name"),
])
def test_refuses_unknown_shapes(mutate, reason: str) -> None:
    text = mutate(rope_source())
    assert text != rope_source()
    with pytest.raises(Refusal, match=reason):
        rope_cache.rewrite(text, {})


def test_refuses_a_damaged_block_and_a_block_elsewhere() -> None:
    patched = rope_cache.rewrite(rope_source(), {}).source
    with pytest.raises(Refusal, match="do not pair up"):
        rope_cache.rewrite(patched.replace(rope_cache.END, "# the end"), {})
    block = patched[patched.index(rope_cache.BEGIN):patched.index("\n", patched.index(rope_cache.END)) + 1]
    moved = patched.replace(block, "").replace("class TimeAwareRotaryEmbedding", block + "\n\nclass TimeAwareRotaryEmbedding")
    with pytest.raises(Refusal, match="not right after class"):
        rope_cache.rewrite(moved, {})


def test_cli_applies_verifies_and_reverts_exactly(tmp_path: Path, cli) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package("0.2.0"), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    original = (root / "toto" / "model" / "rope.py").read_bytes()
    assert cli(root, "apply", "rope-cache").exit_code == 0
    assert cli(root, "status", "--check", "rope-cache").exit_code == 0
    assert cli(root, "verify", "rope-cache").exit_code == 0
    assert cli(root, "revert", "rope-cache").exit_code == 0
    assert (root / "toto" / "model" / "rope.py").read_bytes() == original


# ---------------------------------------------------------------- the method against upstream's


@pytest.fixture(scope="module")
def patched_rope() -> types.ModuleType:
    return load(rope_cache.rewrite(rope_source(), {}).source)


def rotary(module: types.ModuleType, head_dim: int = 16, seq_first: bool = True) -> torch.nn.Module:
    """The rotary embedding as Toto's transformer makes it (transformer.py: xpos, cache on, layout by attention)."""
    return module.TimeAwareRotaryEmbedding(head_dim, use_xpos=True, cache_if_possible=True,
                                           seq_before_head_dim=seq_first)


def queries(seq_len: int, seed: int, dtype: torch.dtype, seq_first: bool, heads: int = 2, head_dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    shape = (3, seq_len, heads, head_dim) if seq_first else (3, heads, seq_len, head_dim)
    q, k = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    return q, k


def identical(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y)) for x, y in zip(a, b))


class CachedAgainstUpstream(RuleBasedStateMachine):
    """Any sequence of calls and changes to what the tables depend on: every call gives upstream's bits."""

    @initialize(seq_first=st.booleans())
    def make(self, seq_first: bool) -> None:
        module = load(rope_cache.rewrite(rope_source(), {}).source, "rope_machine")
        self.module, self.seq_first = module, seq_first
        self.rotary = rotary(module, seq_first=seq_first)
        self.dtype = torch.float32
        self.calls = 0

    @rule(seq_len=st.integers(1, 40), offset=st.integers(0, 50), seed=st.integers(0, 3),
          grad=st.booleans(), inference=st.booleans(), layers=st.integers(1, 4))
    def one_model_call(self, seq_len: int, offset: int, seed: int, grad: bool, inference: bool, layers: int) -> None:
        """A model call's layers inside one scope share one set of tables and each give upstream's bits."""
        q, k = queries(seq_len, seed, self.dtype, self.seq_first)
        mode = torch.inference_mode() if inference else torch.set_grad_enabled(grad)
        with mode:
            expected = self.module._totopatch_rope_upstream(self.rotary, q, k, seq_pos_offset=offset)
            with self.module._totopatch_rope_scope():
                for _ in range(layers):
                    got = self.rotary.rotate_queries_and_keys(q, k, seq_pos_offset=offset)
                    assert identical(got, expected), (seq_len, offset, self.dtype, grad, inference)
                assert len(self.module._totopatch_rope_local.tables) == 1  # the cached path ran, with one set
        assert self.module._totopatch_rope_local.tables is None  # nothing outlives the call

    @rule(seq_len=st.integers(1, 40))
    def outside_a_model_call(self, seq_len: int) -> None:
        q, k = queries(seq_len, 1, self.dtype, self.seq_first)
        assert identical(self.rotary.rotate_queries_and_keys(q, k),
                         self.module._totopatch_rope_upstream(self.rotary, q, k))

    @rule(factor=st.sampled_from([0.5, 1.5]))
    def buffers_changed_through_data(self, factor: float) -> None:
        """``.data`` shares the storage but not the version counter: no key can see this change."""
        self.rotary.freqs.data.mul_(factor)

    @rule(factor=st.sampled_from([0.5, 2.0]))
    def buffers_changed_in_place(self, factor: float) -> None:
        with torch.no_grad():
            self.rotary.freqs.mul_(factor)

    @rule(scale=st.floats(0.5, 2.0))
    def scale_changed_in_place(self, scale: float) -> None:
        with torch.no_grad():
            self.rotary.scale.mul_(scale)

    @rule(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    def moved(self, dtype: torch.dtype) -> None:
        self.rotary.to(torch.float64 if dtype == torch.float64 else torch.float32)
        self.dtype = dtype

    @invariant()
    def nothing_refused_on_the_cpu(self) -> None:
        assert False not in self.module._totopatch_rope_proved.values(), self.module._totopatch_rope_proved


CachedAgainstUpstream.TestCase.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                                    suppress_health_check=list(HealthCheck), derandomize=True)
TestCachedAgainstUpstream = CachedAgainstUpstream.TestCase


def test_the_tables_are_made_once_per_model_call_not_per_layer(patched_rope) -> None:
    """What the patch is for: in a model call of 11 layers the positions and scale are made once; outside one,
    upstream's method makes them every time."""
    module = patched_rope
    made = []
    embedding = rotary(module)
    original = type(embedding).get_scale
    embedding.get_scale = types.MethodType(lambda self, t: made.append(1) or original(self, t), embedding)
    with torch.no_grad():
        with module._totopatch_rope_scope():  # the first call proves the cached path against upstream's
            embedding.rotate_queries_and_keys(*queries(24, 0, torch.float32, True))
        for length in (24, 25):
            made.clear()
            with module._totopatch_rope_scope():
                for _ in range(11):
                    embedding.rotate_queries_and_keys(*queries(length, 0, torch.float32, True))
                tables = list(module._totopatch_rope_local.tables.values())
            assert len(made) == 1 and len(tables) == 1 and tables[0][3] is not None  # with apply's cosine and sine
        made.clear()
        for _ in range(3):
            embedding.rotate_queries_and_keys(*queries(24, 0, torch.float32, True))
        assert len(made) == 3


def test_under_torch_compile_the_method_is_upstreams(patched_rope) -> None:
    module = patched_rope
    embedding = rotary(module)
    q, k = queries(8, 0, torch.float32, True)
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    compiled = torch.compile(lambda q, k: embedding.rotate_queries_and_keys(q, k), backend=backend, fullgraph=True)
    with torch.no_grad(), module._totopatch_rope_scope():
        assert identical(compiled(q, k), module._totopatch_rope_upstream(embedding, q, k))
    assert len(seen) == 1  # one graph, no break


# ---------------------------------------------------------------- whole forecasts

FORECAST = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from totopatch.model_shape import toto_kwargs
    import toto
    assert toto.__file__.startswith(sys.argv[1]), toto.__file__
    from toto.model.toto import Toto
    from toto.inference.forecaster import TotoForecaster
    from toto.data.util.dataset import MaskedTimeseries
    torch.set_num_threads(1)  # a model this small: one thread, on a machine whose cores run other tests
    torch.manual_seed(0)
    forecaster = TotoForecaster(Toto(**toto_kwargs("tiny")).eval().model)
    out = {}
    for sampling, length, variates, prediction in [(sampling, *call) for sampling in ("exact", "same-law")
                                                   for call in ((300, 1, 1), (130, 3, 1), (200, 2, 33))]:
        os.environ["TOTOPATCH_SAMPLING"] = sampling  # read at each forecast
        generator = torch.Generator().manual_seed(length)
        x = torch.randn(variates, length, generator=generator).cumsum(-1)
        inputs = MaskedTimeseries(series=x, padding_mask=torch.ones_like(x, dtype=torch.bool),
                                  id_mask=torch.zeros_like(x), timestamp_seconds=torch.arange(length).expand(variates, length) * 60,
                                  time_interval_seconds=torch.full((variates,), 60))
        torch.manual_seed(1)
        with torch.inference_mode():
            samples = forecaster.forecast(inputs, prediction_length=prediction, num_samples=24,
                                          samples_per_batch=8, use_kv_cache=True).samples
        out.setdefault(sampling, []).append(samples.double().flatten().tolist())
    rope = sys.modules["toto.model.rope"]
    print(json.dumps({"samples": out, "proved": [str(v) for v in getattr(rope, "_totopatch_rope_proved", {}).values()]}))
''')


@pytest.fixture(scope="module")
def forecast_script(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("rope") / "forecast.py"
    script.write_text(FORECAST)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_forecasts_equal_those_without_it_bit_for_bit(tmp_path: Path, cli, forecast_script: Path, version: str) -> None:
    root = tmp_path / "tree"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    assert cli(root, "apply").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run() -> dict:
        """Both samplings' samples, forecast by the tree as it stands, in a fresh process."""
        ran = subprocess.run([prefork.python(), str(forecast_script), str(root)], capture_output=True, text=True,
                             timeout=600, env=env)
        assert ran.returncode == 0, ran.stderr[-3000:]
        return json.loads(ran.stdout.strip().splitlines()[-1])

    cached = run()
    assert cached["proved"] == ["True"], cached  # the cached path ran
    assert cli(root, "revert", "rope-cache").exit_code == 0
    plain = run()
    assert plain["proved"] == [] and set(plain["samples"]) == {"exact", "same-law"}
    assert plain["samples"] == cached["samples"]
