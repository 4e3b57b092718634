"""Eager forecasts (no CUDA graphs) of the users' replay, exact and same-law sampling alternated in one process.

Rows in separate processes (``backtest_bench.py``) differ by the host's speed from process to process; this
script takes that out for the eager paths, which are bound by the host.  One process imports the patched tree
(every default patch), builds the Toto-Open-Base shape with random weights (seed 0), TF32 on, and replays the
``single`` scenario (42 forecasts of ``forecast(context, prediction_length=1, num_samples=3072,
samples_per_batch=384)``) ``--rounds`` times, each round exact then same-law (``TOTOPATCH_SAMPLING``, read per
forecast), with ``TOTOPATCH_CUDA_GRAPHS=0``.  Per sampling: the median per forecast over all rounds after the
first, and a profile of one warm forecast of the longest context: host time by operator, kernel launches,
synchronisations and device-to-host copies, kernel time.

    python benchmarks/exploration/eager_ab.py --out DIR [--rounds 4] [--stem STEM] [--tiny --device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

from backtest_bench import SCENARIOS, TINY_SCENARIOS  # noqa: E402
from backtest_worker import SEED_BASE, configure_torch, make_calls  # noqa: E402
from harness import device_slug, installed_toto_parent, make_patched_tree  # noqa: E402

SAMPLINGS = ("exact", "same-law")


def profile(torch: Any, run: Any) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=activities) as p:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = p.key_averages()
    count = {e.key: e.count for e in events}
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms": round(wall * 1e3, 3), "kernel_ms": round(kernel_us / 1e3, 3),
            "launches": sum(c for k, c in count.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")),
            "syncs": sum(c for k, c in count.items() if "Synchronize" in k),
            "copies": sum(c for k, c in count.items() if k in ("cudaMemcpyAsync", "cudaMemcpy")),
            "aten_ops": sum(c for k, c in count.items() if k.startswith("aten::")),
            "host_top": [[e.key[:50], e.count, round(e.self_cpu_time_total / 1e3, 3)] for e in host[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--stem", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eager-ab-"))
    patched, applied = make_patched_tree(work, installed_toto_parent())
    sys.path.insert(0, str(patched))
    os.environ["TOTOPATCH_CUDA_GRAPHS"] = "0"
    import torch
    import toto
    assert toto.__file__.startswith(str(patched)), toto.__file__
    from toto.data.util import dataset as toto_data
    from toto.inference.forecaster import TotoForecaster
    from toto.model.toto import Toto
    from totopatch.model_shape import toto_kwargs

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    settings = configure_torch(torch, cuda, False)
    scen = (TINY_SCENARIOS if args.tiny else SCENARIOS)["single"]
    torch.manual_seed(0)
    model = Toto(**toto_kwargs("tiny" if args.tiny else "base")).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forecaster = TotoForecaster(model.model)
    calls = make_calls(torch, toto_data, scen, device)

    def one(i: int, inputs: Any) -> float:
        torch.manual_seed(SEED_BASE + i)
        sync()
        start = time.perf_counter()
        forecaster.forecast(inputs, prediction_length=scen["prediction"], num_samples=scen["num_samples"],
                            samples_per_batch=scen["samples_per_batch"], use_kv_cache=True)
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {s: [] for s in SAMPLINGS}
    for round_ in range(args.rounds):
        for sampling in SAMPLINGS:
            os.environ["TOTOPATCH_SAMPLING"] = sampling
            taken = [one(i, inputs) for i, (_, _, inputs) in enumerate(calls)]
            if round_:
                times[sampling] += taken
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    doc: dict[str, Any] = {"device": device_name, "torch": torch.__version__, "settings": settings, "applied": applied,
                           "scenario": scen, "rounds": args.rounds, "rows": {}}
    for sampling in SAMPLINGS:
        os.environ["TOTOPATCH_SAMPLING"] = sampling
        last = len(calls) - 1
        doc["rows"][sampling] = {"warm_median_ms": round(statistics.median(times[sampling]) * 1e3, 3),
                                 "warm_quartiles_ms": [round(q * 1e3, 3) for q in statistics.quantiles(times[sampling], n=4)],
                                 "n": len(times[sampling]),
                                 "profile": profile(torch, lambda: one(last, calls[last][2]))}
        print(sampling, json.dumps(doc["rows"][sampling]), flush=True)
    stem = args.stem or f"eager_ab_{device_slug(device_name)}_{time.strftime('%Y%m%d')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
