"""Wall-clock of `totopatch doctor` with torch hidden and with torch installed, against `import torch` alone.

Targets (issue 13): under 1 s without torch; with torch, about as long as `python -c "import torch"`.
Each figure is the median of --runs fresh processes, start-up included, on an applied demo workspace.
torch is hidden by a sitecustomize that sets ``sys.modules["torch"] = None``.

    python benchmarks/bench_doctor.py [--runs 7] [--json OUT]
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

from totopatch.demo import build_workspace

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], pythonpath: list[Path]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: doctor found a problem (the demo's patched copy is not imported)
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode().strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="totopatch-bench-doctor-"))
    try:
        build_workspace(folder / "project")
        hide = folder / "hide"
        hide.mkdir()
        (hide / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
        root = str(folder / "project")
        subprocess.run([sys.executable, "-m", "totopatch", "--root", root, "apply"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        doctor = [sys.executable, "-m", "totopatch", "--root", root, "doctor"]
        hidden = [timed(doctor, [hide, REPO]) for _ in range(args.runs)]
        present = [timed(doctor, [REPO]) for _ in range(args.runs)]
        torch_only = [timed([sys.executable, "-c", "import torch"], [REPO]) for _ in range(args.runs)]
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "runs": args.runs,
            "doctor_without_torch_median_s": round(statistics.median(hidden), 3),
            "doctor_with_torch_median_s": round(statistics.median(present), 3),
            "import_torch_median_s": round(statistics.median(torch_only), 3),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
