"""What the compile logs say: recompiles, graph breaks, cudagraph skips and compile-cache bypasses.

Shared by the benchmarks' row processes (``backtest_worker.py``, ``gpu_bench.py``); torch is passed in, never
imported here, so the orchestrators stay free of it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable


def on_cudagraph_skip(callback: Callable[[str], None]) -> None:
    """Hand the text of every cudagraph skip to ``callback`` (the "cudagraphs" log artifact is off by default)."""
    for modname in ("cudagraph_utils", "cudagraph_trees", "output_code", "compile_fx"):
        try:
            mod = importlib.import_module(f"torch._inductor.{modname}")
        except ImportError:
            continue
        original = getattr(mod, "log_cudagraph_skip_and_bump_counter", None)
        if original is None or getattr(original, "_benchmark_hook", False):
            continue

        def skip(msg: str, *a: Any, _orig: Any = original, **k: Any) -> Any:
            callback(str(msg))
            return _orig(msg, *a, **k)

        skip._benchmark_hook = True  # type: ignore[attr-defined]
        mod.log_cudagraph_skip_and_bump_counter = skip


class LogCollector(logging.Handler):
    """Keep the text of recompiles, cudagraph skips and compile-cache bypasses (first few of each)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.recompile_reasons: list[str] = []
        self.skip_reasons: list[str] = []
        self.bypass_reasons: list[str] = []
        self.fx_keys: list[str] = []  # "hit KEY" / "miss KEY" of the FX graph cache, in order
        self.fx_details: list[str] = []  # what each FX graph cache key was hashed from

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a log record that cannot format is not ours to report
            return
        if msg.startswith("Recompiling function") and len(self.recompile_reasons) < 12:
            self.recompile_reasons.append(msg[:600])
        elif "skipping cudagraphs" in msg.lower():
            self.add_skip(msg)
        elif msg.startswith("Bypassing"):
            self.add_bypass(f"{record.name}: {msg}")
        elif msg.startswith("fx graph cache ") and " for key " in msg and len(self.fx_keys) < 64:
            self.fx_keys.append(msg[len("fx graph cache "):])
        elif msg.startswith("FX graph cache hash details") and len(self.fx_details) < 8:
            self.fx_details.append(msg[:60000])

    def add_skip(self, msg: str) -> None:
        if len(self.skip_reasons) < 8 and msg[:300] not in self.skip_reasons:
            self.skip_reasons.append(msg[:300])

    def add_bypass(self, msg: str) -> None:
        if len(self.bypass_reasons) < 12 and msg[:400] not in self.bypass_reasons:
            self.bypass_reasons.append(msg[:400])


def hook_logs(torch: Any, collector: LogCollector) -> None:
    """Route recompile, cudagraph-skip and cache-bypass messages to ``collector``."""
    if getattr(collector, "hooked", False):
        return
    collector.hooked = True

    for name in ("torch._dynamo", "torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache"):
        logger = logging.getLogger(name)
        logger.addHandler(collector)
        if name == "torch._inductor.codecache":
            # its debug level says what each FX graph cache key was hashed from; kept out of the log
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        elif name != "torch._dynamo" and logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    for modname in ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        original = getattr(mod, "log_cache_bypass", None)
        if original is None:
            continue

        def bypass(kind: str, reason: str, _orig: Any = original) -> None:
            collector.add_bypass(f"{kind}: {reason}")
            _orig(kind, reason)

        mod.log_cache_bypass = bypass
    on_cudagraph_skip(collector.add_skip)


def cache_counters(counters: Any) -> dict:
    """The compile caches' hit/miss/bypass counters (FX graph, AOTAutograd, PGO)."""
    out = {f"inductor.{k}": v for k, v in counters["inductor"].items() if "cache" in k}
    out.update({f"aot_autograd.{k}": v for k, v in counters["aot_autograd"].items()})
    out.update({f"pgo.{k}": v for k, v in counters.get("pgo", {}).items()} if hasattr(counters, "get") else {})
    return out


def compile_times_summary(torch: Any) -> str | None:
    try:
        from torch._dynamo.utils import compile_times

        text = compile_times(repr="str", aggregate=True)
        return None if text is None else str(text)[:2000]
    except Exception as exc:  # noqa: BLE001 - optional diagnostics
        return f"unavailable: {exc}"
