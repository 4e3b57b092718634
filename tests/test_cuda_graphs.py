"""cuda-graphs: a block stacked on shared-prefill's; its runner's fallback choice, keys, checks and LRU bound on CPU.

The runner logic is tested in this process: the block's text is executed with the installed Toto's
``TotoBackbone`` and a CPU stand-in for the CUDA backend, whose "graph" re-runs the backbone from its static
input tensors into its static output tensors, as a replay reads and writes them, and refuses to run
where the model's parameters are not those it was captured with (a stale replay).  Capture and replay on a
GPU are tested in test_gpu_cuda_graphs.py.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import shutil
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import snapshot
from test_versions import package
from totopatch.model_shape import toto_kwargs
from totopatch.patches import cuda_graphs, shared_prefill
from totopatch.patches._cst import template_text
from totopatch.spec import Refusal

VERSIONS = ["0.1.3", "0.1.4", "0.2.0"]
NAMES = ("inputs", "input_padding_mask", "id_mask")


def forecaster_source(version: str) -> str:
    return (package(version) / "inference" / "forecaster.py").read_text()


def stacked(version: str = "0.2.0") -> str:
    return shared_prefill.rewrite(forecaster_source(version), {}).source


def without_block(source: str) -> str:
    start = source.index("\n\n\n" + cuda_graphs.BEGIN)
    end = source.index(cuda_graphs.END) + len(cuda_graphs.END) + 1
    return source[:start] + "\n" + source[end:]


# ---------------------------------------------------------------- the rewrite


@pytest.mark.parametrize("version", VERSIONS)
def test_fixes_every_release_right_after_the_shared_prefill_block(version: str) -> None:
    before = stacked(version)
    after = cuda_graphs.rewrite(before, {}).source
    assert without_block(after) == before
    assert cuda_graphs.rewrite(after, {}).source == after
    assert shared_prefill.rewrite(after, {}).source == after  # its name check leaves the stacked block alone
    compile(after, "forecaster.py", "exec")
    head = after[:after.index(cuda_graphs.BEGIN)]
    assert head.endswith(shared_prefill.END + "\n\n\n")
    assert after.endswith("_totopatch_prefill = _totopatch_graphs  # totopatch cuda-graphs: end\n") or \
        "_totopatch_prefill = _totopatch_graphs  # totopatch cuda-graphs: end\n\n" in after
    assert not re.search(r"^\s*(import|from)\s+totopatch\b", after, re.M)


def test_crlf_is_kept() -> None:
    before = stacked().replace("\n", "\r\n")
    after = cuda_graphs.rewrite(before, {}).source
    assert after.count("\n") == after.count("\r\n") and cuda_graphs.rewrite(after, {}).source == after


def test_an_outdated_block_is_replaced_with_a_note() -> None:
    after = cuda_graphs.rewrite(stacked(), {}).source
    old = after.replace("captured prefills kept per process", "graphs kept")
    again = cuda_graphs.rewrite(old, {})
    assert again.source == after and again.notes


@pytest.mark.parametrize("mutate, reason", [
    pytest.param(lambda s: s.replace(shared_prefill.END, "# end"), "damaged shared-prefill block", id="damaged-prefill"),
    pytest.param(lambda s: s.replace("from ..model.backbone import TotoBackbone\n", ""), "does not import TotoBackbone",
                 id="no-backbone-import"),
    pytest.param(lambda s: s + "\n_totopatch_mine = 1\n", "already uses a _totopatch_ name", id="name-clash"),
    pytest.param(lambda s: s + "\ndef broken(:\n", "not valid Python", id="syntax"),
])
def test_refuses_unknown_shapes(mutate, reason: str) -> None:
    with pytest.raises(Refusal, match=reason):
        cuda_graphs.rewrite(mutate(stacked()), {})


def test_refuses_without_the_shared_prefill_block() -> None:
    with pytest.raises(Refusal, match="apply shared-prefill first"):
        cuda_graphs.rewrite(forecaster_source("0.2.0"), {})


def test_refuses_a_damaged_block_and_a_block_elsewhere() -> None:
    after = cuda_graphs.rewrite(stacked(), {}).source
    with pytest.raises(Refusal, match="damaged cuda-graphs block"):
        cuda_graphs.rewrite(after.replace(cuda_graphs.END, "# end"), {})
    block = after[after.index(cuda_graphs.BEGIN):after.index(cuda_graphs.END) + len(cuda_graphs.END) + 1]
    moved = without_block(after).replace("\n\n\n@dataclass", "\n\n\n" + block + "\n\n@dataclass", 1)
    with pytest.raises(Refusal, match="not right after the shared-prefill block"):
        cuda_graphs.rewrite(moved, {})


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_stacks_it_on_shared_prefill_and_reverts_exactly(tmp_path, cli, version: str) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    assert cli(root, "apply").exit_code == 0
    status = json.loads(cli(root, "status", "shared-prefill", "cuda-graphs", "--json").stdout)["items"]
    states = {i["patch"]: (i["state"], i["detail"]) for i in status}
    assert states == {"shared-prefill": ("applied", "sampling=exact, under cuda-graphs"), "cuda-graphs": ("applied", "")}
    refused = cli(root, "revert", "shared-prefill")
    assert refused.exit_code == 3 and "revert cuda-graphs first" in refused.stderr
    assert cli(root, "revert", "cuda-graphs").exit_code == 0
    assert cli(root, "status", "shared-prefill", "--check").exit_code == 0
    assert cli(root, "apply", "cuda-graphs").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


def test_cli_refuses_it_alone(tmp_path, cli) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package("0.2.0"), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    ran = cli(root, "apply", "cuda-graphs")
    assert ran.exit_code == 3 and "apply shared-prefill first" in ran.stdout + ran.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("version", VERSIONS)
def test_an_untouched_tree_reads_not_applied_before_apply_and_after_revert(tmp_path, cli, version: str) -> None:
    """Without the shared-prefill block beneath it, cuda-graphs is simply not applied: not a conflict."""
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    for _ in ("before apply", "after a full revert"):
        ran = cli(root, "status", "--json")
        states = {(i["patch"], i["target"]): i["state"] for i in json.loads(ran.stdout)["items"]}
        assert ran.exit_code == 0 and states[("cuda-graphs", "forecaster")] == "not-applied", states
        assert set(states.values()) <= {"not-applied", "not-present"}, states
        assert cli(root, "apply").exit_code == 0 and cli(root, "revert").exit_code == 0


# ---------------------------------------------------------------- the runner, on CPU


@pytest.fixture(scope="module")
def block() -> dict:
    """The block's names, executed with the installed Toto's backbone class (as forecaster.py imports it)."""
    from toto.model.backbone import TotoBackbone

    # shared-prefill's block, beneath it in the file, gives the rope-cache scope and a model call in it (nothing
    # where rope-cache is absent)
    names = {"torch": torch, "TotoBackbone": TotoBackbone, "__name__": "toto.inference.forecaster",
             "_totopatch_rope_scope": lambda model: contextlib.nullcontext(),
             "_totopatch_call": lambda model, **kwargs: model(**kwargs)}
    exec(compile(template_text("cuda_graphs_template.py.txt"), "cuda_graphs_template", "exec"), names)
    names["_totopatch_fixed_in_the_tree"] = names["_totopatch_fixed"]
    names["_totopatch_fixed"] = lambda model: True  # the installed Toto has neither fix; on the CPU they change nothing
    return names


def tiny(seed: int = 0) -> torch.nn.Module:
    from toto.model.toto import Toto

    torch.manual_seed(seed)
    return Toto(**toto_kwargs("tiny")).model.eval()


def call(length: int, batch: int = 1, variates: int = 3, seed: int = 1, ids: torch.Tensor | None = None,
         dtype: torch.dtype = torch.float32) -> dict:
    """The keyword arguments the shared-prefill block passes for a one-step prefill of a padded ``length``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, variates, length, generator=generator).cumsum(-1).to(dtype) + 10
    return {"inputs": inputs, "input_padding_mask": torch.ones_like(inputs, dtype=torch.bool),
            "id_mask": torch.zeros_like(inputs, dtype=torch.int) if ids is None else ids,
            "kv_cache": None, "scaling_prefix_length": None}


