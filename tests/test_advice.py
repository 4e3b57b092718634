from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from totopatch import advice
from totopatch.patches import PATCHES

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def figures(data: dict, s: advice.Scenario, mode: str, cache: str) -> tuple[float, float]:
    """(ms per forecast, first call s) of one row, from gpu_bench.py's or backtest_bench.py's result format."""
    if "gpu" in data["meta"]:  # gpu_bench.py: every row compiles with an empty cache, no sampling option
        key = (s.name, s.variant, mode)
        (found,) = [r for r in data["rows"] if (r["scenario"], r["variant"], r["mode"]) == key]
        return found["median_ms"], found["first_call_s"]
    key = (s.name, s.variant, mode, cache, s.sampling)
    (found,) = [r for r in data["rows"] if (r["scenario"], r["variant"], r["mode"], r["cache"],
                                            (r.get("options") or {}).get("sampling") or "exact") == key]
    return found["warm_median_ms"], found["first_call_s"]


def _id(s: advice.Scenario) -> str:
    return f"{s.date}-{s.name}-{s.sampling}-{s.eager_mode}-{s.mode}-{s.cache}"


@pytest.mark.parametrize("s", advice.SCENARIOS, ids=_id)
def test_every_figure_is_the_one_in_its_result_file(s: advice.Scenario) -> None:
    data = json.loads((RESULTS / s.source).read_text())
    device, torch = (data["meta"]["gpu"], data["meta"]["torch"]) if "gpu" in data["meta"] else (data["device"], data["torch"])
    assert (device, torch) == (s.device, s.torch)
    assert data["meta"]["date"].startswith(s.date)
    eager_ms, eager_first_s = figures(data, s, s.eager_mode, "fresh")
    assert eager_ms == pytest.approx(s.eager_ms, abs=5e-4)
    assert eager_first_s == pytest.approx(s.eager_first_s, abs=5e-4)
    compiled_ms, first_call_s = figures(data, s, s.mode, s.cache)
    assert compiled_ms == pytest.approx(s.compiled_ms, abs=5e-4)
    assert first_call_s == pytest.approx(s.compile_s, abs=5e-4)


def test_break_even_is_the_longer_first_call_over_the_time_saved_per_forecast() -> None:
    s = advice.Scenario("x", "x", "x", "x", "x", "x", "patched", eager_ms=100.0, mode="default", compiled_ms=20.0,
                        compile_s=60.5, eager_first_s=0.5)
    assert s.break_even == 750
    assert dataclasses.replace(s, compiled_ms=100.0).break_even is None  # compiled is no faster: never


def test_the_performance_page_table_is_generated_from_the_data() -> None:
    assert advice.markdown_table() in PAGE.read_text()


def test_the_advice_runs_eager_with_graphs_unless_same_law_passes_its_break_even() -> None:
    current = {(s.eager_mode, s.sampling): s for s in advice.SCENARIOS if s.current and s.name == "single"}
    exact, same_law = current["graphs", "exact"], current["graphs", "same-law"]
    assert exact.break_even is None and same_law.break_even is not None
    eager = [p.id for p in PATCHES if not p.compiled_only]
    line = advice.choice(eager)
    assert line.startswith("run Toto eager (TOTO_DISABLE_COMPILE=1)") and "cuda-graphs" in line
    assert "with exact sampling compiling never pays off" in line
    assert f"more than {same_law.break_even:,} forecasts" in line
    assert all(s.date in text for s, text in zip([s for s in advice.SCENARIOS if s.current], advice.lines()))
