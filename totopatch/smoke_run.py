"""Run ``totopatch.smoke`` on the tree under test in a fresh process, for ``verify --smoke``."""
from __future__ import annotations

import json
import sys
from typing import Callable

from .outcome import Report
from .state import Context

BACKENDS = ("eager", "aot_eager", "inductor")


def attach_smoke(ctx: Context, report: Report, device: str = "auto", backend: str = "eager",
                 mode: str | None = None, timeout: float = 1800,
                 progress: Callable[[str], None] | None = None) -> Report:
    """Compile the patched Toto from this tree in a fresh process; a failed smoke test fails verify.

    ``progress`` gets each phase the smoke test reports (building the model, eager forecast, ...).
    """
    from .smoke import PROGRESS_PREFIX  # imported here: every other command would pay for it at start-up
    from .streaming import run_streaming

    def on_line(line: str) -> None:
        if progress is not None and line.startswith(PROGRESS_PREFIX):
            progress(line[len(PROGRESS_PREFIX):])

    cmd = [sys.executable, "-m", "totopatch.smoke", "--toto-parent", str(ctx.layout.toto_parent),
           "--device", device, "--backend", backend, "--json"] + (["--mode", mode] if mode else [])
    stderr = ""
    try:
        proc = run_streaming(cmd, timeout, on_line)
        stderr = proc.stderr
        if proc.returncode is None:
            raise TimeoutError(f"no report within {timeout:.0f} s")
        smoke = json.loads(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}")
    except (TimeoutError, ValueError, OSError) as exc:
        smoke = {"ok": False, "error": f"smoke test did not report ({exc.__class__.__name__})"}
    if not isinstance(smoke, dict) or "ok" not in smoke:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        smoke = {"ok": False, "error": f"smoke test failed: {last}"}
    report.smoke = smoke
    report.check = True
    return report
