"""Forecast servers for comparing upstream's toto with a patched tree, request by request (CPU and GPU tests)."""
from __future__ import annotations

import dataclasses
import json
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import prefork
import torch
from click.testing import CliRunner

from conftest import installed_toto_package
from totopatch.cli import main

SCRIPT = Path(__file__).parent / "fixtures" / "prefill" / "forecast_outcomes.py"
sys.path.insert(0, str(SCRIPT.parent))
from forecast_outcomes import Request  # noqa: E402

__all__ = ["Request", "Server", "fully_patched", "same_outcome"]


def fully_patched(folder: Path) -> Path:
    """A copy of the installed toto package under ``folder`` with every default patch applied; ``folder``."""
    shutil.copytree(installed_toto_package(), folder / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    ran = CliRunner().invoke(main, ["--root", str(folder), "apply"])
    assert ran.exit_code == 0, ran.output
    return folder


class Server:
    """``forecast_outcomes.py`` running on one tree; ``ask`` sends it a request and loads the outcome."""

    def __init__(self, parent: Path, folder: Path, *options: str, timeout: float = 600) -> None:
        self.folder, self.timeout, self.count = folder, timeout, 0
        folder.mkdir(parents=True, exist_ok=True)
        self.log: IO[str] = (folder / "server.log").open("w")
        self.proc = subprocess.Popen([prefork.python(), str(SCRIPT), "--toto-parent", str(parent), *options],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, request: Request) -> dict[str, Any]:
        self.count += 1
        out = self.folder / f"outcome{self.count}.pt"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(dataclasses.asdict(dataclasses.replace(request, out=str(out)))) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "done":
            self.log.flush()
            raise AssertionError(f"the forecast server gave {line!r}: {(self.folder / 'server.log').read_text()[-3000:]}")
        return torch.load(out, weights_only=False)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def same_outcome(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Both forecasts succeeded, or both failed with the same exception type and message."""
    if before["ok"] != after["ok"]:
        return False
    return before["ok"] or (before["error_type"], before["error"]) == (after["error_type"], after["error"])
