"""What every benchmark shares: the row process runner, the environment capture and the result files.

A benchmark runs each row in a fresh process (``run_process``), records where it ran (``environment``) and
writes ``STEM.json``, ``STEM.md`` and ``STEM.png`` into one folder per run (``write_results``), by default
``benchmarks/results/<date>_<device>_<benchmark>/`` (``default_out``).
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


# ---------------------------------------------------------------- processes

def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` and unbuffered output, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def compile_cache_env(folder: Path) -> dict[str, str]:
    """The variables that put inductor's and triton's caches under ``folder``."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}


def run_process(cmd: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> tuple[int | str, float]:
    """Run ``cmd`` in its own process group, output to ``log_path``; (exit code or "timeout after Ns", wall s).

    On a timeout the whole group is killed, so inductor's compile workers go with the row.
    """
    t0 = time.perf_counter()
    rc: int | str
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f}s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, time.perf_counter() - t0


def log_tail(path: Path, chars: int) -> str:
    """The last ``chars`` characters of a row's log, or "" when there is none."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# ---------------------------------------------------------------- Toto trees

def installed_toto_parent() -> Path:
    """The folder holding the importable ``toto`` package, found without importing it."""
    spec = importlib.util.find_spec("toto")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("toto-ts is not importable here: install it or pass --toto-parent")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def make_patched_tree(folder: Path, unpatched_parent: Path, apply_args: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """Copy ``toto`` into ``folder`` and run ``totopatch --root folder apply *apply_args``; (folder, what applied)."""
    shutil.copytree(unpatched_parent / "toto", folder / "toto",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.backup"))
    cmd = [sys.executable, "-m", "totopatch", "--root", str(folder), "apply", *apply_args, "--json"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"totopatch apply failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    applied: dict[str, list[str]] = {}
    for item in json.loads(proc.stdout).get("items", []):
        applied.setdefault(item.get("patch", "?"), []).append(f"{item.get('target')}: {item.get('state')}")
    return folder, applied


def add_tree_arguments(ap: Any) -> None:
    """The options every GPU benchmark takes: the two trees, the device, the backend, the tiny model, the seed."""
    ap.add_argument("--toto-parent", default="", help="folder holding the unpatched toto (default: installed)")
    ap.add_argument("--patched-parent", default="", help="folder holding a patched toto")
    ap.add_argument("--device", default="", help="cuda (default when available) or cpu")
    ap.add_argument("--backend", default="", help="torch.compile backend instead of inductor (e.g. eager); mode ignored")
    ap.add_argument("--tiny", action="store_true", help="tiny model and short scenarios (CPU check of the harness)")
    ap.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------- environment

def cpu_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_name(device: str) -> str:
    """The GPU's name from ``nvidia-smi`` (the parent never imports torch), or the CPU's."""
    if device != "cuda":
        return cpu_name()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0] if out else "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def default_device() -> str:
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def device_slug(name: str) -> str:
    """``h200``, ``h100``, ..., ``cpu``: the device part of a result folder's name."""
    for word in ("GH200", "H200", "H100", "A100", "L40S", "L4", "A10G", "B200"):
        if word.lower() in name.lower():
            return word.lower()
    return "cpu" if name.startswith("CPU") else "".join(c for c in name.lower() if c.isalnum())[:16] or "gpu"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def environment(device: str) -> dict[str, Any]:
    """Where a run ran, for its ``meta``: date, Python, platform, the device's name."""
    return {"date": f"{utc_now():%Y-%m-%d %H:%M} UTC", "python": sys.version.split()[0],
            "platform": platform.platform(), "device_kind": device, "device_name": device_name(device)}


def default_out(benchmark: str, device: str) -> Path:
    """``benchmarks/results/<YYYY-MM-DD>_<device>_<benchmark>/``: one folder per measured run."""
    return RESULTS / f"{utc_now():%Y-%m-%d}_{device_slug(device_name(device))}_{benchmark}"


# ---------------------------------------------------------------- result files

def write_results(out: Path, stem: str, doc: dict, markdown: str, chart: Callable[[Any, Path], None] | None) -> None:
    """Write ``STEM.json`` atomically, ``STEM.md``, and ``STEM.png`` when matplotlib imports.

    ``chart(plt, path)`` draws with the pyplot module; a chart that fails never costs the rows still to run.
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown)
    if chart is None:
        return
    plt = pyplot()
    if plt is None:
        return
    try:
        chart(plt, out / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - a chart must never cost the rows still to run
        print(f"chart failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        plt.close("all")


_NO_CHART: list[bool] = []


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (said once) when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _NO_CHART:
            print("matplotlib is not importable: no chart", flush=True)
            _NO_CHART.append(True)
        return None
    return plt


def fmt(x: Any, nd: int = 1) -> str:
    """A table cell: ``-`` for None, ``nd`` decimals for a float (``-nd`` significant digits in e-notation)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{-nd}e}" if nd < 0 else f"{x:.{nd}f}"
    return str(x)
