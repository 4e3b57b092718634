"""The users' replay with one-step forecasts replayed whole from CUDA graphs, exact and same-law sampling.

Rows, each in its own process (``--row``): unpatched eager (the same run's baseline); the patched tree with
``TOTOPATCH_CUDA_GRAPHS=0`` and with graphs, each with exact sampling and with ``TOTOPATCH_SAMPLING=same-law``.
The replay is ``backtest_bench.py``'s ``single`` scenario: 6 series of 512 to 2,200 points x horizons 7..1 = 42
forecasts of ``forecast(context, prediction_length=1, num_samples=3072, samples_per_batch=384)``, Toto-Open-Base
shape with random weights (seed 0), fp32, TF32 on, flash and memory-efficient SDPA on, math off.  The same seed
before each forecast.

Per row: ``first_replay_s`` (the first replay of all 42 forecasts, captures included), ``first_call_s``,
``warm_median_ms`` (median per forecast over ``--repeats`` later replays), ``peak_mem_gb``
(``torch.cuda.max_memory_allocated`` over all replays), the runner's counts (captures, replays, whole-forecast
graphs, refusals and why, rechecked replays, eager reasons).  The parent compares every forecast's samples of the
first and the last replay: ``bit_equal_to`` the same sampling's graphs-off row, and the 10/50/90% quantiles
against unpatched eager.  Graphs rows add ``parts_us`` (for the longest context: the key, one whole replay with
its flag read, a whole forecast) and a profile of one warm forecast (kernel time against wall time).

    python benchmarks/exploration/whole_forecast_replay.py --out DIR [--repeats 5] [--rows ...] [--stem STEM]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

from backtest_bench import SCENARIOS, TINY_SCENARIOS  # noqa: E402
from backtest_worker import SEED_BASE, configure_torch, make_calls, quartiles  # noqa: E402
from harness import child_env, device_name as gpu_name, device_slug as gpu_slug  # noqa: E402
from harness import installed_toto_parent, make_patched_tree  # noqa: E402

ROWS = {  # name: (tree, environment, the row whose samples it must equal bit for bit)
    "unpatched": ("unpatched", {}, None),
    "graphs-off": ("patched", {"TOTOPATCH_CUDA_GRAPHS": "0", "TOTOPATCH_SAMPLING": "exact"}, None),
    "graphs": ("patched", {"TOTOPATCH_SAMPLING": "exact"}, "graphs-off"),
    "graphs-off-same-law": ("patched", {"TOTOPATCH_CUDA_GRAPHS": "0", "TOTOPATCH_SAMPLING": "same-law"}, None),
    "graphs-same-law": ("patched", {"TOTOPATCH_SAMPLING": "same-law"}, "graphs-off-same-law"),
}
QUANTILES = (0.1, 0.5, 0.9)


def worker(args: argparse.Namespace) -> None:
    from totopatch.model_shape import toto_kwargs
    from totopatch.smoke import import_toto

    toto = import_toto(Path(args.toto_parent))
    import torch
    import toto.inference.forecaster as module
    from toto.data.util import dataset as toto_data
    from toto.inference.forecaster import TotoForecaster
    from toto.model.toto import Toto

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row: dict[str, Any] = {"row": args.row, "toto": toto.__file__, "torch": torch.__version__,
                           "settings": configure_torch(torch, cuda, False)}
    scen = (TINY_SCENARIOS if args.tiny else SCENARIOS)["single"]
    torch.manual_seed(0)
    model = Toto(**toto_kwargs("tiny" if args.tiny else "base")).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = model.model
    forecaster = TotoForecaster(backbone)
    calls = make_calls(torch, toto_data, scen, device)
    runner = getattr(module, "_totopatch_graphs", None)

    def one(i: int, inputs: Any) -> tuple[float, Any]:
        torch.manual_seed(SEED_BASE + i)
        sync()
        start = time.perf_counter()
        fc = forecaster.forecast(inputs, prediction_length=scen["prediction"], num_samples=scen["num_samples"],
                                 samples_per_batch=scen["samples_per_batch"], use_kv_cache=True)
        sync()
        return time.perf_counter() - start, torch.cat([fc.samples[0, 0, 0], fc.mean.reshape(-1)]).cpu()

    def replay() -> tuple[list[float], Any]:
        times, samples = [], []
        for i, (_, _, inputs) in enumerate(calls):
            took, drawn = one(i, inputs)
            times.append(took)
            samples.append(drawn)
        return times, torch.stack(samples)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cold, cold_samples = replay()
    row.update(first_replay_s=round(sum(cold), 3), first_call_s=round(cold[0], 4),
               first_replay_max_s=round(max(cold), 4))
    warm: list[float] = []
    last = cold_samples
    for _ in range(args.repeats if args.row != "unpatched" else 1):
        times, last = replay()
        warm += times
    row.update(warm_median_ms=round(statistics.median(warm) * 1e3, 3), warm=quartiles([t * 1e3 for t in warm]))
    if cuda:
        row.update(peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 4),
                   peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 4))
    if runner is not None:
        row.update(captures=runner.captures, replays=runner.replays, failures=runner.failures,
                   rechecked=getattr(runner, "rechecked", None), graphs=len(runner.graphs),
                   whole=sum(key[0] == "forecast" for key in runner.graphs),
                   refused=sorted(set(getattr(runner, "refused", {}).values())), eager=dict(runner.eager))
    torch.save({"cold": cold_samples, "warm": last}, Path(args.samples))
    Path(args.result).write_text(json.dumps(row, indent=1, default=str))
    if args.row.startswith("graphs") and "off" not in args.row and runner is not None and runner.captures:
        try:
            row["parts_us"] = parts(torch, module, runner, backbone, forecaster, calls, scen, sync)
        except Exception as exc:  # noqa: BLE001 - a figure missing, the row's figures kept
            row["parts_us"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            row["profile"] = profile(torch, lambda: one(len(calls) - 1, calls[-1][2]))
        except Exception as exc:  # noqa: BLE001
            row["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.result).write_text(json.dumps(row, indent=1, default=str))


def parts(torch: Any, module: Any, runner: Any, backbone: Any, forecaster: Any, calls: list, scen: dict,
          sync: Any) -> dict:
    """For the longest context, each part timed alone (microseconds, median): the key (the model walk
    included), one whole-forecast replay with its flag read and its samples copied, and a whole forecast."""
    seen: dict[str, Any] = {}
    hook = module._totopatch_one_step

    def record(model: Any, sampling: str, prefill: dict, draws: tuple, sample: Any) -> Any:
        seen.update(sampling=sampling, prefill=prefill, draws=draws)
        return hook(model, sampling, prefill, draws, sample)

    inputs = max((c[2] for c in calls), key=lambda m: m.series.shape[-1])
    module._totopatch_one_step = record
    try:
        forecaster.forecast(inputs, prediction_length=1, num_samples=scen["num_samples"],
                            samples_per_batch=scen["samples_per_batch"])
    finally:
        module._totopatch_one_step = hook
    prefill, draws = seen["prefill"], seen["draws"]
    with torch.no_grad():
        key, why = module._totopatch_graph_key(backbone, True, prefill, runner.backend, runner.failed)
    graph = runner.graphs.get(("forecast", key, seen["sampling"], draws[0], draws[1]))
    if graph is None:
        return {"error": f"no whole-forecast graph for the longest context ({why}; refused: {dict(runner.refused)})"}

    def timed(run: Any, n: int = 100, wait: bool = True) -> float:
        samples = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            run()
            if wait:
                sync()
            samples.append(time.perf_counter() - start)
        return round(statistics.median(samples) * 1e6, 1)

    with torch.no_grad():
        return {
            "key": timed(lambda: module._totopatch_graph_key(backbone, True, prefill, runner.backend, runner.failed),
                         wait=False),
            "state": timed(lambda: module._totopatch_graph_state(backbone), wait=False),
            "whole_replay": timed(lambda: runner.replay_forecast(graph, prefill, draws)),
            "forecast": timed(lambda: forecaster.forecast(inputs, prediction_length=1, num_samples=scen["num_samples"],
                                                          samples_per_batch=scen["samples_per_batch"]), n=50),
            "time_steps": int(prefill["inputs"].shape[-1]),
        }


def profile(torch: Any, run: Any) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    run()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        wall, _ = run()
    events = p.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:10]
    return {"wall_ms": round(wall * 1e3, 3), "kernel_ms": round(kernel_us / 1e3, 3),
            "top": [[e.key[:60], e.count, round(e.self_device_time_total / 1e3, 3)] for e in top]}


def compare(torch: Any, rows: dict, samples: dict) -> None:
    """Bit equality against the same sampling's graphs-off row; quantiles against unpatched eager."""
    q = torch.tensor(QUANTILES)
    reference = samples.get("unpatched")
    for name, drawn in samples.items():
        row, against = rows[name], ROWS[name][2]
        if against in samples:
            row["bit_equal_to"] = against
            row["bit_equal"] = {part: bool(torch.equal(drawn[part], samples[against][part])) for part in ("cold", "warm")}
        if reference is not None and name != "unpatched":
            count = drawn["cold"].shape[-1] - 1  # the samples; the mean is last
            a, b = reference["cold"][:, :count].quantile(q, dim=-1), drawn["cold"][:, :count].quantile(q, dim=-1)
            row["quantile_max_rel_vs_unpatched"] = float(((a - b).abs() / a.abs().clamp_min(1e-6)).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "exploration")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stem", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--row-timeout", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="the tiny model and scenario (a CPU check of the harness)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--toto-parent", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--samples", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        return worker(args)
    import torch

    work = Path(tempfile.mkdtemp(prefix="whole-replay-"))
    unpatched = installed_toto_parent()
    patched, applied = make_patched_tree(work, unpatched)
    device = gpu_name(args.device)
    stem = args.stem or f"whole_forecast_replay_{gpu_slug(device)}_{time.strftime('%Y%m%d')}"
    doc: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": sys.version.split()[0],
                           "scenario": (TINY_SCENARIOS if args.tiny else SCENARIOS)["single"],
                           "applied": applied, "rows": {}}
    samples = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.rows.split(","):
        tree, env, _ = ROWS[name]
        result, drawn = work / f"{name}.json", work / f"{name}.pt"
        cmd = [sys.executable, __file__, "--row", name, "--repeats", str(args.repeats), "--result", str(result),
               "--device", args.device, *(["--tiny"] if args.tiny else []),
               "--samples", str(drawn), "--toto-parent", str(patched if tree == "patched" else unpatched)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=args.row_timeout)
            code, tail = proc.returncode, proc.stderr[-1500:] if proc.returncode else ""
        except subprocess.TimeoutExpired as exc:
            code, tail = "timeout", str(exc.stderr or "")[-1500:]
        row = json.loads(result.read_text()) if result.exists() else {}
        row.update(process_s=round(time.perf_counter() - start, 1), exit=code, stderr_tail=tail)
        doc["rows"][name] = row
        if drawn.exists():
            samples[name] = torch.load(drawn)
        print(name, json.dumps({k: row.get(k) for k in ("first_replay_s", "warm_median_ms", "peak_mem_gb", "captures",
                                                          "whole", "refused", "exit")}), flush=True)
        compare(torch, doc["rows"], samples)
        write(doc, args.out, stem)
    print(markdown(doc))


def write(doc: dict, out: Path, stem: str) -> None:
    base = doc["rows"].get("unpatched", {}).get("warm_median_ms")
    for row in doc["rows"].values():
        if base and row.get("warm_median_ms"):
            row["x_unpatched_eager"] = round(base / row["warm_median_ms"], 1)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [f"# One-step forecasts replayed whole from CUDA graphs ({doc['device']}, torch {doc['torch']})", "",
             "| row | first replay, 42 forecasts (s) | first call (s) | warm per forecast (ms) | x unpatched eager "
             "| peak memory (GB) | captures | whole-forecast graphs | samples = graphs off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in doc["rows"].items():
        equal = row.get("bit_equal")
        lines.append(f"| {name} | {row.get('first_replay_s')} | {row.get('first_call_s')} | {row.get('warm_median_ms')} "
                     f"| {row.get('x_unpatched_eager')} | {row.get('peak_mem_gb')} | {row.get('captures', '-')} "
                     f"| {row.get('whole', '-')} | {'-' if equal is None else all(equal.values())} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
