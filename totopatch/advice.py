"""Measured advice: what to run, and after how many forecasts in one process compiling Toto pays for its compile.

Every figure is copied from a result file committed under ``benchmarks/results/``, and
``tests/test_advice.py`` checks each one against its file; the break-even table of ``docs/performance.md`` is
``python -m totopatch.advice`` and is checked against this data too.  To add a measured comparison, add one
``Scenario`` to ``SCENARIOS``; mark the ones a later run or later patches supersede ``current=False`` (the
table keeps them, dated; ``totopatch doctor`` prints only the current ones).

break-even forecasts = (compiled first call - eager first call) / (eager - compiled seconds per forecast): both
rows' first calls (an empty compile cache for the compiled one) forecast once too.  "Eager" is the row compiling
is weighed against: plain eager, or eager with the ``cuda-graphs`` patch's replays (``graphs``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Scenario:
    name: str  # the scenario's name in the result file
    call_pattern: str
    source: str  # the result file, relative to benchmarks/results/
    device: str
    torch: str
    date: str
    variant: str  # the tree both rows ran: "patched" (all default patches of that day)
    eager_ms: float  # median per forecast of the eager row
    mode: str  # the compile mode of the compiled row
    compiled_ms: float  # median per forecast after warm-up
    compile_s: float  # the compiled row's first call
    cache: str = "fresh"  # the compiled row's compile cache: "fresh" (empty) or "warm" (a new process, same folder)
    eager_first_s: float = 0.0  # the eager row's first call
    eager_mode: str = "eager"  # the eager row's mode: "eager", or "graphs" (eager with cuda-graphs' replays on)
    eager_label: str = "eager"  # what the eager row ran, in words
    sampling: str | None = "exact"  # TOTOPATCH_SAMPLING of both rows; None: a mean forecast, nothing sampled
    current: bool = True  # False: the patches have changed what was measured since; kept for the pages citing it

    @property
    def break_even(self) -> int | None:
        """Forecasts per process from which compiling is faster overall; None if it never is."""
        saved_s = (self.eager_ms - self.compiled_ms) / 1000
        return math.ceil(max(0.0, self.compile_s - self.eager_first_s) / saved_s) if saved_s > 0 else None


_BACKTEST = ("backtest: 42 one-step forecasts over 6 context lengths (512-2200), 3072 samples in batches of 384, "
             "TF32 on")
_DECODE = "decode: 8 variates, context 512, prediction 384, mean forecast"
_SAMPLES = "samples: 1 variate, context 512, prediction 64, 256 samples in one batch"

_BACKTEST_1130 = dict(source="2026-11-30_h200_backtest/backtest_h200_20261130.json", device="NVIDIA H200",
                      torch="2.11.0+cu130", date="2026-11-30", variant="patched")
_BACKTEST_1128 = dict(source="2026-11-28_h200_backtest/backtest_h200_20261128.json", device="NVIDIA H200",
                      torch="2.11.0+cu130", date="2026-11-28", variant="patched", current=False)
_H200_1126 = dict(source="2026-11-26_h200_gpu_bench/final_h200_20261126.json", device="NVIDIA H200",
                  torch="2.11.0+cu130", date="2026-11-26", variant="patched")

# 2026-11-30, nine patches: eager with CUDA-graph replays, and plain eager (replays off), against reduce-overhead.
_GRAPHS = dict(_BACKTEST_1130, eager_mode="graphs", eager_label="eager + CUDA graphs", mode="reduce-overhead")
_PLAIN = dict(_BACKTEST_1130, eager_label="eager, CUDA graphs off", mode="reduce-overhead")
_EXACT = dict(compiled_ms=5.5773, compile_s=30.8584)
_SAME_LAW = dict(compiled_ms=2.2667, compile_s=28.1357, sampling="same-law")
# 2026-11-28, before scaler-constant, id-mask-check and cuda-graphs (five default patches then).
_EAGER_1128 = dict(_BACKTEST_1128, eager_ms=21.9012, eager_first_s=0.5347)
# 2026-11-26, four default patches then: decode is multi-step (no graphs); samples is one-step, which shared-prefill
# and cuda-graphs, written since, now change.
_DECODE_1126 = dict(_H200_1126, eager_ms=83.7086, eager_first_s=0.5076, sampling=None)
_SAMPLES_1126 = dict(_H200_1126, eager_ms=25.2332, eager_first_s=0.0754, current=False)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("single", _BACKTEST, **_GRAPHS, **_EXACT, eager_ms=5.3901, eager_first_s=0.7052),
    Scenario("single", _BACKTEST, **_GRAPHS, **_SAME_LAW, eager_ms=3.2513, eager_first_s=0.6239),
    Scenario("single", _BACKTEST, **_PLAIN, **_EXACT, eager_ms=25.1821, eager_first_s=0.6488),
    Scenario("single", _BACKTEST, **_PLAIN, **_SAME_LAW, eager_ms=16.4891, eager_first_s=0.6537),
    Scenario("single", _BACKTEST, **_EAGER_1128, mode="reduce-overhead", compiled_ms=7.5358, compile_s=33.4057),
    Scenario("single", _BACKTEST, **_EAGER_1128, mode="reduce-overhead", compiled_ms=7.9745, compile_s=9.9164,
             cache="warm"),
    Scenario("single", _BACKTEST, **_EAGER_1128, mode="default", compiled_ms=13.2357, compile_s=34.3063),
    Scenario("single", _BACKTEST, **_EAGER_1128, mode="default", compiled_ms=10.4351, compile_s=6.7048, cache="warm"),
    Scenario("decode", _DECODE, **_DECODE_1126, mode="reduce-overhead", compiled_ms=20.9468, compile_s=65.7985),
    Scenario("decode", _DECODE, **_DECODE_1126, mode="default", compiled_ms=33.5442, compile_s=58.5619),
    Scenario("samples", _SAMPLES, **_SAMPLES_1126, mode="reduce-overhead", compiled_ms=22.0609, compile_s=23.4170),
    Scenario("samples", _SAMPLES, **_SAMPLES_1126, mode="default", compiled_ms=22.0064, compile_s=23.0156),
)

def _ms(value: float) -> str:
    """Three significant digits, trailing zeros kept: 5.39, 22.0, 271."""
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}" if value else "0"


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _count(n: int | None) -> str:
    return "never" if n is None else f"{n:,}"


def _pays_off(s: Scenario) -> str:
    return "compiling never pays off" if s.break_even is None else \
        f"compiling pays off from {s.break_even:,} forecasts per process"


def lines() -> list[str]:
    """One line per current scenario, for ``totopatch doctor``."""
    return [f"{s.call_pattern} ({s.device}, {s.date}){f', {s.sampling} sampling' if s.sampling else ''}: "
            f"{s.eager_label} {_ms(s.eager_ms)} ms, {s.mode} {_ms(s.compiled_ms)} ms a forecast after a "
            f"{s.compile_s:.1f} s first call ({s.cache} compile cache); {_pays_off(s)}" for s in SCENARIOS if s.current]


def choice(eager_patches: Sequence[str]) -> str:
    """What to run, in one line, from the current comparisons of eager with CUDA graphs against compiled."""
    graphs = {s.sampling: s for s in SCENARIOS if s.current and s.eager_mode == "graphs"}
    named = f" ({_join(eager_patches)} work eagerly)" if eager_patches else ""
    out = [f"run Toto eager (TOTO_DISABLE_COMPILE=1) with the patches{named}"]
    for sampling, s in graphs.items():
        weighed = f"{s.mode} {_ms(s.compiled_ms)} ms against {_ms(s.eager_ms)} ms a forecast with CUDA graphs"
        if s.break_even is None:
            out.append(f"with {sampling} sampling compiling never pays off ({weighed})")
        else:
            out.append(f"with {sampling} sampling compile ({s.mode}) only where a process makes more than "
                       f"{s.break_even:,} forecasts ({weighed}, after a {s.compile_s:.0f} s first call)")
    return "; ".join(out)


def markdown_table() -> str:
    """The break-even table of ``docs/performance.md``; each source links to its result file."""
    rows = ["| call pattern | sampling | eager row | compile mode | compile cache | eager ms | compiled ms | "
            "first call s (eager / compiled) | break-even forecasts per process | source |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    rows += [f"| {s.call_pattern} | {s.sampling or 'none (mean)'} | {s.eager_label} | {s.mode} | {s.cache} | "
             f"{_ms(s.eager_ms)} | {_ms(s.compiled_ms)} | {s.eager_first_s:.1f} / {s.compile_s:.1f} | "
             f"{_count(s.break_even)} | [`{Path(s.source).name}`](../benchmarks/results/{s.source}) "
             f"({s.device}, torch {s.torch}, {s.date}{'' if s.current else '; superseded'}) |" for s in SCENARIOS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
