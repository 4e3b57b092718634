"""One row of ``backtest_bench.py`` in its own process: build Toto, replay the forecasts cold, then warm.

``backtest_bench.py --worker SPEC`` runs ``Worker(spec).run()``; the row is written to ``spec["result"]``
after every phase, so a row that is killed still reports how far it got.

How a row runs its backbone is ``MODES[mode]``: to add a mode (a row ``patched:NAME``), add one function
``(torch, backbone, spec) -> callable backbone`` to ``MODES``; see ``docs/design.md``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from compile_logs import LogCollector, cache_counters, compile_times_summary, hook_logs
from harness import cpu_name

ROW_KEYS = ("variant", "mode", "cache", "cold_total_s", "first_call_s", "warm_median_ms", "recompiles",
            "cudagraph_skips", "graph_breaks", "peak_mem_gb", "quantile_max_rel_diff")
QUANTILES = (0.1, 0.5, 0.9)
SEED_BASE = 1000


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


def eager(torch: Any, backbone: Any, spec: dict) -> Any:
    """The backbone as it is."""
    return backbone


def compiled(torch: Any, backbone: Any, spec: dict) -> Any:
    """``torch.compile`` with the row's mode (or ``--backend``), whole or per transformer layer (``+regional``)."""
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


def graph_counts(forecaster_module: Any) -> dict | None:
    """What the cuda-graphs patch's runner did in this process (captures, replays, failures, whole-forecast
    graphs kept), or None where the tree has no such runner (unpatched, or the patch not applied)."""
    runner = getattr(forecaster_module, "_totopatch_graphs", None)
    if runner is None:
        return None
    graphs = getattr(runner, "graphs", {})
    return {"captures": getattr(runner, "captures", None), "replays": getattr(runner, "replays", None),
            "failures": getattr(runner, "failures", None), "kept": len(graphs),
            "whole": sum(1 for key in graphs if isinstance(key, tuple) and key and key[0] == "forecast")}


BuildFn = Callable[[Any, Any, dict], Any]
# mode -> how the row runs the backbone; every torch.compile mode compiles the same way
MODES: dict[str, BuildFn] = {
    "eager": eager,
    "graphs": eager,  # the row's process sets TOTOPATCH_CUDA_GRAPHS=1; the patched forecaster replays graphs
    "default": compiled,
    "reduce-overhead": compiled,
    "max-autotune": compiled,
    "max-autotune-no-cudagraphs": compiled,
}


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
        from totopatch.model_shape import toto_kwargs
        from totopatch.smoke import _dynamo_log, _reasons, import_toto

        spec = self.spec
        toto = import_toto(Path(spec["toto_parent"]))
        import torch
        import torch._dynamo
        from torch._dynamo.utils import counters
        from toto.data.util import dataset as toto_data
        from toto.inference.forecaster import TotoForecaster
        from toto.model.toto import Toto

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
        forecaster = TotoForecaster(MODES[spec["mode"]](torch, model.model, spec))
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

        self.row["graphs"] = graph_counts(sys.modules.get("toto.inference.forecaster"))
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

