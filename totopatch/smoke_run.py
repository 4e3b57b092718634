"""Run ``totopatch.smoke`` on the tree under test in a fresh process, for ``verify --smoke``."""
from __future__ import annotations

import json
import subprocess
import sys

from .outcome import Report
from .state import Context

BACKENDS = ("eager", "aot_eager", "inductor")


def attach_smoke(ctx: Context, report: Report, device: str = "auto", backend: str = "eager",
                 mode: str | None = None, timeout: float = 1800) -> Report:
    """Compile the patched Toto from this tree in a fresh process; a failed smoke test fails verify."""
    cmd = [sys.executable, "-m", "totopatch.smoke", "--toto-parent", str(ctx.layout.toto_parent),
           "--device", device, "--backend", backend, "--json"] + (["--mode", mode] if mode else [])
    stderr = ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stderr = proc.stderr
        smoke = json.loads(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}")
    except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
        smoke = {"ok": False, "error": f"smoke test did not report ({exc.__class__.__name__})"}
    if not isinstance(smoke, dict) or "ok" not in smoke:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        smoke = {"ok": False, "error": f"smoke test failed: {last}"}
    report.smoke = smoke
    report.check = True
    return report
