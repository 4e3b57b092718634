#!/usr/bin/env python3
"""Compile time of the users' first forecast, with and without the layer-region patch, on this machine.

Each row is a fresh process with an empty ``TORCHINDUCTOR_CACHE_DIR``: a Toto of 12 layers (the
Toto-Open-Base depth; narrow, so that the CPU can compile it: embed 64, 4 heads, patch 16, 4 mixture
components, random weights), ``torch.compile(backbone)`` with inductor's default mode, then the
users' call ``forecast(context, prediction_length=1, num_samples=64, samples_per_batch=32)`` on three
context lengths.  Reported per row: the first call (compile included), dynamo's tracing and the
compiler's seconds (``torch._dynamo.utils.compile_times``), the later calls, recompiles, and the
largest difference of the samples from the first row's.

Trees: ``without`` has every default patch of the Toto tree (``DEFAULT``, read from the registry);
``with`` adds layer-region.  Rows alternate (without, with, without, with, ...) so that a change of load
on a shared machine hits both alike.

    python benchmarks/compile_time_bench.py [--pairs 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import child_env, installed_toto_parent, log_tail, make_patched_tree, run_process  # noqa: E402

from totopatch.layout import TARGETS  # noqa: E402
from totopatch.patches import PATCHES  # noqa: E402

LENGTHS = (200, 333, 480)
SHAPE = dict(patch_size=16, stride=16, embed_dim=64, num_heads=4, mlp_hidden_dim=128,
             output_distribution_kwargs={"k_components": 4})
REGION = "layer-region"
# From the registry: every default patch of the Toto tree (the trees here hold no backtest script), and
# layer-region, in the order they apply.
DEFAULT = tuple(p.id for p in PATCHES if (p.default or p.id == REGION)
                and all(TARGETS[key].base == "toto" for key in p.targets))


def worker(parent: str, out: str) -> None:
    sys.path.insert(0, parent)
    import time

    import torch
    from torch._dynamo.utils import compile_times, counters

    from toto.data.util.dataset import MaskedTimeseries
    from toto.inference.forecaster import TotoForecaster
    from toto.model.toto import Toto
    from totopatch.model_shape import toto_kwargs

    torch.manual_seed(0)
    model = Toto(**{**toto_kwargs("base"), **SHAPE}).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forecaster = TotoForecaster(torch.compile(model.model))
    seconds, samples = [], []
    for t in LENGTHS:
        series = 100 + torch.randn(1, t, generator=torch.Generator().manual_seed(t)).cumsum(-1)
        inputs = MaskedTimeseries(series=series, padding_mask=torch.ones(1, t, dtype=torch.bool),
                                  id_mask=torch.zeros(1, t, dtype=torch.int), timestamp_seconds=torch.arange(t)[None],
                                  time_interval_seconds=torch.full((1,), 86_400, dtype=torch.int))
        torch.manual_seed(1)
        start = time.perf_counter()
        samples.append(forecaster.forecast(inputs, prediction_length=1, num_samples=64, samples_per_batch=32,
                                           use_kv_cache=True).samples)
        seconds.append(time.perf_counter() - start)
    table = compile_times(repr="csv", aggregate=True)
    names, values = table[0], table[1]
    phases = dict(zip(names, values))
    torch.save(samples, out + ".pt")
    Path(out).write_text(json.dumps({
        "layer_class": type(model.model.transformer.layers[0]).__name__,
        "first_call_s": round(seconds[0], 2), "later_calls_s": [round(s, 3) for s in seconds[1:]],
        "tracing_s": round(float(phases.get("bytecode_tracing", 0)), 2),
        "compiler_s": round(float(phases.get("OutputGraph.call_user_compiler", 0)), 2),
        "inductor_s": round(float(phases.get("compile_fx.<locals>.fw_compiler_base", 0)), 2),
        "recompiles": int(counters["stats"].get("unique_graphs", 0)) - 1,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    work = Path(tempfile.mkdtemp(prefix="totopatch-compile-"))
    try:
        parent = installed_toto_parent()
        without = tuple(p for p in DEFAULT if p != REGION)
        trees = {"without": make_patched_tree(work / "without", parent, without)[0],
                 "with": make_patched_tree(work / "with", parent, DEFAULT)[0]}
        rows, reference = [], None
        for index in range(args.pairs * 2):
            name = ("without", "with")[index % 2]
            out = work / f"row{index}.json"
            env = child_env({"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor{index}"), "PYTHONWARNINGS": "ignore"})
            log = work / f"row{index}.log"
            rc, _ = run_process([sys.executable, __file__, "--worker", str(trees[name]), str(out)], log, 3600, env)
            if rc != 0:
                raise SystemExit(f"row {name} failed ({rc}): {log_tail(log, 2000)}")
            row = {"tree": name, **json.loads(out.read_text())}
            samples = torch.load(str(out) + ".pt")
            reference = reference or samples
            row["max_abs_diff_vs_first_row"] = max((a - b).abs().max().item() for a, b in zip(samples, reference))
            rows.append(row)
            print(json.dumps(row), flush=True)
        summary = {name: {key: statistics.median(r[key] for r in rows if r["tree"] == name)
                          for key in ("first_call_s", "tracing_s", "compiler_s", "inductor_s")}
                   for name in trees}
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
                  "load_before": os.getloadavg()[0], "python": platform.python_version(),
                  "torch": torch.__version__, "shape": {"num_layers": 12, **SHAPE}, "lengths": LENGTHS,
                  "rows": rows, "median": summary}
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
