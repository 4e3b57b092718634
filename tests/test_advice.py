from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from totopatch import advice

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
README = Path(__file__).resolve().parents[1] / "README.md"


def row(data: dict, scenario: str, variant: str, mode: str) -> dict:
    (found,) = [r for r in data["rows"] if (r["scenario"], r["variant"], r["mode"]) == (scenario, variant, mode)]
    return found


@pytest.mark.parametrize("s", advice.SCENARIOS, ids=lambda s: f"{s.name}-{s.mode}")
def test_every_figure_is_the_one_in_its_result_file(s: advice.Scenario) -> None:
    data = json.loads((RESULTS / s.source).read_text())
    assert (data["meta"]["gpu"], data["meta"]["torch"]) == (s.device, s.torch)
    assert data["meta"]["date"].startswith(s.date)
    assert row(data, s.name, s.variant, "eager")["median_ms"] == pytest.approx(s.eager_ms, abs=5e-4)
    compiled = row(data, s.name, s.variant, s.mode)
    assert compiled["median_ms"] == pytest.approx(s.compiled_ms, abs=5e-4)
    assert compiled["first_call_s"] == pytest.approx(s.compile_s, abs=5e-3)


def test_break_even_is_compile_seconds_over_the_time_saved_per_forecast() -> None:
    s = advice.Scenario("x", "x", "x", "x", "x", "x", "patched", eager_ms=100.0, mode="default", compiled_ms=20.0,
                        compile_s=60.0)
    assert s.break_even == 750
    assert dataclasses.replace(s, compiled_ms=100.0).break_even is None  # compiled is no faster: never


def test_the_readme_table_is_generated_from_the_data() -> None:
    assert advice.markdown_table() in README.read_text()