class FakeGraph:
    """A captured prefill's stand-in: replay re-runs the backbone (or the captured program) from the static inputs
    into the static outputs."""

    def __init__(self, backend: FakeBackend, model, inputs: dict, extra: dict, outputs: tuple, program=None) -> None:
        self.backend, self.model, self.inputs, self.extra, self.outputs = backend, weakref.ref(model), inputs, extra, outputs
        self.program = program
        self.pointers = [p.data_ptr() for p in model.parameters()]

    def run(self) -> tuple:
        model = self.model()
        return tuple(model.backbone(**self.inputs, **self.extra) if self.program is None else
                     self.program(self.inputs, self.extra))

    def replay(self) -> None:
        model = self.model()
        assert [p.data_ptr() for p in model.parameters()] == self.pointers, "a stale graph was replayed"
        self.backend.replays += 1
        for static, new in zip(self.outputs, self.run()):
            static.copy_(new)


class FakeBackend:
    """The CUDA backend's interface on the CPU; ``fail`` makes every capture raise it."""

    def __init__(self, block: dict, fail: Exception | None = None) -> None:
        self.block, self.fail = block, fail
        self.replays = self.programs = 0
        self.retired: list = []

    def refuses(self, device: torch.device) -> str | None:
        return None if device.type == "cpu" else "not on the CPU"

    def capture(self, model, kwargs: dict, program=None):
        if self.fail is not None:
            raise self.fail
        self.programs += program is not None
        inputs = {name: kwargs[name].clone() for name in NAMES}
        extra = {k: v for k, v in kwargs.items() if k not in NAMES}
        graph = FakeGraph(self, model, inputs, extra, (), program)
        state = torch.random.get_rng_state()  # a capture records its draws, it does not make them
        graph.outputs = tuple(t.clone() for t in graph.run())
        torch.random.set_rng_state(state)
        return self.block["_TotopatchGraph"](model, graph, inputs, graph.outputs, kwargs["inputs"].device)

    def ordered(self, device: torch.device):
        return contextlib.nullcontext()

    def retire(self, graphs: list) -> None:
        self.retired += graphs


def runner(block: dict, kept: int = 16, fail: Exception | None = None):
    return block["_TotopatchGraphRunner"](FakeBackend(block, fail), kept)


