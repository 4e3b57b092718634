#!/usr/bin/env python3
"""CPU benchmark of shared-prefill: a single-step sampled forecast, unpatched vs patched, tiny Toto.

The call is the users' backtest call, ``forecast(context, prediction_length=1, num_samples=3072,
samples_per_batch=384)``, on the tiny random-weight Toto of ``totopatch.smoke`` (4 layers, 32
wide, patch 4).  Each tree runs in its own process (``toto`` is imported from that tree): one
warm-up call, then ``--repeats`` timed calls per context length; the figure is the median.  The
patched tree is a temporary copy of the installed toto-ts with only ``shared-prefill`` applied,
unless ``--patched-parent`` names one.  The samples of one seeded call are compared too.

    python benchmarks/prefill_bench.py [--contexts 512,1024] [--repeats 3] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(toto_parent: Path, contexts: list[int], repeats: int, num_samples: int, per_batch: int, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from totopatch.smoke import build_model, import_toto, make_series

    import_toto(toto_parent)
    import torch
    from toto.inference.forecaster import TotoForecaster

    forecaster = TotoForecaster(build_model("tiny").model)
    result: dict = {"forecaster": TotoForecaster.__name__, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "median_ms": {}, "samples": {}}
    for context in contexts:
        series = make_series(1, context, "cpu")
        series = series._replace(series=series.series + 100.0)

        def call():
            return forecaster.forecast(series, prediction_length=1, num_samples=num_samples,
                                       samples_per_batch=per_batch, use_kv_cache=True)

        torch.manual_seed(0)
        result["samples"][context] = call().samples
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result["median_ms"][context] = 1000 * statistics.median(times)
    torch.save(result, out)


def patched_copy(where: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from totopatch.layout import installed_toto
    from totopatch.patches import shared_prefill

    source = installed_toto()
    assert source is not None, "toto-ts must be installed"
    shutil.copytree(source / "toto", where / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    target = where / "toto" / "inference" / "forecaster.py"
    target.write_text(shared_prefill.rewrite(target.read_text(), {}).source)
    return where


def run_tree(parent: Path, args: argparse.Namespace, out: Path) -> dict:
    import torch

    cmd = [sys.executable, __file__, "--worker", str(parent), "--out", str(out), "--contexts", args.contexts,
           "--repeats", str(args.repeats), "--num-samples", str(args.num_samples),
           "--samples-per-batch", str(args.samples_per_batch)]
    subprocess.run(cmd, check=True)
    return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,1024", help="comma-separated context lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=3072)
    parser.add_argument("--samples-per-batch", type=int, default=384)
    parser.add_argument("--patched-parent", type=Path, help="folder holding a patched toto (default: a temp copy)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        worker(args.worker, contexts, args.repeats, args.num_samples, args.samples_per_batch, args.out)
        return

    sys.path.insert(0, str(ROOT))
    from totopatch.layout import installed_toto

    with tempfile.TemporaryDirectory() as tmp:
        patched = args.patched_parent or patched_copy(Path(tmp) / "patched")
        before = run_tree(installed_toto(), args, Path(tmp) / "before.pt")  # type: ignore[arg-type]
        after = run_tree(patched, args, Path(tmp) / "after.pt")
    rows = []
    for context in contexts:
        a, b = before["samples"][context], after["samples"][context]
        rows.append({"context": context, "unpatched_ms": round(before["median_ms"][context], 1),
                     "patched_ms": round(after["median_ms"][context], 1),
                     "speedup": round(before["median_ms"][context] / after["median_ms"][context], 2),
                     "max_rel_diff": float(((a - b).abs() / a.abs()).max())})
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
              "python": platform.python_version(), "torch": before["torch"], "threads": before["threads"],
              "forecasters": [before["forecaster"], after["forecaster"]], "num_samples": args.num_samples,
              "samples_per_batch": args.samples_per_batch, "prediction_length": 1, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
