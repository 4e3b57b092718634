#!/usr/bin/env python3
"""Benchmark Toto forecasting: eager vs torch.compile, unpatched vs patched, on one GPU.

Each (variant, mode) runs in its own subprocess with a fresh TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR, so compile caches and dynamo state never leak between rows.  Inside one
worker the scenarios run one after the other with ``torch._dynamo.reset()`` and the
cudagraph trees reset between them.

Model: the real Toto architecture in the Toto-Open-Base-1.0 shape, random weights (fixed
seed), eval, float32, SDPA attention; compiled the way users do,
``torch.compile(toto.model, mode=...)``, and driven by
``TotoForecaster(toto.model).forecast(..., use_kv_cache=True)``.

Examples::

    # the final comparison (unpatched tree = installed toto-ts, patched copy in DIR)
    python benchmarks/gpu_bench.py --patched-parent DIR
    # design exploration with monkeypatched cache classes: benchmarks/exploration/explore_designs.py
    # CPU smoke test of the harness itself
    python benchmarks/gpu_bench.py --tiny --device cpu --backend eager

A row spec is ``VARIANT:MODE[@SCENARIO+SCENARIO]`` (the suffix limits the row's scenarios).  VARIANT is ``unpatched`` (the toto under --toto-parent),
``patched`` (the toto under --patched-parent).  MODE is ``eager`` or a torch.compile
mode.  The bare word ``eager`` means ``unpatched:eager``, the reference for speed-ups and diffs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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
DEFAULT_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from totopatch.model_shape import toto_kwargs  # noqa: E402  (the checkout, importable without installing)

# the model shapes are defined once, in totopatch/model_shape.py (shared with totopatch/smoke.py)
BASE_CONFIG = toto_kwargs("base")
TINY_CONFIG = toto_kwargs("tiny")
SCENARIOS = {
    # 1 series of 8 variates, context 512, 384 ahead = prefill + 5 decode steps
    "decode": dict(variates=8, context=512, prediction=384, num_samples=None, samples_per_batch=1),
    # 1 variate, 256 sample paths in one batch, 64 ahead
    "samples": dict(variates=1, context=512, prediction=64, num_samples=256, samples_per_batch=256),
}
TINY_SCENARIOS = {
    "decode": dict(variates=3, context=64, prediction=48, num_samples=None, samples_per_batch=1),
    "samples": dict(variates=1, context=64, prediction=32, num_samples=8, samples_per_batch=8),
}


# --------------------------------------------------------------------------------------
# worker: one (variant, mode) in a fresh process
# --------------------------------------------------------------------------------------


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

        # keep the text of every cudagraph skip (the "cudagraphs" log artifact is off)
        import importlib

        def keep_skip(fn):
            def wrapped(msg, *a, **k):
                logc.skips.append(str(msg))
                return fn(msg, *a, **k)

            return wrapped

        for modname in ("cudagraph_utils", "cudagraph_trees", "output_code", "compile_fx"):
            try:
                mod = importlib.import_module(f"torch._inductor.{modname}")
            except ImportError:
                continue
            if hasattr(mod, "log_cudagraph_skip_and_bump_counter"):
                mod.log_cudagraph_skip_and_bump_counter = keep_skip(mod.log_cudagraph_skip_and_bump_counter)

    cfg = TINY_CONFIG if spec["tiny"] else BASE_CONFIG
    scenarios = TINY_SCENARIOS if spec["tiny"] else SCENARIOS
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
        "gpu": torch.cuda.get_device_name(device) if cuda else platform_cpu(),
        "worker_s": time.perf_counter() - t_start,
    }


def platform_cpu() -> str:
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------
# orchestrator
# --------------------------------------------------------------------------------------


def parse_row(text: str) -> dict:
    """``VARIANT:MODE[@SCEN+SCEN]`` -> worker spec fragment."""
    text, _, scens = text.partition("@")
    if text == "eager":
        text = "unpatched:eager"
    variant, _, mode = text.rpartition(":")
    if not variant:
        raise SystemExit(f"row {text!r}: want VARIANT:MODE")
    spec = {"variant": variant, "mode": mode, "only": scens.split("+") if scens else []}
    if variant not in ("unpatched", "patched"):
        raise SystemExit(f"row {text!r}: unknown variant {variant!r}")
    return spec


def default_rows(args) -> list[str]:
    modes = list(DEFAULT_MODES) + (["max-autotune"] if args.max_autotune else [])
    rows = ["eager"] + [f"unpatched:{m}" for m in modes]
    if args.patched_parent:
        rows += ["patched:eager"] + [f"patched:{m}" for m in modes]
    return rows


def run_worker(spec: dict, args, log_dir: Path, script: Path | None = None) -> dict:
    tag = f"{spec['variant']}_{spec['mode']}".replace("=", "-").replace("+", "-").replace(":", "-")
    cache_root = Path(tempfile.mkdtemp(prefix=f"tb_{tag}_"))
    env = dict(os.environ)
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(cache_root / "inductor"),
        TRITON_CACHE_DIR=str(cache_root / "triton"),
        PYTHONUNBUFFERED="1",
    )
    spec_path = cache_root / "spec.json"
    res_path = cache_root / "result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--worker", str(spec_path), "--result", str(res_path)]
    t0 = time.perf_counter()
    log_path = log_dir / f"{tag}.log"
    with open(log_path, "w") as log:
        # own process group, so a timeout also ends inductor's compile workers
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.worker_timeout}s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.perf_counter() - t0
    if res_path.exists():
        res = json.loads(res_path.read_text())
    else:
        tail = log_path.read_text()[-1500:]
        res = {"rows": [{"scenario": s, "variant": spec["variant"], "mode": spec["mode"], "error": f"worker rc={rc}: {tail}"} for s in spec["scenarios"]]}
    res["wall_s"] = wall
    res["rc"] = rc
    shutil.rmtree(cache_root, ignore_errors=True)
    return res


def fmt(x, nd=1):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def label(row) -> str:
    return f"{row['variant']} / {row['mode']}"


def write_reports(meta: dict, rows: list[dict], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    eager = {r["scenario"]: r.get("median_ms") for r in rows if r["variant"] == "unpatched" and r["mode"] == "eager"}
    for r in rows:
        e = eager.get(r["scenario"])
        if e and r.get("median_ms"):
            r["speedup_vs_eager"] = e / r["median_ms"]
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))

    head = (
        f"# Toto torch.compile benchmark\n\n"
        f"- device: {meta['gpu']}\n- torch: {meta['torch']}\n- date: {meta['date']}\n"
        f"- model: {meta['model']}\n- timed runs: {meta['runs']} after first call + {meta['warmup']} warm-up calls; "
        f"median (min) ms per `forecast()` call\n- speed-up: eager unpatched median / row median, same run\n"
        f"- diff: vs eager unpatched output (decode: mean forecast; samples: sample paths, same seed);"
        f" max rel = max|out-ref| / max|ref|\n\n"
    )
    lines = [head]
    for scen in meta["scenarios"]:
        lines.append(f"## {scen}: {meta['scenario_desc'][scen]}\n\n")
        lines.append(
            "| variant / mode | median ms | min ms | speed-up | first call s | graph breaks | recompiles after warm-up"
            " (total) | cudagraph skips | cg records after warm-up | peak MiB | max abs diff | max rel diff |\n"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            if r["scenario"] != scen:
                continue
            if "error" in r:
                lines.append(f"| {label(r)} | error: {r['error'][:120]!r} |||||||||||\n")
                continue
            d = r.get("diff_samples") or r.get("diff_mean") or {}
            lines.append(
                f"| {label(r)} | {fmt(r.get('median_ms'))} | {fmt(r.get('min_ms'))} | {fmt(r.get('speedup_vs_eager'), 2)}"
                f" | {fmt(r.get('first_call_s'))} | {fmt(r.get('graph_breaks'))}"
                f" | {fmt(r.get('recompiles_after_warmup'))} ({fmt(r.get('recompiles_total'))})"
                f" | {fmt(r.get('cudagraph_skips'))} | {fmt(r.get('cudagraph_records_after_warmup'))}"
                f" | {fmt(r.get('peak_mem_mib'), 0)} | {fmt(d.get('max_abs'), 6) if d else '-'}"
                f" | {('%.2e' % d['max_rel']) if d.get('max_rel') is not None else '-'} |\n"
            )
        lines.append("\n")
    reasons = {}
    for r in rows:
        for k, v in (r.get("graph_break_reasons") or {}).items():
            reasons.setdefault(label(r) + f" [{r['scenario']}]", []).append(f"{v}x {k[:160]}")
    if reasons:
        lines.append("## graph-break reasons\n\n")
        for k, v in reasons.items():
            lines.append(f"- {k}: " + "; ".join(v[:6]) + "\n")
    (out_dir / f"{stem}.md").write_text("".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    scens = meta["scenarios"]
    fig, axes = plt.subplots(1, len(scens), figsize=(7 * len(scens), 0.45 * max(6, len(rows) // len(scens)) + 2), squeeze=False)
    for ax, scen in zip(axes[0], scens):
        rs = [r for r in rows if r["scenario"] == scen and r.get("speedup_vs_eager")]
        names = [label(r) for r in rs]
        vals = [r["speedup_vs_eager"] for r in rs]
        colors = ["tab:gray" if r["mode"] == "eager" else ("tab:green" if r["variant"] != "unpatched" else "tab:blue") for r in rs]
        ax.barh(range(len(rs)), vals, color=colors)
        ax.set_yticks(range(len(rs)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        for i, (v, r) in enumerate(zip(vals, rs)):
            ax.text(v, i, f" {v:.2f}x ({r['median_ms']:.1f} ms)", va="center", fontsize=7)
        ax.set_xlabel("speed-up vs eager unpatched (median latency)")
        ax.set_title(f"{scen}", fontsize=10)
        ax.set_xlim(0, max(vals + [1.0]) * 1.35)
    fig.suptitle(f"Toto forecast, {meta['gpu']}, torch {meta['torch']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)


def main(argv=None, *, parse=parse_row, install: Any = None, script: Path | None = None) -> int:
    """The benchmark; ``parse``, ``install`` and ``script`` let benchmarks/exploration/ add row kinds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toto-parent", default="", help="dir containing the unpatched `toto` package (default: installed)")
    ap.add_argument("--patched-parent", default="", help="dir containing the patched `toto` package")
    ap.add_argument("--rows", default="", help="comma-separated VARIANT:MODE rows (default: eager + both variants x modes)")
    ap.add_argument("--max-autotune", action="store_true", help="add mode max-autotune to the default rows")
    ap.add_argument("--scenarios", default="decode,samples")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up calls after the first call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small model and short scenarios (CPU test)")
    ap.add_argument("--device", default="", help="cuda (default when available) or cpu")
    ap.add_argument("--backend", default="", help="torch.compile backend instead of inductor (e.g. eager); mode ignored")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--stem", default="", help="file name stem for json/md/png (default gpu_bench_<date>)")
    ap.add_argument("--worker-timeout", type=int, default=900)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        res = worker(spec, install)
        Path(args.result).write_text(json.dumps(res, default=str))
        return 0

    device = args.device
    if not device:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_spec = [parse(t) for t in (args.rows.split(",") if args.rows else default_rows(args))]
    if not any(s["variant"] == "unpatched" and s["mode"] == "eager" for s in rows_spec):
        rows_spec.insert(0, parse("eager"))
    # the eager unpatched row runs first: it writes the reference outputs
    rows_spec.sort(key=lambda s: not (s["variant"] == "unpatched" and s["mode"] == "eager"))
    scenarios = [s for s in args.scenarios.split(",") if s]
    ref_dir = Path(tempfile.mkdtemp(prefix="tb_ref_"))
    out_dir = Path(args.out)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stem = args.stem or ("gpu_bench_" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d_%H%M") + ("_tiny" if args.tiny else ""))

    all_rows, meta = [], None
    for i, spec in enumerate(rows_spec):
        parent = args.patched_parent if spec["variant"] == "patched" else args.toto_parent
        if spec["variant"] == "patched" and not parent:
            raise SystemExit("row 'patched:*' needs --patched-parent")
        spec.update(
            toto_parent=parent,
            device=device,
            tiny=args.tiny,
            seed=args.seed,
            runs=args.runs,
            warmup=args.warmup,
            scenarios=[x for x in scenarios if not spec["only"] or x in spec["only"]],
            backend=args.backend if spec["mode"] != "eager" else "",
            ref_dir=str(ref_dir),
            save_ref=(i == 0),
        )
        print(f"[{time.strftime('%H:%M:%S')}] {spec['variant']}:{spec['mode']} ...", flush=True)
        res = run_worker(spec, args, log_dir, script)
        for r in res["rows"]:
            r["toto_file"] = res.get("toto_file")
            r["worker_wall_s"] = res["wall_s"]
            print(
                f"    {r['scenario']:8s} median {fmt(r.get('median_ms'))} ms  first {fmt(r.get('first_call_s'))} s"
                f"  breaks {r.get('graph_breaks')}  recomp+ {r.get('recompiles_after_warmup')}"
                f"  skips {r.get('cudagraph_skips')}  rec+ {r.get('cudagraph_records_after_warmup')}"
                f"  diff {(r.get('diff_samples') or r.get('diff_mean') or {}).get('max_rel')}"
                + (f"  ERROR {r['error'][:300]}" if "error" in r else ""),
                flush=True,
            )
        all_rows += res["rows"]
        if meta is None and "torch" in res:
            meta = {"gpu": res["gpu"], "torch": res["torch"]}
        # write after every worker so a killed run still leaves results
        m = dict(meta or {"gpu": "?", "torch": "?"})
        cfg = TINY_CONFIG if args.tiny else BASE_CONFIG
        m.update(
            date=date,
            runs=args.runs,
            warmup=args.warmup,
            scenarios=scenarios,
            tiny=args.tiny,
            backend=args.backend or "inductor",
            python=sys.version.split()[0],
            toto_parent=args.toto_parent or "(installed)",
            patched_parent=args.patched_parent,
            model=(
                f"Toto {'tiny' if args.tiny else 'Toto-Open-Base-1.0 shape'}: embed {cfg['embed_dim']}, {cfg['num_layers']} layers, "
                f"{cfg['num_heads']} heads, patch {cfg['patch_size']}, random weights (seed {args.seed}), float32, SDPA"
            ),
            scenario_desc={
                k: (f"{v['variates']} variates, context {v['context']}, prediction {v['prediction']}, "
                    + ("mean forecast" if v["num_samples"] is None else f"{v['num_samples']} samples in one batch"))
                for k, v in (TINY_SCENARIOS if args.tiny else SCENARIOS).items()
            },
        )
        write_reports(m, all_rows, out_dir, stem)
    shutil.rmtree(ref_dir, ignore_errors=True)
    print((out_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
