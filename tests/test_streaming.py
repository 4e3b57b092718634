from __future__ import annotations

import sys
from pathlib import Path

from totopatch.streaming import run_streaming

# The child announces a phase, then waits until the parent has seen it: only a live stream gets through.
CHILD = """
import sys, time, pathlib
print("phase: one", file=sys.stderr, flush=True)
seen = pathlib.Path(sys.argv[1])
for _ in range(200):
    if seen.exists():
        break
    time.sleep(0.05)
print("seen" if seen.exists() else "not seen")
"""


def test_stderr_lines_reach_the_callback_while_the_child_runs(tmp_path: Path) -> None:
    flag = tmp_path / "seen"
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        flag.touch()

    done = run_streaming([sys.executable, "-c", CHILD, str(flag)], 60, on_line)
    assert (done.returncode, done.stdout, lines) == (0, "seen\n", ["phase: one"])


def test_a_child_past_its_timeout_is_killed_and_says_so() -> None:
    done = run_streaming([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, lambda line: None)
    assert done.returncode is None