def same(a, b) -> bool:
    """Two model outputs (distribution, loc, scale) with equal tensors."""
    da, db = a[0], b[0]
    params = [(da.mixture_distribution.probs, db.mixture_distribution.probs)]
    params += [(getattr(da.component_distribution, n), getattr(db.component_distribution, n)) for n in ("df", "loc", "scale")]
    pairs = params + [(a[1], b[1]), (a[2], b[2])]
    return all(x.dtype == y.dtype and x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all())
               for x, y in pairs)


@torch.no_grad()
def test_capture_then_replay_gives_eager_outputs(block) -> None:
    model, run = tiny(), runner(block)
    for seed in (1, 2, 3):
        kwargs = call(32, seed=seed)
        assert same(run(model, True, **kwargs), model(**kwargs))
    assert (run.captures, run.replays, run.backend.replays) == (1, 2, 2)
    assert type(run(model, True, **call(32))).__name__ == "TotoOutput"


@torch.no_grad()
@pytest.mark.parametrize("case, reason", [
    pytest.param(lambda m, k, b: (m, False, k), "multi-step forecast", id="multi-step"),
    pytest.param(lambda m, k, b: (m, True, {**k, "kv_cache": object()}), "a KV cache or a scaling prefix", id="kv-cache"),
    pytest.param(lambda m, k, b: (m, True, {**k, "scaling_prefix_length": 8}), "a KV cache or a scaling prefix",
                 id="prefix"),
    pytest.param(lambda m, k, b: (m.train(), True, k), "training mode", id="train"),
    pytest.param(lambda m, k, b: (m, True, call(32 * 1024, variates=1)), "more than 16384 time steps", id="too-large"),
    pytest.param(lambda m, k, b: (m, True, {**k, "inputs": k["inputs"].double()}), None, id="float64-is-fine"),
    pytest.param(lambda m, k, b: (type(m).__new__(type("Mine", (type(m),), {"forward": lambda s, **a: None})),
                                  True, k), "the model's forward is not Toto's", id="own-forward"),
])
def test_fallback_choice(block, case, reason) -> None:
    model, kwargs, run = tiny(), call(32), runner(block)
    model, one_step, kwargs = case(model, kwargs, block)
    key, why = block["_totopatch_graph_key"](model, one_step, kwargs, run.backend, run.failed)
    assert why == reason or (reason is not None and why is not None and why.startswith(reason))
    assert (key is None) == (reason is not None)


@torch.no_grad()
def test_fallbacks_of_the_run_time(block, monkeypatch) -> None:
    model, kwargs, run = tiny(), call(32), runner(block)
    key = block["_totopatch_graph_key"]
    for value in ("0", "off", " FALSE ", "no"):
        monkeypatch.setenv("TOTOPATCH_CUDA_GRAPHS", value)
        assert key(model, True, kwargs, run.backend, run.failed) == (None, "TOTOPATCH_CUDA_GRAPHS turns CUDA graphs off")
    for value in ("1", "on", "", "maybe"):  # on by default; a value the loader does not know leaves it on
        monkeypatch.setenv("TOTOPATCH_CUDA_GRAPHS", value)
        assert key(model, True, kwargs, run.backend, run.failed)[0] is not None
    monkeypatch.delenv("TOTOPATCH_CUDA_GRAPHS")
    with torch.enable_grad():
        assert key(model, True, kwargs, run.backend, run.failed) == (None, "autograd is on")
    handle = model.transformer.register_forward_hook(lambda *a: None)
    assert key(model, True, kwargs, run.backend, run.failed)[1].startswith("training mode, forward hooks")
    handle.remove()
    model.transformer.layers[0].compile()
    assert key(model, True, kwargs, run.backend, run.failed)[1].startswith("training mode, forward hooks")
    compiled = torch.compile(tiny())
    assert key(compiled, True, kwargs, run.backend, run.failed) == (None, "compiled with torch.compile")
    cuda = block["_TotopatchCudaGraphs"]()
    assert key(tiny(), True, kwargs, cuda, run.failed) == (None, "not on CUDA")
    assert key(tiny(), True, {**kwargs, "id_mask": kwargs["id_mask"].to("meta")}, run.backend, run.failed) == \
        (None, "inputs on different devices")


@torch.no_grad()
def test_keys_hold_what_the_captured_kernels_depend_on(block) -> None:
    run = runner(block)
    model = tiny()

    def key(m=model, **changes):
        return block["_totopatch_graph_key"](m, True, {**call(32), **changes}, run.backend, run.failed)[0]

    base = key()
    assert base == key() and base is not None
    kwargs = call(32)
    different = [
        key(**call(64)), key(**call(32, batch=2)), key(**call(32, variates=2)),
        key(inputs=kwargs["inputs"].double()), key(input_padding_mask=kwargs["input_padding_mask"].float()),
        key(id_mask=kwargs["id_mask"].long()), key(inputs=kwargs["inputs"].transpose(1, 2).contiguous().transpose(1, 2)),
        key(tiny(1)),
    ]
    assert all(k is not None and k != base for k in different)
    assert len(set(different)) == len(different)
    with torch.autocast("cpu"):  # CPU autocast does not choose the CUDA kernels
        assert key() == base
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert key() != base
    finally:
        torch.set_default_dtype(previous)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not previous
    try:
        assert key() != base
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    with torch.inference_mode():
        assert key() != base
    assert key(num_exogenous_variables=torch.tensor([2])) == base  # read only with variate labels
    labelled = tiny()
    labelled.enable_variate_labels()
    labelled.eval()  # the labels' module is made in training mode
    counts = [key(labelled, num_exogenous_variables=n) for n in (0, 1, torch.tensor([1]), torch.tensor([1]))]
    assert counts[0] != counts[1] and counts[2] == counts[3] and None not in counts  # a count by its value
    assert block["_totopatch_graph_key"](labelled, True, {**call(32), "num_exogenous_variables": torch.ones(1, device="meta")},
                                         run.backend, run.failed) == (None, "an exogenous-variable count on the device")
    model.load_state_dict(tiny(2).state_dict())  # written in place: the same addresses, read by the graph
    assert key() == base
    model.load_state_dict(tiny(2).state_dict(), assign=True)  # new tensors
    assert key() != base
    moved = key()
    model.double()
    assert key() not in (base, moved)


