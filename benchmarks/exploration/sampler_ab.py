"""A/B of shared-prefill forecaster modules in one process, on the users' one-step forecast.

The modules are patched copies of ``toto/inference/forecaster.py`` (made with ``totopatch apply
shared-prefill`` by different totopatch revisions); they are loaded side by side as siblings of the installed
forecaster and run the same backbone (Toto-Open-Base shape, random weights, TF32 on, flash and
memory-efficient SDPA on, math off), eager or compiled once with ``--mode``.  Forecasts rotate between the
modules, seeded alike, per context length; each is timed with a device synchronisation before and after, and
every module's samples are compared with the first's.  One warm forecast per module and length is then
profiled (``torch.profiler``): kernel time summed against the forecast's wall time, and the top kernels.

    python benchmarks/exploration/sampler_ab.py --toto-parent DIR --module old=OLD.py --module new=NEW.py \
        [--mode reduce-overhead] --out FILE.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))


def load_sibling(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"toto.inference.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toto-parent", type=Path, required=True)
    ap.add_argument("--module", action="append", required=True, help="NAME=PATH of a forecaster module (first: baseline)")
    ap.add_argument("--mode", default="eager", help="eager or a torch.compile mode for the shared backbone")
    ap.add_argument("--lengths", default="512,1024,2200")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shape", default="base")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from totopatch.smoke import build_model, import_toto

    import_toto(args.toto_parent)
    import torch
    from backtest_worker import configure_torch, make_series
    from toto.data.util.dataset import MaskedTimeseries

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    settings = configure_torch(torch, cuda, False)
    backbone = build_model(args.shape).to(device).model
    for p in backbone.parameters():
        p.requires_grad_(False)
    if args.mode != "eager":
        backbone = torch.compile(backbone, **({} if args.mode == "default" else {"mode": args.mode}))
    paths = dict(item.split("=", 1) for item in args.module)
    modules = {k: load_sibling(Path(v), f"forecaster_{k}") for k, v in paths.items()}
    names = list(modules)
    forecasters = {k: m.TotoForecaster(backbone) for k, m in modules.items()}
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "mode": args.mode,
           "settings": settings, "modules": paths, "classes": {k: type(f).__name__ for k, f in forecasters.items()},
           "call": "forecast(context, prediction_length=1, num_samples=3072, samples_per_batch=384, use_kv_cache=True)",
           "lengths": {}}

    def forecast(which: str, inputs, seed: int):
        torch.manual_seed(seed)
        sync()
        t = time.perf_counter()
        out = forecasters[which].forecast(inputs, prediction_length=1, num_samples=3072, samples_per_batch=384,
                                          use_kv_cache=True)
        sync()
        return time.perf_counter() - t, out.samples

    for index, length in enumerate(int(x) for x in args.lengths.split(",")):
        context = make_series(torch, length + 1, index)[:-1][None, :].to(device)
        t = context.shape[-1]
        inputs = MaskedTimeseries(series=context, padding_mask=torch.ones(1, t, dtype=torch.bool, device=device),
                                  id_mask=torch.zeros(1, t, dtype=torch.int, device=device),
                                  timestamp_seconds=(86_400 * torch.arange(t, device=device))[None, :],
                                  time_interval_seconds=torch.full((1,), 86_400, dtype=torch.int, device=device))
        t0 = time.perf_counter()
        for which in names:
            forecast(which, inputs, 0)  # warm-up (and, compiled, the compile for this length)
        warmup_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {k: [] for k in names}
        diffs: dict[str, float] = {k: 0.0 for k in names[1:]}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            samples = {}
            for which in order:
                dt, samples[which] = forecast(which, inputs, 100 + r)
                times[which].append(dt * 1e3)
            for k in names[1:]:
                diffs[k] = max(diffs[k], float((samples[names[0]] - samples[k]).abs().max()))
        row = {k: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)} for k, v in times.items()}
        for k in names[1:]:
            row[k]["vs_" + names[0]] = round(row[names[0]]["median_ms"] / row[k]["median_ms"], 3)
            row[k]["max_abs_diff"] = diffs[k]
        row["warmup_s"] = round(warmup_s, 2)
        if cuda:
            row["profile"] = {w: profile(torch, lambda: forecast(w, inputs, 7)) for w in names}
        doc["lengths"][str(length)] = row
        print(length, json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    # whether each module's kept-patch sampler passed its once-per-process check (absent in older revisions)
    doc["kept_patch_checks"] = {k: {str(key): ok for key, ok in getattr(m, "_totopatch_tail_checked", {}).items()}
                                for k, m in modules.items()}
    args.out.write_text(json.dumps(doc, indent=1))


def profile(torch, run) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        wall, _ = run()
    events = p.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense"))
    return {"wall_ms": round(wall * 1e3, 3), "kernel_ms": round(kernel_us / 1e3, 3),
            "host_syncs": syncs,
            "top": [[e.key[:60], e.count, round(e.self_device_time_total / 1e3, 3)] for e in top]}


if __name__ == "__main__":
    main()
