"""A/B of two shared-prefill forecaster modules in one process, eager, on the users' one-step forecast.

Both modules are patched copies of ``toto/inference/forecaster.py`` (made with ``totopatch apply
shared-prefill`` by two totopatch revisions); they are loaded side by side as siblings of the installed
forecaster and run the same eager backbone (Toto-Open-Base shape, random weights, TF32 on, flash and
memory-efficient SDPA on, math off).  Forecasts alternate between the two, seeded alike, per context length;
each is timed with a device synchronisation before and after.  One warm forecast per module and length is
then profiled (``torch.profiler``): kernel time summed against the forecast's wall time, and the top kernels.

    python benchmarks/exploration/sampler_ab.py --toto-parent DIR --a OLD.py --b NEW.py --out FILE.json
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
    ap.add_argument("--a", type=Path, required=True, help="forecaster module A (the baseline)")
    ap.add_argument("--b", type=Path, required=True, help="forecaster module B")
    ap.add_argument("--lengths", default="512,1024,2200")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shape", default="base")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from totopatch.smoke import build_model, import_toto

    import_toto(args.toto_parent)
    import torch
    from backtest_bench import configure_torch, make_series
    from toto.data.util.dataset import MaskedTimeseries

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    settings = configure_torch(torch, cuda, False)
    backbone = build_model(args.shape).to(device).model
    modules = {"a": load_sibling(args.a, "forecaster_a"), "b": load_sibling(args.b, "forecaster_b")}
    forecasters = {k: m.TotoForecaster(backbone) for k, m in modules.items()}
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "settings": settings, "a": str(args.a), "b": str(args.b), "classes": {k: type(f).__name__ for k, f in forecasters.items()},
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
        for which in "ab":
            forecast(which, inputs, 0)  # warm-up
        times = {"a": [], "b": []}
        diffs = []
        for r in range(args.repeats):
            order = "ab" if r % 2 == 0 else "ba"
            samples = {}
            for which in order:
                dt, samples[which] = forecast(which, inputs, 100 + r)
                times[which].append(dt * 1e3)
            diffs.append(float((samples["a"] - samples["b"]).abs().max()))
            equal = torch.equal(samples["a"], samples["b"])
        row = {k: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)} for k, v in times.items()}
        row["b_vs_a"] = round(row["a"]["median_ms"] / row["b"]["median_ms"], 3)
        row["max_abs_diff"] = max(diffs)
        row["last_equal"] = equal
        if cuda:
            row["profile"] = {w: profile(torch, lambda: forecast(w, inputs, 7)) for w in "ab"}
        doc["lengths"][str(length)] = row
        print(length, json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
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