@torch.no_grad()
def test_never_a_stale_graph(block) -> None:
    """Another model, parameters written in place, replaced, moved to another dtype, train(): each gives eager."""
    run = runner(block)
    first, second = tiny(0), tiny(1)
    for model in (first, second, first, second):
        for _ in range(2):
            kwargs = call(32, seed=5)
            assert same(run(model, True, **kwargs), model(**kwargs))
    assert (run.captures, run.replays) == (2, 6)
    first.load_state_dict(tiny(3).state_dict())
    assert same(run(first, True, **call(32)), first(**call(32)))
    assert run.captures == 2  # in place: the graph reads the new values
    first.load_state_dict(tiny(4).state_dict(), assign=True)
    for _ in range(2):
        assert same(run(first, True, **call(32)), first(**call(32)))
    assert run.captures == 3 and len(run.backend.retired) == 1  # the old graph of ``first`` went
    first.double()
    kwargs = {**call(32), "inputs": call(32)["inputs"].double()}
    for _ in range(2):
        assert same(run(first, True, **kwargs), first(**kwargs))
    assert run.captures == 4
    first.train()
    assert same(run(first, True, **kwargs), first(**kwargs))
    assert run.eager["training mode, forward hooks or a compiled submodule"] == 1


@torch.no_grad()
def test_bad_inputs_raise_upstream_errors_and_are_never_replayed(block) -> None:
    model, run = tiny(), runner(block)
    for _ in range(2):
        run(model, True, **call(32))
    replays = run.backend.replays
    ids = torch.zeros(1, 3, 32, dtype=torch.int)
    ids[..., 6:] = 1  # a patch of 4 steps that holds two datasets
    with pytest.raises(AssertionError) as upstream:
        model(**call(32, ids=ids))
    with pytest.raises(AssertionError) as found:
        run(model, True, **call(32, ids=ids))
    assert str(found.value) == str(upstream.value) == "Patches cannot span multiple datasets"
    assert run.backend.replays == replays
    bad = {**call(32), "input_padding_mask": torch.ones(1, 2, 32, dtype=torch.bool)}  # a shape upstream rejects
    with pytest.raises(RuntimeError) as upstream:
        model(**bad)
    with pytest.raises(RuntimeError) as found:
        run(model, True, **bad)
    assert str(found.value) == str(upstream.value) and run.backend.replays == replays
    nan = call(32)
    nan["inputs"][0, 0, 5] = float("nan")
    outcomes = []
    for forward in (lambda: model(**nan), lambda: run(model, True, **nan)):
        try:
            outcomes.append(forward())
        except Exception as exc:  # noqa: BLE001 - whatever upstream does, the graph path must do the same
            outcomes.append(f"{type(exc).__name__}: {exc}")
    assert outcomes[0] == outcomes[1] if isinstance(outcomes[0], str) else same(*outcomes)


@torch.no_grad()
def test_a_failed_capture_is_logged_once_and_the_process_runs_eagerly(block, caplog) -> None:
    run = runner(block, fail=RuntimeError("operation not permitted when stream is capturing"))
    model = tiny()
    with caplog.at_level(logging.WARNING, logger="toto.inference.forecaster"):
        for length in (32, 32, 64):
            kwargs = call(length)
            assert same(run(model, True, **kwargs), model(**kwargs))
        other = tiny(1)
        assert same(run(other, True, **call(32)), other(**call(32)))
    assert run.failures == 1 and run.captures == 0  # a capture that did not end may leave CUDA state: no more tries
    assert run.eager["a capture failed earlier in this process"] == 3
    (record,) = [r for r in caplog.records if "cuda-graphs" in r.getMessage()]
    assert "operation not permitted" in record.getMessage() and "TOTOPATCH_CUDA_GRAPHS=0" in record.getMessage()


@torch.no_grad()
def test_graphs_of_a_collected_model_go_at_the_next_capture(block) -> None:
    import gc

    run = runner(block)
    model = tiny()
    run(model, True, **call(32))
    del model
    gc.collect()
    run(tiny(1), True, **call(32))
    assert len(run.graphs) == 1 and len(run.backend.retired) == 1


class LRU:
    """The reference: which keys an LRU of ``kept`` holds, and how many misses a sequence makes."""

    def __init__(self, kept: int) -> None:
        self.kept, self.keys, self.misses = kept, [], 0

    def use(self, key: int) -> None:
        if key in self.keys:
            self.keys.remove(key)
        else:
            self.misses += 1
        self.keys = (self.keys + [key])[-self.kept:]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kept=st.integers(1, 3), lengths=st.lists(st.sampled_from([8, 16, 24, 32]), min_size=1, max_size=10))
