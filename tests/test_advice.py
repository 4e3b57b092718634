from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from totopatch import advice

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def figures(data: dict, s: advice.Scenario, mode: str, cache: str) -> tuple[float, float]:
    """(ms per forecast, first call s) of one row, from gpu_bench.py's or backtest_bench.py's result format."""
    if "gpu" in data["meta"]:  # gpu_bench.py: every row compiles with an empty cache
        key = (s.name, s.variant, mode)
        (found,) = [r for r in data["rows"] if (r["scenario"], r["variant"], r["mode"]) == key]
        return found["median_ms"], found["first_call_s"]
    key = (s.name, s.variant, mode, cache)
    (found,) = [r for r in data["rows"] if (r["scenario"], r["variant"], r["mode"], r["cache"]) == key]
    return found["warm_median_ms"], found["first_call_s"]


@pytest.mark.parametrize("s", advice.SCENARIOS, ids=lambda s: f"{s.name}-{s.mode}-{s.cache}")
def test_every_figure_is_the_one_in_its_result_file(s: advice.Scenario) -> None:
    data = json.loads((RESULTS / s.source).read_text())
    device, torch = (data["meta"]["gpu"], data["meta"]["torch"]) if "gpu" in data["meta"] else (data["device"], data["torch"])
    assert (device, torch) == (s.device, s.torch)
    assert data["meta"]["date"].startswith(s.date)
    assert figures(data, s, "eager", "fresh")[0] == pytest.approx(s.eager_ms, abs=5e-4)
    compiled_ms, first_call_s = figures(data, s, s.mode, s.cache)
    assert compiled_ms == pytest.approx(s.compiled_ms, abs=5e-4)
    assert first_call_s == pytest.approx(s.compile_s, abs=5e-3)


def test_break_even_is_compile_seconds_over_the_time_saved_per_forecast() -> None:
    s = advice.Scenario("x", "x", "x", "x", "x", "x", "patched", eager_ms=100.0, mode="default", compiled_ms=20.0,
                        compile_s=60.0)
    assert s.break_even == 750
    assert dataclasses.replace(s, compiled_ms=100.0).break_even is None  # compiled is no faster: never


def test_the_performance_page_table_is_generated_from_the_data() -> None:
    assert advice.markdown_table() in PAGE.read_text()
