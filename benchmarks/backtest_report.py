"""The tables and the chart of ``backtest_bench.py``, and the comparisons against the unpatched eager row."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import fmt


def label(row: dict) -> str:
    opts = row.get("options") or {}
    extra = []
    if opts.get("dynamic") not in (None, "auto"):
        extra.append(f"dynamic={opts['dynamic']}")
    if opts.get("regional"):
        extra.append("regional")
    if opts.get("sampling") and opts["sampling"] != "exact":
        extra.append(opts["sampling"])
    if row.get("cache") == "warm":
        extra.append(f"warm:{opts.get('warm_from')}")
    return f"{row['variant']} / {row['mode']}" + (f" ({', '.join(extra)})" if extra else "")


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        "# Toto backtest call pattern\n\n",
        f"- device: {doc['device']}\n- torch: {doc['torch']}\n- date: {meta['date']}\n",
        f"- model: {meta['model']}\n- settings: {meta['settings']}\n",
        f"- patched tree: {meta.get('patches')}\n",
        "- cold: first replay of all forecasts in a fresh process (compile included); warm: median ms per "
        "forecast over the later replays; x eager: against the scenario's unpatched eager row\n",
        "- quantile diff: max |q - q_ref| / |q_ref| of the 10/50/90% sample quantiles, same seeds, vs unpatched eager\n\n",
    ]
    for scen in meta["scenarios"]:
        rows = [r for r in doc["rows"] if r.get("scenario") == scen]
        lines.append(f"## {scen}: {meta['scenario_desc'].get(scen, '')}\n\n")
        lines.append("| variant / mode | cache | cold total s | first call s | warm ms/forecast | warm x eager | cold x eager"
                     " | warm IQR ms (n) | recompiles | cudagraph skips | graph breaks | peak GB | quantile max rel diff | error |\n")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
        for r in rows:
            st = r.get("warm_stats_ms") or {}
            lines.append(
                f"| {label(r)} | {r.get('cache')} | {fmt(r.get('cold_total_s'), 2)} | {fmt(r.get('first_call_s'), 2)}"
                f" | {fmt(r.get('warm_median_ms'), 2)} | {fmt(r.get('warm_speedup_vs_eager'), 2)}"
                f" | {fmt(r.get('cold_speedup_vs_eager'), 2)}"
                f" | {fmt(st.get('iqr'), 2)} ({st.get('n', 0)}) | {fmt(r.get('recompiles'))}"
                f" | {fmt(r.get('cudagraph_skips'))} | {fmt(r.get('graph_breaks'))} | {fmt(r.get('peak_mem_gb'), 2)}"
                f" | {fmt(r.get('quantile_max_rel_diff'), -1)} | {(r.get('error') or '')[:160]!s} |\n"
                .replace("|  |", "| |"))
        lines.append("\n")
    return "".join(lines)


def chart(doc: dict, plt: Any, path: Path) -> None:
    """Two bar charts per scenario: warm ms per forecast, and the first replay's seconds."""
    scens = doc["meta"]["scenarios"]
    nrows = max(len([r for r in doc["rows"] if r.get("scenario") == s]) for s in scens) if doc["rows"] else 1
    fig, axes = plt.subplots(len(scens), 2, figsize=(14, (0.4 * nrows + 1.6) * len(scens)), squeeze=False)
    for (ax_w, ax_c), scen in zip(axes, scens):
        rows = [r for r in doc["rows"] if r.get("scenario") == scen]
        names = [label(r) + (" [warm cache]" if r.get("cache") == "warm" else "") for r in rows]
        colors = ["tab:gray" if r["mode"] == "eager" else ("tab:green" if r["variant"] == "patched" else "tab:blue")
                  for r in rows]
        for ax, key, unit in ((ax_w, "warm_median_ms", "ms per forecast, warm"), (ax_c, "cold_total_s", "s, first replay")):
            vals = [r.get(key) or 0.0 for r in rows]
            ax.barh(range(len(rows)), vals, color=colors)
            ax.set_yticks(range(len(rows)), names, fontsize=7)
            ax.invert_yaxis()
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.1f}" if v else " failed", va="center", fontsize=7)
            ax.set_xlabel(unit)
            ax.set_xlim(0, max(vals + [1e-9]) * 1.3)
            ax.set_title(f"{scen}: {unit}", fontsize=9)
    fig.suptitle(f"Toto backtest call pattern, {doc['device']}, torch {doc['torch']}, {doc['meta']['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_and_score(rows: list[dict], qfiles: dict[int, Path]) -> None:
    """Fill quantile_max_rel_diff and speed-ups against each scenario's first unpatched eager row."""
    for i, r in enumerate(rows):
        ref_i = next((j for j, x in enumerate(rows) if x.get("scenario") == r.get("scenario")
                      and x["variant"] == "unpatched" and x["mode"] == "eager"), None)
        if ref_i is None:
            continue
        ref = rows[ref_i]
        if qfiles.get(i) and qfiles.get(ref_i) and qfiles[i].exists() and qfiles[ref_i].exists():
            diff = max_rel_diff(json.loads(qfiles[i].read_text()), json.loads(qfiles[ref_i].read_text()))
            r["quantile_max_rel_diff"] = diff
        if ref.get("warm_median_ms") and r.get("warm_median_ms"):
            r["warm_speedup_vs_eager"] = round(ref["warm_median_ms"] / r["warm_median_ms"], 3)
        if ref.get("cold_total_s") and r.get("cold_total_s"):
            r["cold_speedup_vs_eager"] = round(ref["cold_total_s"] / r["cold_total_s"], 3)


def scenario_desc(scen: dict) -> str:
    n = len(scen["lengths"]) * len(scen["horizons"])
    return (f"{len(scen['lengths'])} series (lengths {', '.join(map(str, scen['lengths']))}) x horizons "
            f"{', '.join(map(str, scen['horizons']))} = {n} forecasts; prediction {scen['prediction']}, "
            f"{scen['num_samples']} samples in batches of {scen['samples_per_batch']}")


def max_rel_diff(q: list, ref: list) -> float | None:
    """max |q - ref| / |ref| over nested lists of equal shape (|ref| floored at 1e-6 of its largest value)."""
    flat_q, flat_ref = _flatten(q), _flatten(ref)
    if len(flat_q) != len(flat_ref) or not flat_ref:
        return None
    floor = max(max(abs(x) for x in flat_ref), 1e-30) * 1e-6
    return max(abs(a - b) / max(abs(b), floor) for a, b in zip(flat_q, flat_ref))


def _flatten(x: Any) -> list[float]:
    return [v for item in x for v in _flatten(item)] if isinstance(x, list) else [float(x)]


def key_diff(fresh: Path, warm: Path) -> list[str] | None:
    """The lines of the FX graph cache keys' hash details that differ between two processes, graph by graph."""
    if not (fresh.exists() and warm.exists()):
        return None
    out = []
    for i, (a, b) in enumerate(zip(json.loads(fresh.read_text()), json.loads(warm.read_text()))):
        a_lines, b_lines = a.splitlines()[1:], b.splitlines()[1:]  # the first line names the key itself
        a_set, b_set = set(a_lines), set(b_lines)
        only_a = [line for line in a_lines if line not in b_set]
        only_b = [line for line in b_lines if line not in a_set]
        out += [f"graph {i} fresh: {line[:300]}" for line in only_a[:10]]
        out += [f"graph {i} warm:  {line[:300]}" for line in only_b[:10]]
    return out