def test_at_most_kept_graphs_least_recently_used_evicted(block, kept: int, lengths: list[int]) -> None:
    run, model, reference = runner(block, kept), tiny(), LRU(kept)
    with torch.no_grad():
        for length in lengths:
            kwargs = call(length)
            assert same(run(model, True, **kwargs), model(**kwargs))
            reference.use(length)
            assert len(run.graphs) <= kept
    assert run.captures == reference.misses and run.replays == len(lengths) - reference.misses
    assert [key[3][0][0][-1] for key in run.graphs] == reference.keys
    assert len(run.backend.retired) == reference.misses - len(reference.keys)


@pytest.fixture(scope="module")
def forecaster_module(tmp_path_factory):
    """The installed forecaster.py with shared-prefill and cuda-graphs, loaded beside it (its relative imports hold)."""
    path = tmp_path_factory.mktemp("forecaster") / "forecaster_graphs.py"
    path.write_text(cuda_graphs.rewrite(stacked(), {}).source)
    spec = importlib.util.spec_from_file_location("toto.inference.forecaster_graphs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_through_the_forecaster_each_key_is_captured_once_then_replayed(forecaster_module, monkeypatch) -> None:
    """The users' call: the batch's collated exogenous count is a new tensor every forecast, the key still holds."""
    from totopatch.smoke import make_series

    module = forecaster_module
    run = module._TotopatchGraphRunner(FakeBackend(vars(module)))
    monkeypatch.setattr(module, "_totopatch_prefill", run)
    monkeypatch.setattr(module, "_totopatch_fixed", lambda model: True)  # the installed Toto's scaler and embedding
    forecaster = module.TotoForecaster(tiny())
    for length in (29, 29, 45, 29, 45):
        series = make_series(1, length, "cpu")
        drawn = []
        for graphs in ("0", "1"):
            monkeypatch.setenv("TOTOPATCH_CUDA_GRAPHS", graphs)
            torch.manual_seed(11)
            drawn.append(forecaster.forecast(series, prediction_length=1, num_samples=64, samples_per_batch=16).samples)
        assert torch.equal(*drawn)
    assert (run.captures, run.replays, run.backend.replays) == (2, 3, 3)


def test_a_tree_without_the_fixes_runs_eagerly_without_trying_a_capture(block) -> None:
    """Read from the scaler's and the embedding's code: upstream's copy the minimum scale and check the id mask."""
    import sys
    import types
    from types import SimpleNamespace

    from test_graph_fixes import source
    from totopatch.patches import id_mask_check, scaler_constant

    fixed = block["_totopatch_fixed_in_the_tree"]
    assert not fixed(tiny())
    loaded = {}
    for name, patch in (("scaler", scaler_constant), ("embedding", id_mask_check)):
        module = types.ModuleType(f"totopatch_test_fixed_{name}")
        sys.modules[module.__name__] = module
        exec(compile(patch.rewrite(source("0.2.0", name), {}).source, f"{name}.py", "exec"), module.__dict__)
        loaded[name] = module
    try:
        scaler = loaded["scaler"].CausalPatchStdMeanScaler(patch_size=4)
        embed = loaded["embedding"].PatchEmbedding(4, 4, 8)
        assert fixed(SimpleNamespace(scaler=scaler, patch_embed=embed))
        assert not fixed(SimpleNamespace(scaler=scaler, patch_embed=tiny().patch_embed))
        assert not fixed(SimpleNamespace(scaler=tiny().scaler, patch_embed=embed))
    finally:
        for module in loaded.values():
            del sys.modules[module.__name__]


# ---------------------------------------------------------------- the whole one-step forecast, on CPU

EXACT, SAME_LAW = "exact", "same-law"


@pytest.fixture
def whole(forecaster_module, monkeypatch):
    """The forecaster module with both runner entries on a CPU fake backend, and a way to forecast graphs on or off."""
    module = forecaster_module
    run = module._TotopatchGraphRunner(FakeBackend(vars(module)))
    monkeypatch.setattr(module, "_totopatch_prefill", run)
    monkeypatch.setattr(module, "_totopatch_one_step", run.forecast)
    monkeypatch.setattr(module, "_totopatch_fixed", lambda model: True)

    def forecast(forecaster, inputs, graphs: bool, sampling: str = EXACT, seed: int = 11, samples: int = 64,
                 per_batch: int = 16, prediction: int = 1):
        """(samples, mean, the next random numbers) or the error as text."""
        monkeypatch.setenv("TOTOPATCH_CUDA_GRAPHS", "1" if graphs else "0")
        monkeypatch.setenv("TOTOPATCH_SAMPLING", sampling)
        torch.manual_seed(seed)
        try:
            found = forecaster.forecast(inputs, prediction_length=prediction, num_samples=samples,
                                        samples_per_batch=per_batch)
        except Exception as exc:  # noqa: BLE001 - the graph path must fail as the eager one does
            return f"{type(exc).__name__}: {exc}"
        return found.samples, found.mean, torch.rand(3)

    return module, run, forecast


def identical(a, b) -> bool:
    """Two forecasts' outcomes: the same error, or samples and means equal bit for bit with the same strides, and
    the same random numbers after them."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return all(x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y)
               for x, y in zip(a, b))


def series(length: int, variates: int = 1, batch: int = 1, seed: int = 1, dtype: torch.dtype = torch.float32):
    from totopatch.smoke import make_series

    walk = make_series(variates, length, "cpu", seed=seed)
    if batch > 1:
        walk = type(walk)(*(torch.stack([t] * batch) if isinstance(t, torch.Tensor) else t for t in walk))
    return walk._replace(series=walk.series.to(dtype) + 10)


@pytest.mark.parametrize("sampling", [EXACT, SAME_LAW])
@pytest.mark.parametrize("variates, batch", [(1, 1), (3, 1), (2, 2)])
def test_a_whole_forecast_replays_the_eager_paths_samples_bit_for_bit(whole, sampling, variates, batch) -> None:
    """Captured once per key, proved by one replay, then replayed: each forecast equals the eager path's."""
    module, run, forecast = whole
    forecaster = module.TotoForecaster(tiny())
    for length, seed in ((29, 1), (29, 2), (45, 3), (29, 4), (45, 5), (45, 5)):
        inputs = series(length, variates, batch)
        eager = forecast(forecaster, inputs, False, sampling, seed)
        assert identical(eager, forecast(forecaster, inputs, True, sampling, seed)), length
    assert not run.refused and run.backend.programs == run.captures == 2
    assert run.replays == 4 and run.backend.replays == 4 + 2  # and one proving replay per capture
    assert run.rechecked == 0 and run.failures == 0


def test_a_forecast_of_several_steps_is_not_replayed_whole(whole) -> None:
    module, run, forecast = whole
    forecaster = module.TotoForecaster(tiny())
    inputs = series(29, 2)
    for _ in range(2):
        assert identical(forecast(forecaster, inputs, False, prediction=9), forecast(forecaster, inputs, True, prediction=9))
    assert run.backend.programs == 0 and run.eager["multi-step forecast"] == 4  # graphs on and off


@pytest.fixture
def validating():
    """Distributions validate their arguments (torch's default, which torch.compile's first use turns off)."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    yield
    torch.distributions.Distribution.set_default_validate_args(previous)


@pytest.mark.parametrize("sampling", [EXACT, SAME_LAW])
def test_a_replay_whose_checks_fail_runs_eagerly_with_upstreams_error(whole, validating, sampling) -> None:
    """An id mask upstream refuses, and head outputs its distributions refuse: the eager path's error, never a replay."""
    from toto.inference.forecaster import TotoForecaster

    module, run, forecast = whole
    model = tiny()
    forecaster = module.TotoForecaster(model)
    good = series(32)
    for _ in range(2):
        forecast(forecaster, good, True, sampling)
    assert (run.captures, run.replays) == (1, 1)
    ids = good.id_mask.clone()
    ids[..., 18:] = 1  # a patch that holds two datasets
    bad = good._replace(id_mask=ids)
    upstream = forecast(TotoForecaster(model), bad, False)
    assert upstream == "AssertionError: Patches cannot span multiple datasets"
    assert forecast(forecaster, bad, True, sampling) == upstream
    assert run.replays == 1  # (the fake graph re-runs the embedding's check; a CUDA graph reads its flag)
    with torch.no_grad():
        model.output_distribution.df.bias[0] = float("nan")
    upstream = forecast(TotoForecaster(model), good, False)
    assert upstream.startswith("ValueError: Expected parameter df")
    rechecked = run.rechecked
    for _ in range(2):
        assert forecast(forecaster, good, True, sampling) == upstream
    assert run.replays == 1 and run.rechecked == rechecked + 2
    torch.distributions.Distribution.set_default_validate_args(False)  # as under python -O, or after torch.compile
    upstream, eager = forecast(TotoForecaster(model), good, False), forecast(forecaster, good, False, sampling)
    assert identical(forecast(forecaster, good, True, sampling), eager)
    assert isinstance(upstream, str) == isinstance(eager, str)
    assert run.replays == 1 and run.rechecked == rechecked + 3
    torch.distributions.Distribution.set_default_validate_args(True)
    with torch.no_grad():
        model.output_distribution.df.bias[0] = 0.0
    assert identical(forecast(forecaster, good, True, sampling), forecast(forecaster, good, False, sampling))
    assert run.replays == 2


def test_a_graph_whose_proving_replay_differs_is_not_kept(whole, monkeypatch) -> None:
    module, run, forecast = whole
    program = module._TotopatchForecastProgram.__call__

    def off_by_one_ulp(self, inputs, extra):
        drawn, ok = program(self, inputs, extra)
        return torch.nextafter(drawn, drawn + 1), ok

    monkeypatch.setattr(module._TotopatchForecastProgram, "__call__", off_by_one_ulp)
    forecaster = module.TotoForecaster(tiny())
    inputs = series(29)
    for _ in range(3):
        assert identical(forecast(forecaster, inputs, False), forecast(forecaster, inputs, True))
    assert run.captures == 1 and run.backend.programs == 1  # refused once: its prefill alone is then replayed
    assert list(run.refused.values()) == ["its replay did not give the eager path's samples"]
    assert all(key[0] != "forecast" for key in run.graphs)


@torch.no_grad()
def test_what_is_not_replayed_whole_and_why(whole, monkeypatch) -> None:
    module, run, forecast = whole
    checked = module._totopatch_tail_checked

    def refusal(model, inputs, sampling=EXACT, **call):
        keys = set(run.refused)
        forecast(module.TotoForecaster(model), inputs, True, sampling, **call)
        new = [run.refused[k] for k in run.refused if k not in keys]
        return new[0] if new else None

    assert refusal(tiny().double(), series(29, dtype=torch.float64)) is None  # float64 is replayed whole
    half = call(29, dtype=torch.bfloat16)  # (CPU torch cannot draw bf16 gammas: asked directly)
    assert module._totopatch_forecast_refuses(tiny().bfloat16(), EXACT, half, (64, 16, 1)) == \
        "not a float32 or float64 model and input"
    assert module._totopatch_forecast_refuses(tiny(), EXACT, {**call(29), "inputs": call(29)["inputs"].bfloat16()},
                                              (64, 16, 1)) == "not a float32 or float64 model and input"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module._totopatch_forecast_refuses(tiny(), EXACT, call(29), (64, 16, 1)) == "autocast"
    assert refusal(tiny(), series(33), SAME_LAW, samples=1, per_batch=1) == "a same-law draw of one sample"
    other = tiny()
    other.output_distribution = type(other.output_distribution)(other.embed_dim, 3)  # a head of 3, fine
    assert refusal(other.eval(), series(37)) is None
    from toto.model.distribution import StudentTOutput

    single = tiny()
    single.output_distribution = StudentTOutput(single.embed_dim).eval()
    assert refusal(single, series(41)) == "an output head not known here"  # one Student-T: sampled eagerly
    monkeypatch.setattr(module, "_totopatch_tile_distribution", lambda *a: None)
    assert refusal(tiny(), series(45)) == "upstream's code ran it"
    monkeypatch.undo()
    monkeypatch.setattr(module, "_totopatch_prefill", run)
    monkeypatch.setattr(module, "_totopatch_one_step", run.forecast)
    monkeypatch.setattr(module, "_totopatch_fixed", lambda model: True)
    for key in list(checked):
        monkeypatch.setitem(checked, key, False)
    assert refusal(tiny(), series(49)) == "the kept-steps sampler is not proved on this device and dtype"


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_recorded_head_gives_the_tensors_of_the_distribution_it_builds(forecaster_module, dtype) -> None:
    module = forecaster_module
    model = tiny().to(dtype)
    features = torch.randn(2, 3, 8, model.embed_dim, dtype=dtype)
    probs, df, loc, scale, kind = module._totopatch_head_parts(module._totopatch_recorded_head(model.output_distribution,
                                                                                               features))
    built = model.output_distribution(features)
    assert kind is type(built.component_distribution)
    for found, expected in ((probs, built.mixture_distribution.probs), (df, built.component_distribution.df),
                            (loc, built.component_distribution.loc), (scale, built.component_distribution.scale)):
        assert found.dtype == expected.dtype and torch.equal(found, expected)
    assert module._totopatch_head_agrees(model, dtype, torch.device("cpu")) == probs.shape[-1]
    from toto.model.distribution import StudentTOutput

    single = StudentTOutput(model.embed_dim).to(dtype)
    assert module._totopatch_head_parts(module._totopatch_recorded_head(single, features)) is None
    assert module._totopatch_head_parts(None) is None


def validated(probs, df, loc, scale) -> bool:
    """Whether upstream's head distributions, built with validation, and torch.multinomial accept these values."""
    from gluonts.torch.distributions.studentT import StudentT

    dists = torch.distributions
    try:
        mixture = dists.Categorical(probs=probs, validate_args=True)
        dists.MixtureSameFamily(mixture, StudentT(df, loc, scale, validate_args=True), validate_args=True)
        dists.Chi2(df, validate_args=True)
        torch.multinomial(mixture.probs.reshape(-1, probs.shape[-1]), 1, True)
    except (ValueError, RuntimeError):
        return False
    return True


SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, -1e-30, 1e-45, 3e38])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), where=st.sampled_from(["probs", "df", "loc", "scale", "ids", None]))
def test_the_checks_flag_passes_only_what_upstream_accepts(forecaster_module, data, where) -> None:
    """Property: where the device flag of a forecast graph says valid, upstream's checks all pass."""
    module = forecaster_module
    model = tiny()
    shape = (1, 2, 8, 3)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    raw = {"probs": torch.rand(shape, generator=generator) + 0.01, "df": 2 + torch.rand(shape, generator=generator),
           "loc": torch.randn(shape, generator=generator), "scale": torch.rand(shape, generator=generator) + 0.1}
    ids = torch.zeros(1, 2, 8, dtype=torch.int)
    if where == "ids":
        ids[..., data.draw(st.integers(1, 7)):] = 1
    elif where is not None:
        raw[where].view(-1)[data.draw(st.integers(0, raw[where].numel() - 1))] = data.draw(SPECIAL)
    probs = raw["probs"] / raw["probs"].sum(-1, keepdim=True)
    flag = bool(module._totopatch_forecast_checks(model, ids, probs, raw["df"], raw["loc"], raw["scale"]))
    patches = ids.unfold(-1, 4, 4)
    ids_ok = bool(torch.eq(patches.min(-1).values, patches.max(-1).values).all())
    if flag:
        assert ids_ok and validated(raw["probs"], raw["df"], raw["loc"], raw["scale"])
    if where is None:
        assert flag


