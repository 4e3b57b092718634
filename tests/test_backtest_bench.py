"""benchmarks/backtest_bench.py end to end on the tiny model, so the GPU benchmark cannot rot unnoticed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import prefork
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "backtest_bench.py"
ROW_KEYS = ("variant", "mode", "cache", "cold_total_s", "first_call_s", "warm_median_ms", "recompiles",
            "cudagraph_skips", "graph_breaks", "peak_mem_gb", "quantile_max_rel_diff", "scenario", "options", "error")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.slow
def test_tiny_replay_writes_every_key_with_sane_values(tmp_path: Path) -> None:
    cmd = [prefork.python(), str(SCRIPT), "--tiny", "--device", "cpu", "--backend", "eager", "--threads", "1",
           "--scenarios", "single", "--lengths", "40", "--horizons", "2,1", "--num-samples", "16",
           "--samples-per-batch", "8", "--rows", "unpatched:eager,patched:default+dynamic=mark",
           "--out", str(tmp_path), "--stem", "bt"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    doc = json.loads((tmp_path / "bt.json").read_text())
    assert doc["device"].startswith("CPU") and doc["torch"]
    assert [(r["variant"], r["mode"], r["cache"]) for r in doc["rows"]] == [
        ("unpatched", "eager", "fresh"), ("patched", "default", "fresh")]
    for row in doc["rows"]:
        assert set(ROW_KEYS) <= set(row), set(ROW_KEYS) - set(row)
        assert row["error"] is None, row["error"]
        assert 0 < row["first_call_s"] <= row["cold_total_s"]
        assert row["warm_median_ms"] > 0 and row["forecasts_per_replay"] == 2
        assert row["recompiles"] == 0 and row["cudagraph_skips"] == 0 and row["graph_breaks"] == 0
        assert row["peak_mem_gb"] is None
        assert row["quantile_max_rel_diff"] is not None and row["quantile_max_rel_diff"] < 1e-5
    eager, patched = doc["rows"]
    assert eager["quantile_max_rel_diff"] == 0.0 and eager["warm_speedup_vs_eager"] == 1.0
    assert patched["kv_cache_class"] == "KVCacheCompileFriendly"
    assert patched["options"]["dynamic"] == "mark" and patched["options"]["backend"] == "eager"
    assert "kv-cache" in doc["meta"]["patches"]
    table = (tmp_path / "bt.md").read_text()
    assert "| patched / default (dynamic=mark) | fresh |" in table
    assert "patched / default" in proc.stdout  # a progress line per finished row


def bench() -> Any:
    """benchmarks/backtest_bench.py as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import backtest_bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return backtest_bench


def test_rows_name_a_known_variant_and_mode_and_the_reference_runs_first() -> None:
    bb = bench()
    args = bb.arguments(["--rows", "patched:reduce-overhead+dynamic=mark,patched:eager", "--warm", "dir"])
    rows = bb.expand_rows(args)
    assert [(r["variant"], r["mode"], r["cache"]) for r in rows] == [
        ("unpatched", "eager", "fresh"), ("patched", "reduce-overhead", "fresh"), ("patched", "reduce-overhead", "warm"),
        ("patched", "eager", "fresh")]
    assert rows[1]["options"]["dynamic"] == "mark" and rows[2]["options"]["warm_from"] == "cache-dir"
    for bad in ("patched:cudagraphs", "patched-samelaw:eager", "patched"):
        with pytest.raises(SystemExit, match=f"VARIANT one of {', '.join(bb.VARIANTS)}, MODE one of eager"):
            bb.parse_row(bad, args)
    with pytest.raises(SystemExit, match="unknown option 'sampling=fast'"):
        bb.parse_row("patched:eager+sampling=fast", args)


def test_graphs_rows_turn_the_replays_on_and_every_other_row_off_and_sampling_is_the_rows() -> None:
    bb = bench()
    args = bb.arguments([])
    envs = {text: bb.row_environment(bb.parse_row(text, args)) for text in (
        "unpatched:eager", "patched:eager", "patched:graphs", "patched:graphs+sampling=same-law",
        "patched:reduce-overhead+sampling=same-law")}
    assert envs == {
        "unpatched:eager": {"TOTOPATCH_CUDA_GRAPHS": "0", "TOTOPATCH_SAMPLING": "exact"},
        "patched:eager": {"TOTOPATCH_CUDA_GRAPHS": "0", "TOTOPATCH_SAMPLING": "exact"},
        "patched:graphs": {"TOTOPATCH_CUDA_GRAPHS": "1", "TOTOPATCH_SAMPLING": "exact"},
        "patched:graphs+sampling=same-law": {"TOTOPATCH_CUDA_GRAPHS": "1", "TOTOPATCH_SAMPLING": "same-law"},
        "patched:reduce-overhead+sampling=same-law": {"TOTOPATCH_CUDA_GRAPHS": "0", "TOTOPATCH_SAMPLING": "same-law"},
    }
    assert bb.parse_row("patched:graphs+sampling=same-law", args)["options"]["sampling"] == "same-law"


def test_a_failing_row_is_recorded_with_its_error(tmp_path: Path) -> None:
    bb = bench()
    empty = tmp_path / "no_toto_here"
    empty.mkdir()
    spec = {"variant": "patched", "mode": "eager", "cache": "fresh", "options": {"dynamic": None, "regional": False},
            "scenario": "single", "tag": "x", "work": str(tmp_path), "cache_root": str(tmp_path / "cache"),
            "toto_parent": str(empty)}
    res = bb.run_worker(spec, tmp_path / "x.log", timeout=120)
    row = res["row"]
    assert set(bb.ROW_KEYS) <= set(row)
    assert row["cold_total_s"] is None and "ImportError" in row["error"], row["error"]
