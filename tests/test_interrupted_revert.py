"""A revert killed after it wrote the files, then an edit, then the next run: it finishes the revert, keeps the edit.

Every file, a stack of patches (forecaster.py: cuda-graphs on shared-prefill) as well as one patch (util.py): the
killed run's journal says what it meant to do; the file, edited since, holds neither what it held before nor what
the run wrote, and the next run decides from the file whether each patch's change is still in it.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import prefork
import pytest

from conftest import project_file, upstream_bytes

REPO = Path(__file__).resolve().parents[1]
POINTS = ["after-write", "before-manifest", "mid-manifest"]  # the files written, the manifest not
EDITS = {
    "first-line": lambda data: b"# my note\n" + data,
    "last-line": lambda data: data + b"# my note\n",
}


@pytest.mark.parametrize(("key", "edit", "point"), [("forecaster", edit, point) for edit in sorted(EDITS) for point in POINTS]
                         + [("util", "first-line", "before-manifest")])
def test_the_next_revert_finishes_it_and_keeps_the_edit(project: Path, cli, key: str, edit: str, point: str) -> None:
    assert cli(project, "apply").exit_code == 0
    killed = subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(project), "revert"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TOTOPATCH_TEST_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    path = project / project_file(key)
    path.write_bytes(EDITS[edit](path.read_bytes()))  # on the original, or on the patched file not yet reverted
    ran = cli(project, "revert")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert path.read_bytes() == EDITS[edit](upstream_bytes(key))
    status = cli(project, "status", "--json")
    assert status.exit_code == 0 and '"applied"' not in status.stdout and '"conflict"' not in status.stdout, status.stdout
    assert cli(project, "apply").exit_code == 0 and cli(project, "revert").exit_code == 0
    assert path.read_bytes() == EDITS[edit](upstream_bytes(key))