@torch.no_grad()
def test_a_tiled_categoricals_kept_draw_is_its_full_draw_kept(forecaster_module) -> None:
    module = forecaster_module
    for batch, keep in ((1, 4), (2, 1), (3, 8)):
        probs = torch.softmax(3 * torch.randn(batch, 2, 8, 5), dim=-1)
        tiled = module._TotopatchTiledCategorical(probs, 6, module._totopatch_tile_view)
        torch.manual_seed(batch)
        full = tiled.sample()[:, :, -keep:]
        after = torch.rand(2)
        torch.manual_seed(batch)
        kept = module._totopatch_kept_argmax(tiled.probs, keep)
        assert torch.equal(kept, full) and torch.equal(torch.rand(2), after)  # the same draws, no more


def test_the_kept_steps_check_fails_where_the_tiled_draw_differs(forecaster_module, monkeypatch) -> None:
    from gluonts.torch.distributions.studentT import StudentT

    module = forecaster_module
    shape = module.TotoForecaster.create_affine_transformed
    cpu = torch.device("cpu")
    kind = type(module._totopatch_probe_mixture(shape, StudentT, cpu, torch.float32))
    assert module._totopatch_tail_agrees(shape, kind, StudentT, cpu, torch.float32) is True
    argmax = module._totopatch_kept_argmax
    monkeypatch.setattr(module, "_totopatch_kept_argmax", lambda probs, keep: argmax(probs.flip(-1), keep))
    assert module._totopatch_tail_agrees(shape, kind, StudentT, cpu, torch.float32) is False


