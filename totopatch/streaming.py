"""Run a child process, handing each stderr line to a callback as it arrives."""
from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Finished:
    returncode: int | None  # None when it was killed for running past the timeout
    stdout: str
    stderr: str


def run_streaming(cmd: list[str], timeout: float, on_stderr_line: Callable[[str], None]) -> Finished:
    """Like ``subprocess.run(capture_output=True, text=True)``, but stderr is seen line by line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    stderr: list[str] = []
    try:
        for line in proc.stderr:
            stderr.append(line)
            on_stderr_line(line.rstrip("\n"))
        proc.wait()
        reader.join()
    finally:
        timer.cancel()
        if proc.poll() is None:  # the callback raised: leave no child behind
            proc.kill()
            proc.wait()
    return Finished(None if killed.is_set() else proc.returncode, "".join(stdout), "".join(stderr))
