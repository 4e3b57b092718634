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

Rows: ``VARIANT:MODE[+OPTION...]``.  VARIANT is a key of ``VARIANTS``: ``unpatched`` (the installed toto, or
``--toto-parent``) or ``patched`` (a copy of it with every default totopatch patch applied, made with
``python -m totopatch --root COPY apply``, or ``--patched-parent``).  MODE is a key of
``backtest_worker.MODES``: ``eager`` or a torch.compile mode.  Adding a row kind is one entry in either table
(``docs/design.md`` says how).
MODE ``graphs`` runs eager with the ``cuda-graphs`` patch's replays on; every other row runs with them off
(``TOTOPATCH_CUDA_GRAPHS=0``).  OPTIONs: ``sampling=exact|same-law`` (``TOTOPATCH_SAMPLING`` of the row's
process; exact when not given), ``dynamic=auto|true|false|mark`` (auto: torch's default; true/false: ``torch.compile(dynamic=...)``;
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
(if matplotlib imports) and per-row logs under ``OUT/logs/``; rewritten after every row.  OUT defaults to
``benchmarks/results/<date>_<device>_backtest/``, one folder per measured run.  The row processes run in
``backtest_worker.py``, the tables and the chart come from ``backtest_report.py``, and the process runner, the
environment capture and the result files are ``harness.py``'s, shared with ``gpu_bench.py``.

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
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # the checkout's totopatch, importable without installing it
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from backtest_report import compare_and_score, key_diff, label, markdown, chart, scenario_desc  # noqa: E402
from backtest_worker import MODES, ROW_KEYS, Worker  # noqa: E402
from harness import (add_tree_arguments, child_env, compile_cache_env, default_device, default_out, device_slug,  # noqa: E402
                     environment, fmt, installed_toto_parent, log_tail, make_patched_tree, run_process,
                     write_results)
from totopatch.patches import PATCHES  # noqa: E402

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
# variant -> the Toto tree its rows import: None is the unpatched toto itself; a tuple is a copy of it with
# `totopatch apply <tuple>` run on it (() applies every default patch)
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "unpatched": None,
    "patched": (),
    # every default patch but rope-cache: its A/B in one run
    "patched-no-rope-cache": tuple(p.id for p in PATCHES if p.default and p.id != "rope-cache"),
}
DEFAULT_ROWS = ("unpatched:eager", "unpatched:default", "unpatched:reduce-overhead",
                "patched:eager", "patched:default", "patched:reduce-overhead")
DYNAMIC_CHOICES = ("auto", "true", "false", "mark")
SAMPLING_CHOICES = ("exact", "same-law")  # TOTOPATCH_SAMPLING of the row's process (patched rows)
EAGER_MODES = ("eager", "graphs")  # graphs: eager, with the cuda-graphs patch's replays on (off in eager rows)


def parse_row(text: str, args: argparse.Namespace) -> dict:
    """``VARIANT:MODE[+dynamic=X][+regional][+sampling=S]`` -> the row's spec fragment."""
    head, *opts = text.strip().split("+")
    variant, _, mode = head.partition(":")
    if variant not in VARIANTS or mode not in MODES:
        raise SystemExit(f"row {text!r}: want VARIANT:MODE[+dynamic=X][+regional], VARIANT one of "
                         f"{', '.join(VARIANTS)}, MODE one of {', '.join(MODES)}")
    options: dict[str, Any] = {"dynamic": args.dynamic, "regional": args.regional}
    sampling = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "sampling" and value in SAMPLING_CHOICES:
            sampling = value
        elif key == "dynamic" and value in DYNAMIC_CHOICES:
            options["dynamic"] = value
        elif key == "regional" and not value:
            options["regional"] = True
        else:
            raise SystemExit(f"row {text!r}: unknown option {opt!r} (dynamic={'|'.join(DYNAMIC_CHOICES)}, regional, "
                             f"sampling={'|'.join(SAMPLING_CHOICES)})")
    if options["regional"] and options["dynamic"] == "mark":
        raise SystemExit(f"row {text!r}: dynamic=mark applies to the whole-backbone compile, not with regional")
    if mode in EAGER_MODES:
        options = {"dynamic": None, "regional": False}
    if args.backend and mode not in EAGER_MODES:
        options["backend"] = args.backend
    if sampling is not None:
        options["sampling"] = sampling
    return {"variant": variant, "mode": mode, "cache": "fresh", "options": options}


