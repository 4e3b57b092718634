"""Diffs are coloured on a terminal only; --no-color, NO_COLOR, a pipe and --json keep them plain."""
from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import prefork
import pytest

from totopatch.render import color_diff

REPO = Path(__file__).resolve().parents[1]
ESC = "\x1b["
GREEN_ADD = '\x1b[32m+        or "reduce-overhead"  # fastest kernels, slow first call\x1b[0m'
RED_REMOVE = '\x1b[31m-        or "max-autotune"  # fastest kernels, slow first call\x1b[0m'


def test_color_diff_marks_each_kind_of_line() -> None:
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-old\n+new\n context"
    assert color_diff(diff).split("\n") == [
        "\x1b[1m--- a/x.py\x1b[0m", "\x1b[1m+++ b/x.py\x1b[0m", "\x1b[36m@@ -1 +1 @@\x1b[0m",
        "\x1b[31m-old\x1b[0m", "\x1b[32m+new\x1b[0m", " context",
    ]


def run(project: Path, *args: str, tty: bool, no_color_env: str | None = None) -> str:
    """Run the CLI with stdout on a pseudo-terminal (or a pipe) and return what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = str(REPO)
    if no_color_env is not None:
        env["NO_COLOR"] = no_color_env
    argv = [prefork.python("cli"), "-m", "totopatch", "--root", str(project), *args]
    if not tty:
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait() == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_dry_run_diff_is_coloured_on_a_terminal(project: Path) -> None:
    out = run(project, "apply", "compile-mode", "--dry-run", tty=True)
    assert GREEN_ADD in out and RED_REMOVE in out
    headers = [line for line in out.splitlines() if line.startswith(("\x1b[1m--- a/", "\x1b[1m+++ b/"))]
    assert len(headers) == 2 and all(h.endswith("backtest_test3_inline.py\x1b[0m") for h in headers)
    assert any(line.startswith("\x1b[36m@@ ") for line in out.splitlines())
    assert out.splitlines()[0].startswith("would-apply")  # the status lines stay plain


@pytest.mark.parametrize(
    ("args", "tty", "no_color_env"),
    [
        pytest.param((), False, None, id="pipe"),
        pytest.param((), True, "1", id="NO_COLOR"),
        pytest.param(("--no-color",), True, None, id="--no-color"),
    ],
)
def test_diff_is_plain_off_a_terminal_or_when_asked(project: Path, args: tuple[str, ...], tty: bool,
                                                    no_color_env: str | None) -> None:
    out = run(project, *args, "apply", "compile-mode", "--dry-run", tty=tty, no_color_env=no_color_env)
    assert '+        or "reduce-overhead"  # fastest kernels, slow first call' in out
    assert ESC not in out


def test_json_is_never_coloured_even_on_a_terminal(project: Path) -> None:
    out = run(project, "apply", "compile-mode", "--dry-run", "--json", tty=True)
    assert ESC not in out
    (item,) = json.loads(out)["items"]
    assert item["state"] == "would-apply" and '+        or "reduce-overhead"' in item["diff"]