# ---------------------------------------------------------------- the model walk behind every key


def full_walk(model) -> tuple | None:
    """The graph state as a walk of the whole module tree computes it, with nothing kept between calls."""
    modules, state, stack = [], [], [model]
    while stack:
        found = stack.pop().__dict__
        if found["training"] or found["_forward_hooks"] or found["_forward_pre_hooks"] or "forward" in found \
                or "backbone" in found or found.get("_compiled_call_impl") is not None:
            return None
        modules.append(found)
        stack.extend(m for m in found["_modules"].values() if m is not None)
    for kind in ("_parameters", "_buffers"):
        state.extend(t.data_ptr() for found in modules for t in found[kind].values() if t is not None)
    return tuple(state)


MUTATIONS = ["train", "eval", "hook", "unhook", "pre_hook", "replace_module", "assign", "in_place", "double", "float",
             "own_forward", "del_forward", "compile_layer", "buffer", "none_bias", "gc"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10_000)), min_size=1, max_size=12))
def test_the_kept_walk_gives_what_a_full_walk_gives_after_any_change(block, steps) -> None:
    """Stateful property: whatever is done to the model between keys, the state read through the kept walk
    equals a walk of the whole tree made afresh."""
    import gc

    state = block["_totopatch_graph_state"]
    model = tiny()
    handles: list = []
    assert state(model) == full_walk(model)
    for action, pick in steps:
        modules = list(model.modules())
        module = modules[pick % len(modules)]
        if action in ("train", "eval"):
            module.train(action == "train")
        elif action == "hook":
            handles.append(module.register_forward_hook(lambda *a: None))
        elif action == "pre_hook":
            handles.append(module.register_forward_pre_hook(lambda *a: None))
        elif action == "unhook" and handles:
            handles.pop(pick % len(handles)).remove()
        elif action == "replace_module":
            named = [(m, name) for m in modules for name in m._modules]
            if named:
                parent, name = named[pick % len(named)]
                setattr(parent, name, torch.nn.Linear(2, 2))
        elif action == "assign":
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        elif action == "in_place":
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0)
        elif action in ("double", "float"):
            getattr(model, action)()
        elif action == "own_forward":
            module.forward = lambda *a, **k: None
        elif action == "del_forward" and "forward" in module.__dict__:
            del module.forward
        elif action == "compile_layer":
            module._compiled_call_impl = lambda *a, **k: None
        elif action == "buffer":
            module.register_buffer(f"extra{pick}", torch.zeros(2))
        elif action == "none_bias" and isinstance(module, torch.nn.Linear):
            module.bias = None
        elif action == "gc":
            gc.collect()
        assert state(model) == full_walk(model), action


def test_the_walk_keeps_no_module_alive(block) -> None:
    import gc

    model = tiny()

    class Back(torch.nn.Module):  # a submodule that refers back to the model: a cycle
        pass

    back = Back()
    object.__setattr__(back, "owner", model)
    model.back = back
    block["_totopatch_graph_state"](model.eval())
    ref = weakref.ref(model)
    del model, back
    gc.collect()
    assert ref() is None


def test_a_whole_forecast_graph_that_cannot_be_replayed_is_a_failed_capture(whole, monkeypatch, caplog) -> None:
    module, run, forecast = whole
    replay = FakeGraph.replay

    def broken(self) -> None:
        if self.program is not None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        replay(self)

    monkeypatch.setattr(FakeGraph, "replay", broken)
    forecaster = module.TotoForecaster(tiny())
    inputs = series(29)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        for _ in range(3):
            assert identical(forecast(forecaster, inputs, False), forecast(forecaster, inputs, True))
    assert run.failures == 1 and run.captures == 0 and run.eager["a capture failed earlier in this process"] == 2
    assert [r for r in caplog.records if "illegal memory access" in r.getMessage()]