def row_environment(spec: dict) -> dict[str, str]:
    """The totopatch run-time switches of a row: CUDA graphs only in ``graphs`` rows, the sampling it names."""
    env = {"TOTOPATCH_CUDA_GRAPHS": "1" if spec["mode"] == "graphs" else "0"}
    env["TOTOPATCH_SAMPLING"] = spec["options"].get("sampling") or "exact"
    return env


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
        if r["mode"] in EAGER_MODES or not args.warm:
            continue
        sources = ("cache-dir", "artifacts") if args.warm == "both" else \
            (("cache-dir",) if args.warm == "dir" else ("artifacts",))
        if "artifacts" in sources:
            r["save_artifacts"] = True
        for src in sources:
            out.append({**r, "cache": "warm", "options": {**r["options"], "warm_from": src}, "save_artifacts": False})
    return out



def row_tag(spec: dict, index: int) -> str:
    opts = spec["options"]
    bits = [spec["scenario"], spec["variant"], spec["mode"], spec["cache"]]
    if opts.get("dynamic") not in (None, "auto"):
        bits.append(f"dyn-{opts['dynamic']}")
    if opts.get("regional"):
        bits.append("regional")
    if opts.get("sampling"):
        bits.append(opts["sampling"])
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
    env = child_env({**compile_cache_env(Path(spec["cache_root"])), **row_environment(spec)})
    rc, wall = run_process([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                           log_path, timeout, env)
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
        row["error"] = f"worker exit {rc} in phase {row.get('phase', 'start')}: {log_tail(log_path, 600)}"
    row["process_wall_s"] = round(wall, 2)
    return res


def missing_row(spec: dict, error: str) -> dict:
    """The result of a row that could not run."""
    row = {**{k: None for k in ROW_KEYS}, **{k: spec[k] for k in ("variant", "mode", "cache", "scenario", "options")}}
    return {"row": {**row, "error": error}, "meta": {}}


def make_trees(row_specs: list[dict], args: argparse.Namespace, work: Path, unpatched: Path) -> dict[str, Path]:
    """The Toto tree of every variant the rows use; what was applied goes into ``patches``."""
    trees: dict[str, Path] = {}
    for variant in dict.fromkeys(r["variant"] for r in row_specs):
        apply_args = VARIANTS[variant]
        if apply_args is None:
            trees[variant] = unpatched
        elif variant == "patched" and args.patched_parent:
            trees[variant] = Path(args.patched_parent).resolve()
            PATCHES[variant] = f"given: {trees[variant]}"
        else:
            trees[variant], PATCHES[variant] = make_patched_tree(work / variant, unpatched, apply_args)
    return trees


PATCHES: dict[str, Any] = {}  # variant -> what `totopatch apply` reported for its tree


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



def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--scenarios", default="single", help="comma-separated: single, multi")
    ap.add_argument("--dynamic", choices=DYNAMIC_CHOICES, default="auto", help="default dynamic option of compiled rows")
    ap.add_argument("--regional", action="store_true", help="compiled rows compile each transformer layer")
    ap.add_argument("--warm", choices=("", "dir", "artifacts", "both"), default="",
                    help="add warm-cache rows after each compiled row")
    ap.add_argument("--repeats", type=int, default=1, help="warm replays per row (statistics over them)")
    add_tree_arguments(ap)
    ap.add_argument("--allow-math-sdp", action="store_true", help="keep math SDPA enabled on CUDA")
    ap.add_argument("--lengths", default="", help="override the series lengths, e.g. 512,777")
    ap.add_argument("--horizons", default="", help="override the horizons, e.g. 2,1")
    ap.add_argument("--num-samples", type=int, default=0)
    ap.add_argument("--samples-per-batch", type=int, default=0)
    ap.add_argument("--prediction", type=int, default=0, help="override the multi scenario's prediction length")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each row (0: torch's default)")
    ap.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row process")
    ap.add_argument("--budget", type=float, default=0.0, help="total seconds for all rows (0: unlimited)")
    ap.add_argument("--out", default="", help="result folder (default benchmarks/results/<date>_<device>_backtest)")
    ap.add_argument("--stem", default="", help="file stem (default backtest_<device>_<date>)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.worker:
        Worker(json.loads(Path(args.worker).read_text())).run()
        return 0

    t_begin = time.perf_counter()
    device = args.device or default_device()  # the parent never imports torch
    scenarios = build_scenarios(args)
    row_specs = expand_rows(args)
    work = Path(tempfile.mkdtemp(prefix="backtest_bench_"))
    unpatched_parent = Path(args.toto_parent).resolve() if args.toto_parent else installed_toto_parent()
    trees = make_trees(row_specs, args, work, unpatched_parent)
    env = environment(device)
    stem = args.stem or (f"backtest_{device_slug(env['device_name'])}_{env['date'][:10].replace('-', '')}"
                         + ("_tiny" if args.tiny else ""))
    out = Path(args.out) if args.out else default_out("backtest" + ("_tiny" if args.tiny else ""), device)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    shape = "tiny" if args.tiny else "base"
    from totopatch.model_shape import SHAPES

    dims = SHAPES[shape]
    doc: dict[str, Any] = {
        "device": env["device_name"], "torch": None, "rows": [],
        "meta": {
            **{k: env[k] for k in ("date", "python", "device_kind")},
            "scenarios": list(scenarios), "scenario_desc": {k: scenario_desc(v) for k, v in scenarios.items()},
            "scenario_params": scenarios, "repeats": args.repeats, "seed": args.seed, "shape": shape,
            "model": (f"Toto {'tiny' if args.tiny else 'Toto-Open-Base-1.0 shape'}: embed {dims['embed_dim']}, "
                      f"{dims['num_layers']} layers, {dims['num_heads']} heads, patch {dims['patch_size']}, "
                      f"random weights (seed {args.seed}), float32, SDPA"),
            "settings": ("fp32 (CPU: no TF32)" if device != "cuda" else
                         "fp32, TF32 on, SDPA flash + memory-efficient on, math " + ("on" if args.allow_math_sdp else "off")),
            "call": "TotoForecaster(backbone).forecast(MaskedTimeseries(context[None, :]), prediction_length, "
                    "num_samples, samples_per_batch, use_kv_cache=True)",
            "unpatched_parent": str(unpatched_parent), "patched_parent": str(trees["patched"]) if "patched" in trees else None,
            "trees": {k: str(v) for k, v in trees.items()},
            "patches": PATCHES.get("patched"), "patches_by_variant": dict(PATCHES),
            "budget_s": args.budget or None, "row_timeout_s": args.row_timeout,
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
                        work=str(work), toto_parent=str(trees[base["variant"]]))
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
                res = missing_row(spec, "no cache artifacts from the fresh row")
            elif timeout < 20:
                res = missing_row(spec, f"not run: {max(remaining, 0):.0f}s of the budget left")
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
            write_results(out, stem, doc, markdown(doc), lambda plt, path: chart(doc, plt, path))
            print(f"    {label(row)} [{row['cache']}] cold {fmt(row.get('cold_total_s'), 2)} s, first "
                  f"{fmt(row.get('first_call_s'), 2)} s, warm {fmt(row.get('warm_median_ms'), 2)} ms/forecast, "
                  f"recompiles {row.get('recompiles')}, skips {row.get('cudagraph_skips')}, breaks "
                  f"{row.get('graph_breaks')}, peak {fmt(row.get('peak_mem_gb'), 2)} GB, qdiff "
                  f"{fmt(row.get('quantile_max_rel_diff'), -1)}" + (f"  ERROR {row['error'][:300]}" if row.get("error") else ""),
                  flush=True)
            index += 1
        for p in work.glob("cache_*"):  # the scenario's caches are no longer needed
            shutil.rmtree(p, ignore_errors=True)
    print((out / f"{stem}.md").read_text(), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
