"""Measured advice: after how many forecasts in one process compiling Toto pays for its compile time.

Every figure is copied from a result file committed under ``benchmarks/results/``, and
``tests/test_advice.py`` checks each one against its file; the break-even table of ``docs/performance.md`` is
``python -m totopatch.advice`` and is checked against this data too.  To add a call pattern, add one
``Scenario`` to ``SCENARIOS``.

break-even forecasts = compile seconds / (eager - compiled seconds per forecast), where the compile
seconds are the compiled run's first call with an empty compile cache (which also forecasts once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Scenario:
    name: str  # the scenario's name in the result file
    call_pattern: str
    source: str  # the result file, relative to benchmarks/results/
    device: str
    torch: str
    date: str
    variant: str  # the tree both rows ran: "patched" (all default patches)
    eager_ms: float  # median per forecast, compile off
    mode: str  # the compile mode of the compiled row
    compiled_ms: float  # median per forecast after warm-up
    compile_s: float  # the compiled row's first call
    cache: str = "fresh"  # the compiled row's compile cache: "fresh" (empty) or "warm" (a new process, same folder)

    @property
    def break_even(self) -> int | None:
        """Forecasts per process from which compiling is faster overall; None if it never is."""
        saved_s = (self.eager_ms - self.compiled_ms) / 1000
        return math.ceil(self.compile_s / saved_s) if saved_s > 0 else None


_H200 = dict(source="2026-11-26_h200_gpu_bench/final_h200_20261126.json", device="NVIDIA H200",
             torch="2.11.0+cu130", date="2026-11-26", variant="patched")
_DECODE = "decode: 8 variates, context 512, prediction 384, mean forecast"
_SAMPLES = "samples: 1 variate, context 512, prediction 64, 256 samples in one batch"

_BACKTEST_H200 = dict(source="2026-11-28_h200_backtest/backtest_h200_20261128.json", device="NVIDIA H200",
                      torch="2.11.0+cu130", date="2026-11-28", variant="patched")
_BACKTEST = ("backtest: 42 one-step forecasts over 6 context lengths (512-2200), 3072 samples in batches of 384, "
             "TF32 on")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("single", _BACKTEST, **_BACKTEST_H200, eager_ms=21.9012, mode="reduce-overhead", compiled_ms=7.5358,
             compile_s=33.4057),
    Scenario("single", _BACKTEST, **_BACKTEST_H200, eager_ms=21.9012, mode="reduce-overhead", compiled_ms=7.9745,
             compile_s=9.9164, cache="warm"),
    Scenario("single", _BACKTEST, **_BACKTEST_H200, eager_ms=21.9012, mode="default", compiled_ms=13.2357,
             compile_s=34.3063),
    Scenario("single", _BACKTEST, **_BACKTEST_H200, eager_ms=21.9012, mode="default", compiled_ms=10.4351,
             compile_s=6.7048, cache="warm"),
    Scenario("decode", _DECODE, **_H200, eager_ms=83.709, mode="reduce-overhead", compiled_ms=20.947, compile_s=65.80),
    Scenario("decode", _DECODE, **_H200, eager_ms=83.709, mode="default", compiled_ms=33.544, compile_s=58.56),
    Scenario("samples", _SAMPLES, **_H200, eager_ms=25.233, mode="reduce-overhead", compiled_ms=22.061, compile_s=23.42),
    Scenario("samples", _SAMPLES, **_H200, eager_ms=25.233, mode="default", compiled_ms=22.006, compile_s=23.02),
)


def _count(n: int | None) -> str:
    return "never" if n is None else f"{n:,}"


def lines() -> list[str]:
    """One line per scenario, for ``totopatch doctor``."""
    return [f"{s.call_pattern} ({s.device}): eager {s.eager_ms:.1f} ms, {s.mode} {s.compiled_ms:.1f} ms a forecast "
            f"after a {s.compile_s:.1f} s first call ({s.cache} compile cache); compiling pays off from "
            f"{_count(s.break_even)} forecasts per process" for s in SCENARIOS]


def markdown_table() -> str:
    """The break-even table of ``docs/performance.md``; each source links to its result file."""
    rows = ["| call pattern | compile mode | compile cache | eager ms | compiled ms | first call s | break-even "
            "forecasts per process | source |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    rows += [f"| {s.call_pattern} | {s.mode} | {s.cache} | {s.eager_ms:.1f} | {s.compiled_ms:.1f} | {s.compile_s:.1f} | "
             f"{_count(s.break_even)} | [`{Path(s.source).name}`](../benchmarks/results/{s.source}) "
             f"({s.device}, torch {s.torch}, {s.date}) |" for s in SCENARIOS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
