"""Wall-clock of the CLI on a pre-commit-sized job: `status` on an applied tree, `apply` of all patches.

Targets (issue: core engine): status < 0.3 s, apply < 1.5 s on a 3,000-line backtest script.
Each figure is the median of --runs fresh `python -m totopatch` processes, start-up included.

    python benchmarks/bench_cli.py [--runs 7] [--lines 3000] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from totopatch.demo import build_workspace

FILLER = '''

def helper_{n}(frame, window: int = {n}) -> float:
    """Lookalike text that must not change: "max-autotune", os.getenv("KRONOS_COMPILE_MODE")."""
    mode = os.getenv("KRONOS_COMPILE_MODE", "max-autotune")
    total = 0.0
    for i in range(window):
        total += float(i) * 0.5  # {n}
    return total if mode else -total
'''


def grow(script: Path, lines: int) -> int:
    text = script.read_text()
    n = 0
    while text.count("\n") < lines:
        text += FILLER.format(n=n)
        n += 1
    script.write_text(text)
    return text.count("\n")


def timed(root: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "totopatch", "--root", str(root), *args], capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"totopatch {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lines", type=int, default=3000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="totopatch-bench-"))
    try:
        build_workspace(folder)
        lines = grow(folder / "backtest_test3_inline.py", args.lines)
        apply_s, status_s = [], []
        for _ in range(args.runs):
            apply_s.append(timed(folder, "apply"))
            status_s.append(timed(folder, "status", "--check"))
            timed(folder, "revert")
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "backtest_lines": lines,
            "runs": args.runs,
            "apply_median_s": round(statistics.median(apply_s), 3),
            "status_applied_median_s": round(statistics.median(status_s), 3),
            "python_startup_s": round(statistics.median(
                [_startup() for _ in range(args.runs)]), 3),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _startup() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
