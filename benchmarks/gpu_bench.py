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

Each row runs in ``gpu_worker.py``; the process runner, the environment capture and the result files are
``harness.py``'s, shared with ``backtest_bench.py``.  Results go to ``--out``, by default
``benchmarks/results/<date>_<device>_gpu_bench/``.

A row spec is ``VARIANT:MODE[@SCENARIO+SCENARIO]`` (the suffix limits the row's scenarios).  VARIANT is
``unpatched`` (the toto under --toto-parent) or ``patched`` (the toto under --patched-parent).  MODE is
``eager`` or a torch.compile mode.  The bare word ``eager`` means ``unpatched:eager``, the reference for
speed-ups and diffs.
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
for _path in (HERE.parent, HERE):  # the checkout's totopatch, importable without installing it; the siblings
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness import (add_tree_arguments, child_env, compile_cache_env, default_device, default_out, environment, fmt,  # noqa: E402
                     log_tail, run_process, write_results)
from totopatch.model_shape import toto_kwargs  # noqa: E402

DEFAULT_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# the model shapes are defined once, in totopatch/model_shape.py (shared with totopatch/smoke.py)
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


def run_worker(spec: dict, args: argparse.Namespace, log_dir: Path, script: Path | None = None) -> dict:
    """Run one row's scenarios in a fresh process with empty compile caches; its result, or one error per scenario."""
    tag = f"{spec['variant']}_{spec['mode']}".replace("=", "-").replace("+", "-").replace(":", "-")
    cache_root = Path(tempfile.mkdtemp(prefix=f"tb_{tag}_"))
    spec_path, res_path = cache_root / "spec.json", cache_root / "result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--worker", str(spec_path), "--result", str(res_path)]
    log_path = log_dir / f"{tag}.log"
    rc, wall = run_process(cmd, log_path, args.worker_timeout, child_env(compile_cache_env(cache_root)))
    if res_path.exists():
        res = json.loads(res_path.read_text())
    else:
        res = {"rows": [{"scenario": s, "variant": spec["variant"], "mode": spec["mode"],
                         "error": f"worker rc={rc}: {log_tail(log_path, 1500)}"} for s in spec["scenarios"]]}
    res["wall_s"] = wall
    res["rc"] = rc
    shutil.rmtree(cache_root, ignore_errors=True)
    return res


def label(row) -> str:
    return f"{row['variant']} / {row['mode']}"


def score(rows: list[dict]) -> None:
    """Each row's speed-up against the unpatched eager row of its scenario."""
    eager = {r["scenario"]: r.get("median_ms") for r in rows if r["variant"] == "unpatched" and r["mode"] == "eager"}
    for r in rows:
        e = eager.get(r["scenario"])
        if e and r.get("median_ms"):
            r["speedup_vs_eager"] = e / r["median_ms"]


def markdown(meta: dict, rows: list[dict]) -> str:
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
    return "".join(lines)


def chart(meta: dict, rows: list[dict], plt: Any, path: Path) -> None:
    """One bar chart per scenario: each row's speed-up against unpatched eager."""
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
    fig.savefig(path, dpi=110)


def main(argv=None, *, parse=parse_row, install: Any = None, script: Path | None = None) -> int:
    """The benchmark; ``parse``, ``install`` and ``script`` let benchmarks/exploration/ add row kinds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tree_arguments(ap)
    ap.add_argument("--rows", default="", help="comma-separated VARIANT:MODE rows (default: eager + both variants x modes)")
    ap.add_argument("--max-autotune", action="store_true", help="add mode max-autotune to the default rows")
    ap.add_argument("--scenarios", default="decode,samples")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up calls after the first call")
    ap.add_argument("--out", default="", help="result folder (default benchmarks/results/<date>_<device>_gpu_bench)")
    ap.add_argument("--stem", default="", help="file name stem for json/md/png (default gpu_bench_<date>)")
    ap.add_argument("--worker-timeout", type=int, default=900)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        from gpu_worker import worker

        res = worker(spec, install)
        Path(args.result).write_text(json.dumps(res, default=str))
        return 0

    device = args.device or default_device()
    rows_spec = [parse(t) for t in (args.rows.split(",") if args.rows else default_rows(args))]
    if not any(s["variant"] == "unpatched" and s["mode"] == "eager" for s in rows_spec):
        rows_spec.insert(0, parse("eager"))
    # the eager unpatched row runs first: it writes the reference outputs
    rows_spec.sort(key=lambda s: not (s["variant"] == "unpatched" and s["mode"] == "eager"))
    scenarios = [s for s in args.scenarios.split(",") if s]
    ref_dir = Path(tempfile.mkdtemp(prefix="tb_ref_"))
    out_dir = Path(args.out) if args.out else default_out("gpu_bench" + ("_tiny" if args.tiny else ""), device)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    date = environment(device)["date"]
    stem = args.stem or ("gpu_bench_" + date[:16].replace("-", "").replace(" ", "_").replace(":", "") + ("_tiny" if args.tiny else ""))

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
            scenario_params=TINY_SCENARIOS if args.tiny else SCENARIOS,
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
        cfg = toto_kwargs("tiny" if args.tiny else "base")
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
        score(all_rows)
        write_results(out_dir, stem, {"meta": m, "rows": all_rows}, markdown(m, all_rows),
                      lambda plt, path: chart(m, all_rows, plt, path))
    shutil.rmtree(ref_dir, ignore_errors=True)
    print((out_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
