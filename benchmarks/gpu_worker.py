"""One row of ``gpu_bench.py`` in its own process: every scenario, eager or compiled, timed and compared.

``gpu_bench.py --worker SPEC --result FILE`` runs ``worker(spec)`` and writes its result to FILE.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from compile_logs import on_cudagraph_skip
from harness import cpu_name
from totopatch.model_shape import toto_kwargs


def _log_counter(torch_mod):
    """Count log records that name recompiles / cudagraph skips, whatever logger they use."""
    import logging

    class Counter(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.recompiles: list[str] = []
            self.skips: list[str] = []
            self._seen: set[int] = set()

        def emit(self, record):
            if id(record) in self._seen:  # the same record reaching us through two loggers
                return
            self._seen.add(id(record))
            try:
                msg = record.getMessage()
            except Exception:  # noqa: BLE001
                return
            if "Recompiling function" in msg:
                self.recompiles.append(msg)
            if "skipping cudagraphs" in msg.lower():
                self.skips.append(msg)

    h = Counter()
    try:
        torch_mod._logging.set_logs(recompiles=True, graph_breaks=True)
    except Exception as e:  # noqa: BLE001
        print("set_logs failed:", e, file=sys.stderr)
    # torch._logging puts its handlers on a few top-level loggers that don't propagate;
    # hang ours beside each of them (and on "torch" in case none is there yet)
    names = {"torch"} | {
        n for n, lg in logging.root.manager.loggerDict.items()
        if n.startswith("torch") and isinstance(lg, logging.Logger) and lg.handlers
    }
    for n in names:
        logging.getLogger(n).addHandler(h)
    return h


def _make_inputs(torch, toto_data, scen, device, seed):
    g = torch.Generator().manual_seed(seed)
    v, t = scen["variates"], scen["context"]
    steps = torch.arange(t, dtype=torch.float32)
    phase = torch.rand(v, 1, generator=g) * 6.28
    period = 24 + 48 * torch.rand(v, 1, generator=g)
    series = torch.sin(2 * torch.pi * steps / period + phase) * (1 + 3 * torch.rand(v, 1, generator=g))
    series = series + 0.1 * torch.randn(v, t, generator=g) + 10 * torch.rand(v, 1, generator=g)
    ts = (1_700_000_000 + 60 * torch.arange(t)).expand(v, t).to(torch.int64)
    return toto_data.MaskedTimeseries(
        series=series.to(device),
        padding_mask=torch.ones(v, t, dtype=torch.bool, device=device),
        id_mask=torch.zeros(v, t, dtype=torch.int, device=device),
        timestamp_seconds=ts.to(device),
        time_interval_seconds=torch.full((v,), 60, dtype=torch.int, device=device),
    )


def _diff(torch, out, ref):
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if out.shape != ref.shape:
        return {"shape_mismatch": [list(out.shape), list(ref.shape)]}
    d = (out - ref).abs()
    scale = max(ref.abs().max().item(), 1e-30)
    return {
        "max_abs": d.max().item(),
        # max |out - ref| / max |ref|: the forecast crosses zero, so a purely elementwise
        # ratio measures only how close to zero the nearest value lies
        "max_rel": d.max().item() / scale,
        # elementwise |out - ref| / |ref|, floored at 1e-3 * max|ref|
        "max_rel_elem": (d / ref.abs().clamp_min(1e-3 * scale)).max().item(),
        # ||out - ref|| / ||ref||
        "norm_rel": (torch.linalg.vector_norm(out - ref) / max(torch.linalg.vector_norm(ref).item(), 1e-30)).item(),
        "nan": bool(torch.isnan(out).any().item()),
    }


def worker(spec: dict, install: Any = None) -> dict:
    """Run one (variant, mode) in this process; ``install(spec)`` may swap code into toto first and
    return ``{"note": str, "stats": callable}`` (used by benchmarks/exploration/)."""
    t_start = time.perf_counter()
    toto_parent = spec["toto_parent"]
    if toto_parent:
        sys.path.insert(0, str(Path(toto_parent).resolve()))
    import torch

    import toto

    toto_file = str(Path(toto.__file__).resolve())
    if toto_parent:
        want = str(Path(toto_parent).resolve())
        if not toto_file.startswith(want + os.sep):
            raise SystemExit(f"imported toto from {toto_file}, not from {want}")
    hooks = install(spec) if install is not None else {}
    patch_note = hooks.get("note", "none")
    pool_stats = hooks.get("stats", dict)
    from toto.data.util import dataset as toto_data
    from toto.inference.forecaster import TotoForecaster
    from toto.model.toto import Toto

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    logc = _log_counter(torch)
    from torch._dynamo.utils import counters

    # count cudagraph recordings (a re-record after warm-up is as bad as a recompile)
    records = {"n": 0}
    if cuda:
        from torch._inductor import cudagraph_trees as cgt

        orig_record = cgt.CUDAGraphTreeManager.record_function

        def record_function(self, *a, **k):
            records["n"] += 1
            return orig_record(self, *a, **k)

        cgt.CUDAGraphTreeManager.record_function = record_function

        on_cudagraph_skip(logc.skips.append)  # the "cudagraphs" log artifact is off

    cfg = toto_kwargs("tiny" if spec["tiny"] else "base")
    scenarios = spec["scenario_params"]
    torch.manual_seed(spec["seed"])
    model = Toto(**cfg).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mode = spec["mode"]
    if mode == "eager":
        backbone = model.model
    elif spec.get("backend"):
        backbone = torch.compile(model.model, backend=spec["backend"])
    else:
        backbone = torch.compile(model.model, mode=None if mode == "default" else mode)
    forecaster = TotoForecaster(backbone)

    rows = []
    for name in spec["scenarios"]:
        scen = scenarios[name]
        torch._dynamo.reset()
        if cuda:
            try:
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
            except Exception as e:  # noqa: BLE001
                print("reset_cudagraph_trees failed:", e, file=sys.stderr)
        counters.clear()
        logc.recompiles.clear()
        logc.skips.clear()
        records["n"] = 0
        inputs = _make_inputs(torch, toto_data, scen, device, spec["seed"])

        def call():
            torch.manual_seed(spec["seed"] + 1)
            # no inference_mode: users call forecast() as is (it runs under no_grad)
            return forecaster.forecast(
                inputs,
                prediction_length=scen["prediction"],
                num_samples=scen["num_samples"],
                samples_per_batch=scen["samples_per_batch"],
                use_kv_cache=True,
            )

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {"scenario": name, "variant": spec["variant"], "mode": mode, "patch": patch_note}
        try:
            sync()
            t0 = time.perf_counter()
            fc = call()
            sync()
            row["first_call_s"] = time.perf_counter() - t0
            for _ in range(spec["warmup"]):
                fc = call()
            sync()
            frames_ok = counters["frames"]["ok"]
            n_recompile_logs = len(logc.recompiles)
            skips_before = counters["inductor"]["cudagraph_skips"]
            records_before = records["n"]
            times = []
            for _ in range(spec["runs"]):
                sync()
                t0 = time.perf_counter()
                fc = call()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            row.update(
                median_ms=statistics.median(times),
                min_ms=min(times),
                max_ms=max(times),
                runs=len(times),
                warmup=spec["warmup"],
                frames_compiled=frames_ok,
                recompiles_total=len(logc.recompiles),
                recompiles_after_warmup=len(logc.recompiles) - n_recompile_logs,
                frames_compiled_after_warmup=counters["frames"]["ok"] - frames_ok,
                graph_breaks=sum(counters["graph_break"].values()),
                graph_break_reasons=dict(counters["graph_break"]),
                unique_graphs=counters["stats"]["unique_graphs"],
                cudagraph_skips=counters["inductor"]["cudagraph_skips"] + 0,
                cudagraph_skips_after_warmup=counters["inductor"]["cudagraph_skips"] - skips_before,
                cudagraph_skip_msgs=sorted(set(m[:300] for m in logc.skips))[:5],
                cudagraph_records=records["n"],
                cudagraph_records_after_warmup=records["n"] - records_before,
                recompile_reasons=[m[:400] for m in logc.recompiles[:12]],
                pool=pool_stats(),
            )
            if cuda:
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
                row["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            out = {"mean": fc.mean.detach().float().cpu()}
            if fc.samples is not None:
                out["samples"] = fc.samples.detach().float().cpu()
            ref_path = Path(spec["ref_dir"]) / f"ref_{name}.pt"
            if spec["save_ref"]:
                torch.save(out, ref_path)
            elif ref_path.exists():
                ref = torch.load(ref_path)
                row["diff_mean"] = _diff(torch, out["mean"], ref["mean"])
                if "samples" in out and "samples" in ref:
                    row["diff_samples"] = _diff(torch, out["samples"], ref["samples"])
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        rows.append(row)
        print("ROW", json.dumps({k: v for k, v in row.items() if k not in ("graph_break_reasons", "recompile_reasons")}), flush=True)
    return {
        "rows": rows,
        "toto_file": toto_file,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "worker_s": time.perf_counter() - t_start,
    }
