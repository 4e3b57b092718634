"""cuda-graphs on CUDA: replays equal to the eager path bit for bit, keys, eviction, failures, stale cases.

Skipped where CUDA is absent (CI has no GPU); run on the device with `pytest -m gpu`.  Toto-Open-Base shape
with random weights, TF32 on, the users' call (one step, 3072 samples in batches of 384).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import installed_toto_package

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPT = Path(__file__).parent / "fixtures" / "graphs" / "gpu_graphs.py"
RTOL = 1e-4  # shared-prefill's tolerance against upstream
ID_MASK = "AssertionError: Patches cannot span multiple datasets"


def run(parent: Path, out: Path, samples: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toto-parent", str(parent), "--out", str(out),
                           "--samples", str(samples)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-6000:])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    """The script's cases on a tree with every default patch, and the upstream tree's reference samples."""
    from click.testing import CliRunner

    from totopatch.cli import main
    import shutil

    root = tmp_path_factory.mktemp("graphs") / "project"
    shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    assert CliRunner().invoke(main, ["--root", str(root), "apply"]).exit_code == 0
    work = root.parent
    patched = run(root / "toto", work / "patched.json", work / "patched.pt")
    upstream = run(installed_toto_package().parent, work / "upstream.json", work / "upstream.pt")
    return {"patched": patched, "upstream": upstream, "samples": (torch.load(work / "upstream.pt"),
                                                                 torch.load(work / "patched.pt"))}


def test_replays_equal_the_eager_path_bit_for_bit(found) -> None:
    """Samples, their mean and the generator's next numbers; each forecast replayed whole (none refused)."""
    cases = found["patched"]["cases"]
    replay = cases["replay"]
    assert all(replay[k] == [True, True] for k in replay if k.isdigit()), replay
    assert replay["delta"] == {"captures": 4, "replays": 4, "failures": 0}
    assert replay["refused"] == [] and replay["rechecked"] == 0, replay


def test_same_law_replays_equal_the_eager_same_law_path_bit_for_bit(found) -> None:
    case = found["patched"]["cases"]["same_law"]
    assert all(case[k] == [True, True] for k in case if k.isdigit()), case
    assert case["delta"] == {"captures": 4, "replays": 4, "failures": 0}
    assert case["refused"] == [] and case["rechecked"] == 0, case


def test_the_kept_patch_draws_equal_the_full_draws_on_cuda(found) -> None:
    """The exact sampler's comparison of the kept patch alone, and the Student-T draw written for graphs."""
    case = found["patched"]["cases"]["kept_draws"]
    assert {k: v for k, v in case.items() if k not in ("delta", "eager_delta", "rechecked", "refused")} == \
        {"argmax_1x2240": True, "argmax_2x96": True, "student": True}, case


def test_a_replay_whose_checks_fail_gives_upstreams_error(found) -> None:
    """Head outputs upstream's validation refuses, after the graphs were captured: the flag sends each forecast to
    the eager path (upstream's error), and replays resume once the weights are valid again."""
    case = found["patched"]["cases"]["nan_head"]
    assert "error" not in case and case["equal"] == [True, True], case
    assert case["rechecked"] == 4 and case["delta"]["replays"] == 4, case  # per sampling: before and after


def test_replays_equal_upstream_within_the_shared_prefill_tolerance(found) -> None:
    assert (found["patched"]["runner"], found["upstream"]["runner"]) == (True, False)
    upstream, patched = found["samples"]
    q = torch.tensor([0.1, 0.5, 0.9])
    a, b = upstream.quantile(q, dim=-1), patched.quantile(q, dim=-1)
    assert ((a - b).abs() / a.abs().clamp_min(1e-6)).max().item() <= RTOL


def test_a_new_signature_is_captured_and_the_least_recently_used_evicted(found) -> None:
    evict = found["patched"]["cases"]["evict"]
    assert evict["equal"] == [True] * 6 and evict["graphs"] <= 2
    assert evict["delta"]["replays"] == 0 and evict["delta"]["captures"] == 6  # A B C A B C with room for two


def test_bad_inputs_give_upstream_errors_and_are_never_replayed(found) -> None:
    cases = found["patched"]["cases"]
    bad = cases["bad_id_mask"]
    assert bad["good"] and bad["graphs"] == bad["eager"] == ID_MASK
    assert bad["bad_replays"] == 0 and bad["rechecked"] == 1  # the graph's flag, then upstream's check
    assert cases["bad_padding"]["graphs"] == cases["bad_padding"]["eager"]
    assert cases["nan"]["equal"] == [True, True]


@pytest.mark.parametrize("name", ["other_model", "load_in_place", "load_assign", "moved", "train", "multi_step"])
def test_never_a_stale_graph(found, name: str) -> None:
    case = found["patched"]["cases"][name]
    assert "error" not in case, case
    assert all(v is True or v == [True, True] for k, v in case.items()
               if k not in ("delta", "eager_delta", "rechecked", "refused")), case


def test_what_each_stale_case_does(found) -> None:
    cases = found["patched"]["cases"]
    # Its own graph, and the first model's again: the eviction case, run just before, left room for two graphs.
    assert cases["other_model"]["delta"]["captures"] == 2 and cases["other_model"]["first_again"]
    assert cases["load_in_place"]["delta"]["captures"] == 0  # written in place: the graph reads the new weights
    assert cases["load_assign"]["delta"]["captures"] == 1  # (moved back, parameters may land where they were)
    assert cases["train"]["eager_delta"].get("training mode, forward hooks or a compiled submodule") == 1
    assert cases["multi_step"]["eager_delta"].get("multi-step forecast") == 2


@pytest.mark.parametrize("name", ["float16", "bfloat16", "autocast"])
def test_every_dtype_forecasts_as_the_eager_path(found, name: str) -> None:
    case = found["patched"]["cases"][name]
    assert "error" not in case and case["equal"] == [True, True], case


def test_a_failed_capture_falls_back_logged_once_and_leaves_the_device_usable(found) -> None:
    case = found["patched"]["cases"]["failure"]
    assert "error" not in case, case
    assert case["equal"] == [True, True, True] and case["healthy_after"] == [True, True]
    assert case["delta"]["failures"] == 1 and case["delta"]["captures"] == 0  # then eager for the whole process
    assert case["eager_delta"]["a capture failed earlier in this process"] == 4
    assert found["patched"]["counts"]["failures"] == 1  # no other case's capture failed
    (warning,) = case["warnings"]
    assert "could not be captured" in warning and "TOTOPATCH_CUDA_GRAPHS=0" in warning
