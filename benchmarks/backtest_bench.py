#!/usr/bin/env python3
"""Benchmark Toto on the users' backtest call pattern: many short forecasts, a new context length each.

The users' script forecasts, per series and per horizon h = 7..1::

    pipeline.predict(context=close[:-h], prediction_length=1, num_samples=3072, samples_per_batch=384)

Here that call is ``TotoForecaster(backbone).forecast(MaskedTimeseries(series=context[None, :], ...),
prediction_length=1, num_samples=3072, samples_per_batch=384, use_kv_cache=True)``: one variate, no padding,
id mask 0, daily timestamps; the quantiles come from ``Forecast.samples``.  ``backbone`` is the
``TotoBackbone`` (``toto.model``), compiled as ``torch.compile(toto.model, mode=MODE)`` like gpu_bench.py.

Scenarios (``--scenarios``, default ``single``):

- ``single``: 6 synthetic price series (lengths 512, 777, 1024, 1400, 1800, 2200; geometric random walks,
  seeded), horizons 7..1, so 42 forecasts, prediction 1, 3072 samples in batches of 384;
- ``multi``: the same 6 series, horizon 1 only (6 forecasts, one per context length), prediction 384
  (prefill + 5 decode steps), 3072 samples in batches of 384.

Model: Toto-Open-Base-1.0 shape (``totopatch/model_shape.py``), random weights (seed 0), fp32, eval;
TF32 on; on CUDA flash and memory-efficient SDPA on and math SDPA off (``--allow-math-sdp`` to keep it).

Rows: ``VARIANT:MODE[+OPTION...]``, VARIANT ``unpatched`` (the installed toto, or ``--toto-parent``) or
``patched`` (a copy of it with every default totopatch patch applied, made with
``python -m totopatch --root COPY apply``, or ``--patched-parent``); MODE ``eager`` or a torch.compile mode.
OPTIONs: ``dynamic=auto|true|false|mark`` (auto: torch's default; true/false: ``torch.compile(dynamic=...)``;
mark: ``torch._dynamo.maybe_mark_dynamic`` on the time dimension of every tensor the compiled backbone
receives, before each call), ``regional`` (compile each transformer layer with ``Module.compile`` instead of
the whole backbone).  Each (scenario, row) runs in its own process with a fresh
``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR`` (``cache: fresh``).  ``--warm dir`` adds, after each compiled
row, a second process that reuses that cache folder; ``--warm artifacts`` a second process with an empty
cache folder that first loads ``torch.compiler.save_cache_artifacts()`` from the fresh row (``cache: warm``,
``options.warm_from``); ``--warm both`` does both.

Per row: ``cold_total_s`` (first replay of all forecasts, compile included), ``first_call_s``,
``warm_median_ms`` (median per forecast over the warm replays, ``--repeats`` of them), ``recompiles``
(dynamo recompile messages over all replays), ``cudagraph_skips``, ``graph_breaks`` (dynamo counters),
``peak_mem_gb`` (``torch.cuda.max_memory_allocated``; null on CPU), ``quantile_max_rel_diff`` (10/50/90%
quantiles of each forecast's samples, same seed before each forecast, max |q - q_ref| / |q_ref| against the
scenario's first unpatched eager row of this run), plus ``scenario``, ``options``, ``error`` and extras
(warm statistics, compile-cache counters and bypass reasons, compile times).

Output: ``OUT/STEM.json`` (``device``, ``torch``, ``rows``, ``meta``), ``OUT/STEM.md``, ``OUT/STEM.png``
(if matplotlib imports) and per-row logs under ``OUT/logs/``; rewritten after every row.

Examples::

    python benchmarks/backtest_bench.py                                  # single-step, six rows
    python benchmarks/backtest_bench.py --scenarios multi                # prediction 384, six rows
    python benchmarks/backtest_bench.py --scenarios single --warm both --repeats 3
    python benchmarks/backtest_bench.py --rows unpatched:eager,patched:eager,unpatched:eager,patched:eager \\
        --repeats 10                                                     # eager A/B
    python benchmarks/backtest_bench.py --rows unpatched:eager,patched:reduce-overhead+dynamic=mark
    python benchmarks/backtest_bench.py --tiny --device cpu              # CPU check of the harness
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROW_KEYS = ("variant", "mode", "cache", "cold_total_s", "first_call_s", "warm_median_ms", "recompiles",
            "cudagraph_skips", "graph_breaks", "peak_mem_gb", "quantile_max_rel_diff")
QUANTILES = (0.1, 0.5, 0.9)
LENGTHS = (512, 777, 1024, 1400, 1800, 2200)
SCENARIOS = {
    "single": dict(lengths=LENGTHS, horizons=(7, 6, 5, 4, 3, 2, 1), prediction=1, num_samples=3072,
                   samples_per_batch=384),
    "multi": dict(lengths=LENGTHS, horizons=(1,), prediction=384, num_samples=3072, samples_per_batch=384),
}
TINY_SCENARIOS = {
    "single": dict(lengths=(40, 57), horizons=(3, 2, 1), prediction=1, num_samples=64, samples_per_batch=16),
    "multi": dict(lengths=(40, 57), horizons=(1,), prediction=12, num_samples=32, samples_per_batch=16),
}
DEFAULT_ROWS = ("unpatched:eager", "unpatched:default", "unpatched:reduce-overhead",
                "patched:eager", "patched:default", "patched:reduce-overhead")
DYNAMIC_CHOICES = ("auto", "true", "false", "mark")
SEED_BASE = 1000


# --------------------------------------------------------------------------------------
# worker: one (scenario, row) in a fresh process
# --------------------------------------------------------------------------------------


def make_series(torch: Any, length: int, index: int) -> Any:
    """A seeded geometric random walk around 100 (a daily close), float32."""
    g = torch.Generator().manual_seed(SEED_BASE + index)
    returns = 0.0003 + 0.015 * torch.randn(length, generator=g, dtype=torch.float64)
    season = 0.002 * torch.sin(2 * torch.pi * torch.arange(length, dtype=torch.float64) / 5)
    return (100.0 * torch.exp(torch.cumsum(returns + season, 0))).float()


def make_calls(torch: Any, toto_data: Any, scen: dict, device: Any) -> list[tuple[int, int, Any]]:
    """(length, horizon, MaskedTimeseries of series[:-h]) for every forecast of the replay, on ``device``."""
    calls = []
    for index, length in enumerate(scen["lengths"]):
        series = make_series(torch, length, index)
        for h in scen["horizons"]:
            context = series[:-h][None, :].to(device)
            t = context.shape[-1]
            calls.append((length, h, toto_data.MaskedTimeseries(
                series=context,
                padding_mask=torch.ones(1, t, dtype=torch.bool, device=device),
                id_mask=torch.zeros(1, t, dtype=torch.int, device=device),
                timestamp_seconds=(1_600_000_000 + 86_400 * torch.arange(t, device=device))[None, :],
                time_interval_seconds=torch.full((1,), 86_400, dtype=torch.int, device=device),
            )))
    return calls


def configure_torch(torch: Any, cuda: bool, allow_math_sdp: bool) -> dict:
    """TF32 on; on CUDA flash and memory-efficient SDPA on, math off (the users' settings)."""
    settings: dict[str, Any] = {"dtype": "float32"}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        settings["tf32"] = True
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.backends.cuda.enable_math_sdp(allow_math_sdp)
        settings.update(sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                        sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                        sdpa_math=torch.backends.cuda.math_sdp_enabled())
        if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
            settings["sdpa_cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    return settings


class MarkTimeDynamic:
    """Call a compiled backbone after marking the time dimension of its tensor arguments dynamic."""

    NAMES = ("inputs", "input_padding_mask", "id_mask")

    def __init__(self, torch: Any, compiled: Any) -> None:
        self._torch = torch
        self._compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for name in self.NAMES:
            value = kwargs.get(name)
            if isinstance(value, self._torch.Tensor) and value.shape[-1] > 1:
                self._torch._dynamo.maybe_mark_dynamic(value, value.dim() - 1)
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


def build_backbone(torch: Any, model: Any, spec: dict) -> Any:
    """The backbone as the row runs it: eager, compiled whole, or compiled per transformer layer."""
    backbone = model.model
    if spec["mode"] == "eager":
        return backbone
    opts = spec["options"]
    kwargs: dict[str, Any] = {}
    if spec.get("backend"):
        kwargs["backend"] = spec["backend"]
    elif spec["mode"] != "default":
        kwargs["mode"] = spec["mode"]
    if opts["dynamic"] in ("true", "false"):
        kwargs["dynamic"] = opts["dynamic"] == "true"
    if opts["regional"]:
        for layer in backbone.transformer.layers:
            layer.compile(**kwargs)
        return backbone
    compiled = torch.compile(backbone, **kwargs)
    if opts["dynamic"] == "mark":
        if hasattr(torch, "compiler") and hasattr(torch.compiler, "config") and \
                hasattr(torch.compiler.config, "dynamic_sources"):
            # the prefix length is a Python int argument: mark it by its source name
            torch.compiler.config.dynamic_sources = "L['scaling_prefix_length']"
            opts["dynamic_sources"] = torch.compiler.config.dynamic_sources
        else:
            opts["dynamic_sources"] = "unsupported by this torch"
        compiled = MarkTimeDynamic(torch, compiled)
    return compiled


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
    import importlib

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
    for modname in ("cudagraph_utils", "cudagraph_trees", "compile_fx"):
        try:
            mod = importlib.import_module(f"torch._inductor.{modname}")
        except ImportError:
            continue
        original = getattr(mod, "log_cudagraph_skip_and_bump_counter", None)
        if original is None:
            continue

        def skip(msg: str, *a: Any, _orig: Any = original, **k: Any) -> Any:
            collector.add_skip(str(msg))
            return _orig(msg, *a, **k)

        mod.log_cudagraph_skip_and_bump_counter = skip


def cache_counters(counters: Any) -> dict:
    """The compile caches' hit/miss/bypass counters (FX graph, AOTAutograd, PGO)."""
    out = {f"inductor.{k}": v for k, v in counters["inductor"].items() if "cache" in k}
    out.update({f"aot_autograd.{k}": v for k, v in counters["aot_autograd"].items()})
    out.update({f"pgo.{k}": v for k, v in counters.get("pgo", {}).items()} if hasattr(counters, "get") else {})
    return out


def quartiles(values: list[float]) -> dict:
    """min, q1, median, q3, IQR and n of ``values``."""
    v = sorted(values)
    if len(v) == 1:
        return {"n": 1, "min": v[0], "q1": v[0], "median": v[0], "q3": v[0], "iqr": 0.0}
    q1, med, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"n": len(v), "min": v[0], "q1": q1, "median": med, "q3": q3, "iqr": q3 - q1}


class Worker:
    """Run one row: build, first (cold) replay, warm replays; write the result file after each phase."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.t_start = time.perf_counter()
        self.row: dict[str, Any] = {k: None for k in ROW_KEYS}
        self.row.update(variant=spec["variant"], mode=spec["mode"], cache=spec["cache"],
                        scenario=spec["scenario"], options=spec["options"], error=None)
        self.meta: dict[str, Any] = {}

    def flush(self, phase: str) -> None:
        self.row["phase"] = phase
        self.row["worker_s"] = round(time.perf_counter() - self.t_start, 3)
        path = Path(self.spec["result"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"row": self.row, "meta": self.meta}, default=str))
        os.replace(tmp, path)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - the row records every failure, then the process exits
            import traceback

            traceback.print_exc()
            self.row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
            self.flush("error")
            if not isinstance(exc, Exception):
                raise

    def _run(self) -> None:
        from totopatch.smoke import _dynamo_log, _reasons, import_toto

        spec = self.spec
        toto = import_toto(Path(spec["toto_parent"]))
        import torch
        import torch._dynamo
        from torch._dynamo.utils import counters
        from toto.data.util import dataset as toto_data
        from toto.inference.forecaster import TotoForecaster
        from toto.model.toto import Toto

        from totopatch.model_shape import toto_kwargs

        device = torch.device(spec["device"])
        cuda = device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.meta.update(torch=torch.__version__, toto_file=toto.__file__,
                         device=torch.cuda.get_device_name(device) if cuda else cpu_name())
        self.row["options"].update(configure_torch(torch, cuda, spec["allow_math_sdp"]))
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.row["options"]["threads"] = torch.get_num_threads()
        collector = LogCollector()

        if spec["cache"] == "warm" and spec["options"].get("warm_from") == "artifacts":
            t0 = time.perf_counter()
            blob = Path(spec["artifacts_path"]).read_bytes()
            info = torch.compiler.load_cache_artifacts(blob)
            self.row["artifacts_load_s"] = round(time.perf_counter() - t0, 3)
            self.row["artifacts_bytes"] = len(blob)
            self.row["artifacts_info"] = str(info)[:600]

        t0 = time.perf_counter()
        torch.manual_seed(spec["seed"])
        model = Toto(**toto_kwargs(spec["shape"])).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        forecaster = TotoForecaster(build_backbone(torch, model, spec))
        self.row["kv_cache_class"] = sys.modules["toto.model.backbone"].KVCache.__name__
        scen = spec["scen"]
        calls = make_calls(torch, toto_data, scen, device)
        sync()
        self.row["build_s"] = round(time.perf_counter() - t0, 3)
        self.row["forecasts_per_replay"] = len(calls)
        self.flush("built")

        def replay() -> tuple[list[float], Any]:
            times, quants = [], []
            qs = torch.tensor(QUANTILES, device=device)
            for i, (_, _, inputs) in enumerate(calls):
                torch.manual_seed(spec["seed"] + SEED_BASE + i)
                sync()
                t = time.perf_counter()
                fc = forecaster.forecast(inputs, prediction_length=scen["prediction"],
                                         num_samples=scen["num_samples"],
                                         samples_per_batch=scen["samples_per_batch"], use_kv_cache=True)
                sync()
                times.append(time.perf_counter() - t)
                if i == 0 and not self.row["first_call_s"]:
                    self.row["first_call_s"] = round(times[0], 4)
                    self.flush("first-call")
                # (steps, 3): the quantiles over the samples of the one series and variate
                quants.append(torch.quantile(fc.samples[0, 0].float(), qs, dim=-1).T.cpu())
            return times, torch.stack(quants)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        counters.clear()
        with _dynamo_log() as dlog:
            hook_logs(torch, collector)  # after set_logs, which resets the loggers' levels
            t0 = time.perf_counter()
            cold_times, cold_q = replay()
            self.row["cold_wall_s"] = round(time.perf_counter() - t0, 3)  # with the quantiles' computation
            self.row["cold_total_s"] = round(sum(cold_times), 3)
            Path(spec["quantiles_path"]).write_text(json.dumps(cold_q.tolist()))
            self.row["cold_forecast_s_max"] = round(max(cold_times), 3)
            self.row["recompile_limit_hits"] = dlog.limit_hits
            self._record_counters(torch, counters, dlog.recompiles, collector, _reasons, cuda)
            self.row["recompiles_cold"] = dlog.recompiles
            self.row["cache_counters"] = cache_counters(counters)
            self.row["compile_times"] = compile_times_summary(torch)
            Path(spec["fx_details_path"]).write_text(json.dumps(collector.fx_details))
            self.flush("cold")

            warm_all: list[float] = []
            per_replay: list[float] = []
            by_length: dict[int, list[float]] = {}
            deadline = self.t_start + spec["time_limit_s"]
            for _ in range(spec["repeats"]):
                # before the first warm replay: twice the fastest cold forecast (one that did not compile) each
                last = (per_replay[-1] if per_replay else 2e3 * min(cold_times)) * len(calls) / 1e3
                if time.perf_counter() + last * 1.2 > deadline:
                    self.row["warm_note"] = "warm repeats cut short by the row's time limit"
                    break
                times, q = replay()
                if "warm_vs_cold_max_abs" not in self.row:
                    self.row["warm_vs_cold_max_abs"] = float((q - cold_q).abs().max())
                warm_all += [t * 1e3 for t in times]
                per_replay.append(sum(times) * 1e3 / len(times))
                for (length, _, _), t in zip(calls, times):
                    by_length.setdefault(length, []).append(t * 1e3)
                self.row.update(
                    warm_median_ms=round(statistics.median(warm_all), 4),
                    warm_repeats=len(per_replay),
                    warm_replay_mean_ms=[round(x, 4) for x in per_replay],
                    warm_stats_ms=quartiles(per_replay),
                    warm_forecast_min_ms=round(min(warm_all), 4),
                    warm_median_ms_by_length={str(k): round(statistics.median(v), 4) for k, v in by_length.items()},
                )
                self._record_counters(torch, counters, dlog.recompiles, collector, _reasons, cuda)
                self.row["recompiles_warm"] = dlog.recompiles - self.row["recompiles_cold"]
                self.flush("warm")

        if spec.get("save_artifacts"):
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                self.row["artifacts_saved"] = "none"
            else:
                blob, info = saved
                Path(spec["artifacts_path"]).write_bytes(blob)
                self.row["artifacts_saved"] = {"bytes": len(blob), "info": str(info)[:600]}
        self.flush("done")

    def _record_counters(self, torch: Any, counters: Any, recompiles: int, collector: LogCollector,
                         reasons: Any, cuda: bool) -> None:
        self.row.update(
            recompiles=recompiles,
            graph_breaks=sum(counters["graph_break"].values()),
            graph_break_reasons=dict(list(reasons(counters["graph_break"]).items())[:8]),
            cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]),
            frames_compiled=int(counters["frames"]["ok"]),
            unique_graphs=int(counters["stats"]["unique_graphs"]),
            recompile_reasons=collector.recompile_reasons,
            fxgraph_cache_keys=collector.fx_keys,
            cudagraph_skip_reasons=collector.skip_reasons,
            cache_bypass_reasons=collector.bypass_reasons,
            peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        )


def compile_times_summary(torch: Any) -> str | None:
    try:
        from torch._dynamo.utils import compile_times

        text = compile_times(repr="str", aggregate=True)
        return None if text is None else str(text)[:2000]
    except Exception as exc:  # noqa: BLE001 - optional diagnostics
        return f"unavailable: {exc}"


def cpu_name() -> str:
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------
# orchestrator
# --------------------------------------------------------------------------------------


def parse_row(text: str, args: argparse.Namespace) -> dict:
    """``VARIANT:MODE[+dynamic=X][+regional]`` -> the row's spec fragment."""
    head, *opts = text.strip().split("+")
    variant, _, mode = head.partition(":")
    if variant not in ("unpatched", "patched") or not mode:
        raise SystemExit(f"row {text!r}: want unpatched|patched:MODE[+dynamic=X][+regional]")
    options: dict[str, Any] = {"dynamic": args.dynamic, "regional": args.regional}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "dynamic" and value in DYNAMIC_CHOICES:
            options["dynamic"] = value
        elif key == "regional" and not value:
            options["regional"] = True
        else:
            raise SystemExit(f"row {text!r}: unknown option {opt!r} (dynamic={'|'.join(DYNAMIC_CHOICES)}, regional)")
    if options["regional"] and options["dynamic"] == "mark":
        raise SystemExit(f"row {text!r}: dynamic=mark applies to the whole-backbone compile, not with regional")
    if mode == "eager":
        options = {"dynamic": None, "regional": False}
    if args.backend and mode != "eager":
        options["backend"] = args.backend
    return {"variant": variant, "mode": mode, "cache": "fresh", "options": options}


def expand_rows(args: argparse.Namespace) -> list[dict]:
    """The row specs in run order: the unpatched eager reference first, warm rows after their fresh row."""
    texts = [t for t in (args.rows.split(",") if args.rows else DEFAULT_ROWS) if t.strip()]
    rows = [parse_row(t, args) for t in texts]
    if not any(r["variant"] == "unpatched" and r["mode"] == "eager" for r in rows):
        rows.insert(0, parse_row("unpatched:eager", args))
    first = next(i for i, r in enumerate(rows) if r["variant"] == "unpatched" and r["mode"] == "eager")
    rows.insert(0, rows.pop(first))
    out = []
    for r in rows:
        out.append(r)
        if r["mode"] == "eager" or not args.warm:
            continue
        sources = ("cache-dir", "artifacts") if args.warm == "both" else \
            (("cache-dir",) if args.warm == "dir" else ("artifacts",))
        if "artifacts" in sources:
            r["save_artifacts"] = True
        for src in sources:
            out.append({**r, "cache": "warm", "options": {**r["options"], "warm_from": src}, "save_artifacts": False})
    return out


def installed_toto_parent() -> Path:
    """The folder holding the importable ``toto`` package, found without importing it."""
    spec = importlib.util.find_spec("toto")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("toto-ts is not importable here: install it or pass --toto-parent")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def make_patched_tree(work: Path, unpatched_parent: Path) -> tuple[Path, dict]:
    """Copy ``toto`` into ``work/patched`` and apply every default patch with the totopatch CLI."""
    root = work / "patched"
    shutil.copytree(unpatched_parent / "toto", root / "toto",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.backup"))
    cmd = [sys.executable, "-m", "totopatch", "--root", str(root), "apply", "--json"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {}
    if proc.returncode != 0:
        raise SystemExit(f"totopatch apply failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    applied: dict[str, list[str]] = {}
    for item in report.get("items", []):
        applied.setdefault(item.get("patch", "?"), []).append(f"{item.get('target')}: {item.get('state')}")
    return root, applied


def row_tag(spec: dict, index: int) -> str:
    opts = spec["options"]
    bits = [spec["scenario"], spec["variant"], spec["mode"], spec["cache"]]
    if opts.get("dynamic") not in (None, "auto"):
        bits.append(f"dyn-{opts['dynamic']}")
    if opts.get("regional"):
        bits.append("regional")
    if opts.get("warm_from"):
        bits.append(opts["warm_from"])
    return f"{index:02d}_" + "_".join(bits)


def run_worker(spec: dict, log_path: Path, timeout: float) -> dict:
    """Run one row in a fresh process (own process group); return its row, partial or failed."""
    work = Path(spec["work"])
    spec_path = work / f"{spec['tag']}.spec.json"
    spec["result"] = str(work / f"{spec['tag']}.result.json")
    spec["time_limit_s"] = max(timeout - 5, 1)
    spec_path.write_text(json.dumps(spec))
    cache = Path(spec["cache_root"])
    env = child_env({"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    t0 = time.perf_counter()
    rc: Any
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f}s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.perf_counter() - t0
    result_path = Path(spec["result"])
    if result_path.exists():
        res = json.loads(result_path.read_text())
    else:
        res = {"row": {k: None for k in ROW_KEYS}, "meta": {}}
        res["row"].update(variant=spec["variant"], mode=spec["mode"], cache=spec["cache"],
                          scenario=spec["scenario"], options=spec["options"], error=None)
    row = res["row"]
    if rc != 0 and row.get("phase") == "done":
        row["exit"] = f"{rc} after its last result was written"  # e.g. killed while the interpreter shut down
    elif rc != 0 and not row.get("error"):
        tail = log_path.read_text(errors="replace")[-600:] if log_path.exists() else ""
        row["error"] = f"worker exit {rc} in phase {row.get('phase', 'start')}: {tail}"
    row["process_wall_s"] = round(wall, 2)
    return res


def max_rel_diff(q: list, ref: list) -> float | None:
    """max |q - ref| / |ref| over nested lists of equal shape (|ref| floored at 1e-6 of its largest value)."""
    flat_q, flat_ref = _flatten(q), _flatten(ref)
    if len(flat_q) != len(flat_ref) or not flat_ref:
        return None
    floor = max(max(abs(x) for x in flat_ref), 1e-30) * 1e-6
    return max(abs(a - b) / max(abs(b), floor) for a, b in zip(flat_q, flat_ref))


def _flatten(x: Any) -> list[float]:
    return [v for item in x for v in _flatten(item)] if isinstance(x, list) else [float(x)]


def key_diff(fresh: Path, warm: Path) -> list[str] | None:
    """The lines of the FX graph cache keys' hash details that differ between two processes, graph by graph."""
    if not (fresh.exists() and warm.exists()):
        return None
    out = []
    for i, (a, b) in enumerate(zip(json.loads(fresh.read_text()), json.loads(warm.read_text()))):
        a_lines, b_lines = a.splitlines()[1:], b.splitlines()[1:]  # the first line names the key itself
        a_set, b_set = set(a_lines), set(b_lines)
        only_a = [line for line in a_lines if line not in b_set]
        only_b = [line for line in b_lines if line not in a_set]
        out += [f"graph {i} fresh: {line[:300]}" for line in only_a[:10]]
        out += [f"graph {i} warm:  {line[:300]}" for line in only_b[:10]]
    return out


def gpu_name(device: str) -> str:
    if device != "cuda":
        return cpu_name()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0] if out else "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def gpu_slug(name: str) -> str:
    for word in ("H200", "H100", "A100", "L40S", "L4", "A10G", "B200", "GH200"):
        if word.lower() in name.lower():
            return word.lower()
    return "cpu" if name.startswith("CPU") else "".join(c for c in name.lower() if c.isalnum())[:16] or "gpu"


def fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{-nd}e}" if nd < 0 else f"{x:.{nd}f}"
    return str(x)


def label(row: dict) -> str:
    opts = row.get("options") or {}
    extra = []
    if opts.get("dynamic") not in (None, "auto"):
        extra.append(f"dynamic={opts['dynamic']}")
    if opts.get("regional"):
        extra.append("regional")
    if row.get("cache") == "warm":
        extra.append(f"warm:{opts.get('warm_from')}")
    return f"{row['variant']} / {row['mode']}" + (f" ({', '.join(extra)})" if extra else "")


def write_reports(doc: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown(doc))
    try:
        chart(doc, out / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - a chart must never cost the rows still to run
        print(f"chart failed: {type(exc).__name__}: {exc}", flush=True)


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        "# Toto backtest call pattern\n\n",
        f"- device: {doc['device']}\n- torch: {doc['torch']}\n- date: {meta['date']}\n",
        f"- model: {meta['model']}\n- settings: {meta['settings']}\n",
        f"- patched tree: {meta.get('patches')}\n",
        "- cold: first replay of all forecasts in a fresh process (compile included); warm: median ms per "
        "forecast over the later replays; x eager: against the scenario's unpatched eager row\n",
        "- quantile diff: max |q - q_ref| / |q_ref| of the 10/50/90% sample quantiles, same seeds, vs unpatched eager\n\n",
    ]
    for scen in meta["scenarios"]:
        rows = [r for r in doc["rows"] if r.get("scenario") == scen]
        lines.append(f"## {scen}: {meta['scenario_desc'].get(scen, '')}\n\n")
        lines.append("| variant / mode | cache | cold total s | first call s | warm ms/forecast | warm x eager | cold x eager"
                     " | warm IQR ms (n) | recompiles | cudagraph skips | graph breaks | peak GB | quantile max rel diff | error |\n")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
        for r in rows:
            st = r.get("warm_stats_ms") or {}
            lines.append(
                f"| {label(r)} | {r.get('cache')} | {fmt(r.get('cold_total_s'), 2)} | {fmt(r.get('first_call_s'), 2)}"
                f" | {fmt(r.get('warm_median_ms'), 2)} | {fmt(r.get('warm_speedup_vs_eager'), 2)}"
                f" | {fmt(r.get('cold_speedup_vs_eager'), 2)}"
                f" | {fmt(st.get('iqr'), 2)} ({st.get('n', 0)}) | {fmt(r.get('recompiles'))}"
                f" | {fmt(r.get('cudagraph_skips'))} | {fmt(r.get('graph_breaks'))} | {fmt(r.get('peak_mem_gb'), 2)}"
                f" | {fmt(r.get('quantile_max_rel_diff'), -1)} | {(r.get('error') or '')[:160]!s} |\n"
                .replace("|  |", "| |"))
        lines.append("\n")
    return "".join(lines)


_NO_CHART: list[bool] = []


def chart(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _NO_CHART:
            print("matplotlib is not importable: no chart", flush=True)
            _NO_CHART.append(True)
        return
    scens = doc["meta"]["scenarios"]
    nrows = max(len([r for r in doc["rows"] if r.get("scenario") == s]) for s in scens) if doc["rows"] else 1
    fig, axes = plt.subplots(len(scens), 2, figsize=(14, (0.4 * nrows + 1.6) * len(scens)), squeeze=False)
    for (ax_w, ax_c), scen in zip(axes, scens):
        rows = [r for r in doc["rows"] if r.get("scenario") == scen]
        names = [label(r) + (" [warm cache]" if r.get("cache") == "warm" else "") for r in rows]
        colors = ["tab:gray" if r["mode"] == "eager" else ("tab:green" if r["variant"] == "patched" else "tab:blue")
                  for r in rows]
        for ax, key, unit in ((ax_w, "warm_median_ms", "ms per forecast, warm"), (ax_c, "cold_total_s", "s, first replay")):
            vals = [r.get(key) or 0.0 for r in rows]
            ax.barh(range(len(rows)), vals, color=colors)
            ax.set_yticks(range(len(rows)), names, fontsize=7)
            ax.invert_yaxis()
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.1f}" if v else " failed", va="center", fontsize=7)
            ax.set_xlabel(unit)
            ax.set_xlim(0, max(vals + [1e-9]) * 1.3)
            ax.set_title(f"{scen}: {unit}", fontsize=9)
    fig.suptitle(f"Toto backtest call pattern, {doc['device']}, torch {doc['torch']}, {doc['meta']['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_and_score(rows: list[dict], qfiles: dict[int, Path]) -> None:
    """Fill quantile_max_rel_diff and speed-ups against each scenario's first unpatched eager row."""
    for i, r in enumerate(rows):
        ref_i = next((j for j, x in enumerate(rows) if x.get("scenario") == r.get("scenario")
                      and x["variant"] == "unpatched" and x["mode"] == "eager"), None)
        if ref_i is None:
            continue
        ref = rows[ref_i]
        if qfiles.get(i) and qfiles.get(ref_i) and qfiles[i].exists() and qfiles[ref_i].exists():
            diff = max_rel_diff(json.loads(qfiles[i].read_text()), json.loads(qfiles[ref_i].read_text()))
            r["quantile_max_rel_diff"] = diff
        if ref.get("warm_median_ms") and r.get("warm_median_ms"):
            r["warm_speedup_vs_eager"] = round(ref["warm_median_ms"] / r["warm_median_ms"], 3)
        if ref.get("cold_total_s") and r.get("cold_total_s"):
            r["cold_speedup_vs_eager"] = round(ref["cold_total_s"] / r["cold_total_s"], 3)


def scenario_desc(scen: dict) -> str:
    n = len(scen["lengths"]) * len(scen["horizons"])
    return (f"{len(scen['lengths'])} series (lengths {', '.join(map(str, scen['lengths']))}) x horizons "
            f"{', '.join(map(str, scen['horizons']))} = {n} forecasts; prediction {scen['prediction']}, "
            f"{scen['num_samples']} samples in batches of {scen['samples_per_batch']}")


def build_scenarios(args: argparse.Namespace) -> dict[str, dict]:
    base = TINY_SCENARIOS if args.tiny else SCENARIOS
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in base]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {list(base)}")
    out = {}
    for name in names:
        scen = dict(base[name])
        if args.lengths:
            scen["lengths"] = tuple(int(x) for x in args.lengths.split(","))
        if args.horizons:
            scen["horizons"] = tuple(int(x) for x in args.horizons.split(","))
        for key in ("num_samples", "samples_per_batch"):
            if getattr(args, key):
                scen[key] = getattr(args, key)
        if args.prediction and name == "multi":
            scen["prediction"] = args.prediction
        out[name] = scen
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--scenarios", default="single", help="comma-separated: single, multi")
    ap.add_argument("--dynamic", choices=DYNAMIC_CHOICES, default="auto", help="default dynamic option of compiled rows")
    ap.add_argument("--regional", action="store_true", help="compiled rows compile each transformer layer")
    ap.add_argument("--warm", choices=("", "dir", "artifacts", "both"), default="",
                    help="add warm-cache rows after each compiled row")
    ap.add_argument("--repeats", type=int, default=1, help="warm replays per row (statistics over them)")
    ap.add_argument("--toto-parent", default="", help="folder holding the unpatched toto (default: installed)")
    ap.add_argument("--patched-parent", default="", help="folder holding a patched toto (default: made here)")
    ap.add_argument("--device", default="", help="cuda (default when available) or cpu")
    ap.add_argument("--backend", default="", help="torch.compile backend instead of inductor (mode then ignored)")
    ap.add_argument("--allow-math-sdp", action="store_true", help="keep math SDPA enabled on CUDA")
    ap.add_argument("--tiny", action="store_true", help="tiny model and tiny replay (CPU check)")
    ap.add_argument("--lengths", default="", help="override the series lengths, e.g. 512,777")
    ap.add_argument("--horizons", default="", help="override the horizons, e.g. 2,1")
    ap.add_argument("--num-samples", type=int, default=0)
    ap.add_argument("--samples-per-batch", type=int, default=0)
    ap.add_argument("--prediction", type=int, default=0, help="override the multi scenario's prediction length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each row (0: torch's default)")
    ap.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row process")
    ap.add_argument("--budget", type=float, default=0.0, help="total seconds for all rows (0: unlimited)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--stem", default="", help="file stem (default backtest_<gpu>_<date>)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        Worker(json.loads(Path(args.worker).read_text())).run()
        return 0

    t_begin = time.perf_counter()
    device = args.device or ("cuda" if shutil.which("nvidia-smi") else "cpu")  # the parent never imports torch

    scenarios = build_scenarios(args)
    row_specs = expand_rows(args)
    work = Path(tempfile.mkdtemp(prefix="backtest_bench_"))
    unpatched_parent = Path(args.toto_parent).resolve() if args.toto_parent else installed_toto_parent()
    needs_patched = any(r["variant"] == "patched" for r in row_specs)
    patches: Any = None
    if args.patched_parent:
        patched_parent: Path | None = Path(args.patched_parent).resolve()
        patches = f"given: {patched_parent}"
    elif needs_patched:
        patched_parent, patches = make_patched_tree(work, unpatched_parent)
    else:
        patched_parent = None
    device_name = gpu_name(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = args.stem or f"backtest_{gpu_slug(device_name)}_{now:%Y%m%d}" + ("_tiny" if args.tiny else "")
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    shape = "tiny" if args.tiny else "base"
    from totopatch.model_shape import SHAPES

    dims = SHAPES[shape]
    doc: dict[str, Any] = {
        "device": device_name, "torch": None, "rows": [],
        "meta": {
            "date": f"{now:%Y-%m-%d %H:%M} UTC", "python": sys.version.split()[0], "device_kind": device,
            "scenarios": list(scenarios), "scenario_desc": {k: scenario_desc(v) for k, v in scenarios.items()},
            "scenario_params": scenarios, "repeats": args.repeats, "seed": args.seed, "shape": shape,
            "model": (f"Toto {'tiny' if args.tiny else 'Toto-Open-Base-1.0 shape'}: embed {dims['embed_dim']}, "
                      f"{dims['num_layers']} layers, {dims['num_heads']} heads, patch {dims['patch_size']}, "
                      f"random weights (seed {args.seed}), float32, SDPA"),
            "settings": ("fp32 (CPU: no TF32)" if device != "cuda" else
                         "fp32, TF32 on, SDPA flash + memory-efficient on, math " + ("on" if args.allow_math_sdp else "off")),
            "call": "TotoForecaster(backbone).forecast(MaskedTimeseries(context[None, :]), prediction_length, "
                    "num_samples, samples_per_batch, use_kv_cache=True)",
            "unpatched_parent": str(unpatched_parent), "patched_parent": str(patched_parent) if patched_parent else None,
            "patches": patches, "budget_s": args.budget or None, "row_timeout_s": args.row_timeout,
        },
    }
    qfiles: dict[int, Path] = {}
    index = 0
    for scen_name, scen in scenarios.items():
        fresh_cache: Path | None = None
        fresh_details: Path | None = None
        artifacts: Path | None = None
        for base in row_specs:
            spec = json.loads(json.dumps(base))
            spec.update(scenario=scen_name, scen=scen, device=device, seed=args.seed, shape=shape,
                        repeats=args.repeats, allow_math_sdp=args.allow_math_sdp, backend=args.backend, threads=args.threads,
                        work=str(work))
            spec["toto_parent"] = str(patched_parent if spec["variant"] == "patched" else unpatched_parent)
            spec["tag"] = row_tag(spec, index)
            if spec["cache"] == "fresh":
                spec["cache_root"] = str(work / f"cache_{index:02d}")
                fresh_cache = Path(spec["cache_root"])
                artifacts = work / f"artifacts_{index:02d}.bin"
            elif spec["options"]["warm_from"] == "cache-dir":
                spec["cache_root"] = str(fresh_cache)
            else:
                spec["cache_root"] = str(work / f"cache_{index:02d}")
            spec["artifacts_path"] = str(artifacts)
            spec["quantiles_path"] = str(work / f"{spec['tag']}.quantiles.json")
            spec["fx_details_path"] = str(work / f"{spec['tag']}.fx_details.json")
            if spec["cache"] == "fresh":
                fresh_details = Path(spec["fx_details_path"])
            remaining = args.budget - (time.perf_counter() - t_begin) if args.budget else float("inf")
            timeout = min(args.row_timeout, remaining - 5)
            if spec["cache"] == "warm" and spec["options"]["warm_from"] == "artifacts" and not artifacts.exists():
                res = {"row": {**{k: None for k in ROW_KEYS}, **{k: spec[k] for k in ("variant", "mode", "cache", "scenario", "options")},
                               "error": "no cache artifacts from the fresh row"}, "meta": {}}
            elif timeout < 20:
                res = {"row": {**{k: None for k in ROW_KEYS}, **{k: spec[k] for k in ("variant", "mode", "cache", "scenario", "options")},
                               "error": f"not run: {max(remaining, 0):.0f}s of the budget left"}, "meta": {}}
            else:
                print(f"[{time.strftime('%H:%M:%S')}] {spec['tag']} (timeout {timeout:.0f}s) ...", flush=True)
                res = run_worker(spec, log_dir / f"{stem}_{spec['tag']}.log", timeout)
            row = res["row"]
            if spec["cache"] == "warm" and fresh_details is not None:
                row["fxgraph_key_diff_vs_fresh"] = key_diff(fresh_details, Path(spec["fx_details_path"]))
            qfiles[len(doc["rows"])] = Path(spec["quantiles_path"])
            doc["rows"].append(row)
            if res.get("meta", {}).get("torch"):
                doc["torch"] = res["meta"]["torch"]
                doc["device"] = res["meta"].get("device") or doc["device"]
                row["toto_file"] = res["meta"].get("toto_file")
            compare_and_score(doc["rows"], qfiles)
            write_reports(doc, out, stem)
            print(f"    {label(row)} [{row['cache']}] cold {fmt(row.get('cold_total_s'), 2)} s, first "
                  f"{fmt(row.get('first_call_s'), 2)} s, warm {fmt(row.get('warm_median_ms'), 2)} ms/forecast, "
                  f"recompiles {row.get('recompiles')}, skips {row.get('cudagraph_skips')}, breaks "
                  f"{row.get('graph_breaks')}, peak {fmt(row.get('peak_mem_gb'), 2)} GB, qdiff "
                  f"{fmt(row.get('quantile_max_rel_diff'), -1)}" + (f"  ERROR {row['error'][:300]}" if row.get("error") else ""),
                  flush=True)
            index += 1
        # the scenario's caches are no longer needed
        for p in work.glob("cache_*"):
            shutil.rmtree(p, ignore_errors=True)
    print((out / f"{stem}.md").read_text(), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
