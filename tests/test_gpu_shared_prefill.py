"""shared-prefill on CUDA: upstream's samples for the same seed, and no more memory, in the Toto-Open-Base shape.

Skipped where CUDA is absent (CI has no GPU); run on the device with `pytest -m gpu`.
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

SCRIPT = Path(__file__).parent / "fixtures" / "prefill" / "gpu_samples.py"
RTOL = 1e-4


def relative(a, b):
    return (a - b).abs() / a.abs().clamp_min(1e-6)


def run(parent: Path, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toto-parent", str(parent), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_shared_prefill_samples_and_memory_match_upstream_on_cuda(project, cli, tmp_path) -> None:
    assert cli(project, "apply", "shared-prefill").exit_code == 0
    before = run(installed_toto_package().parent, tmp_path / "before.pt")
    after = run(project / "toto", tmp_path / "after.pt")
    assert (before["forecaster"], after["forecaster"]) == ("TotoForecaster", "TotoForecasterSharedPrefill")
    report = {"peak_gb": [before["peak_bytes"] / 2**30, after["peak_bytes"] / 2**30],
              "replay_s": [before["replay_s"], after["replay_s"]], "cases": {}}
    for name, a in before["samples"].items():
        b = after["samples"][name]
        assert a.shape == b.shape, name
        q = torch.tensor([0.1, 0.5, 0.9])
        quantile_rel = relative(a.quantile(q, dim=-1), b.quantile(q, dim=-1)).max().item()
        within = (relative(a, b) <= RTOL).float().mean().item()
        report["cases"][name] = {"quantile_max_rel": quantile_rel, "share_within_1e-4": within,
                                 "max_rel": relative(a, b).max().item()}
    print(json.dumps(report, indent=2))
    for name, case in report["cases"].items():
        assert case["quantile_max_rel"] <= RTOL, name
        assert case["share_within_1e-4"] >= 0.999, name
    assert after["peak_bytes"] <= before["peak_bytes"]


def test_every_patch_compiled_with_cuda_graphs_gives_the_eager_samples(project, cli, tmp_path) -> None:
    """Under reduce-overhead the later steps' model calls overwrite the prefill's outputs, which the first step's
    tiled distribution must then not read (multi-step cases), and the one-step replay reads them in place."""
    assert cli(project, "apply").exit_code == 0
    eager = run(project / "toto", tmp_path / "eager.pt", "--shape", "tiny")
    compiled = run(project / "toto", tmp_path / "compiled.pt", "--shape", "tiny", "--compile", "reduce-overhead")
    assert compiled["forecaster"] == "TotoForecasterSharedPrefill"
    q = torch.tensor([0.1, 0.5, 0.9])
    for name, a in eager["samples"].items():
        b = compiled["samples"][name]
        assert a.shape == b.shape and bool(torch.isfinite(b).all()), name
        quantile_rel = relative(a.quantile(q, dim=-1), b.quantile(q, dim=-1)).max().item()
        print(name, quantile_rel)
        assert quantile_rel <= 1e-3, name
