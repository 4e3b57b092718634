"""`totopatch demo`: the whole cycle on a throwaway copy of the installed toto-ts."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Callable

from . import engine
from .layout import installed_toto, locate
from .outcome import Report
from .patches import PATCHES
from .render import as_text, error_line


def build_workspace(folder: Path) -> Path:
    """A project with a nested Toto checkout (copied from site-packages) and the sample backtest."""
    source = installed_toto()
    if source is None:
        raise engine.Abort(engine.Code.USAGE, "toto-ts is not installed: pip install --no-deps toto-ts (see README)")
    shutil.copytree(source / "toto", folder / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    sample = resources.files("totopatch").joinpath("data/sample_backtest.py.txt").read_bytes()
    (folder / "backtest_test3_inline.py").write_bytes(sample)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".totopatch" not in p.parts}


def summary(report: Report) -> str:
    """One line for a step: how many files ended in each state, in the order they first appear."""
    counts = Counter(item.state for item in report.items)
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "nothing to do"


def run_demo(echo: Callable[[str], None], keep: bool = False, diff: bool = False) -> int:
    """Apply, apply again, status, verify and revert on a throwaway project; 0 when revert restored every byte.

    Paths are shown relative to the throwaway project. ``diff`` prints each step's full report and diffs
    instead of one line per step.
    """
    folder = Path(tempfile.mkdtemp(prefix="totopatch-demo-"))
    cwd = os.getcwd()
    try:
        build_workspace(folder)
        os.chdir(folder)  # the reports name files relative to the working directory: the demo tree's
        ctx = engine.Context(locate(folder))
        before = _snapshot(folder)
        refs = engine.select(PATCHES, ())
        steps = [
            ("apply --dry-run", lambda: engine.apply(ctx, refs, {}, dry_run=True), True),
            ("apply", lambda: engine.apply(ctx, refs, {}), False),
            ("apply (again: nothing to do)", lambda: engine.apply(ctx, refs, {}), False),
            ("status", lambda: engine.status(ctx, refs), False),
            ("verify", lambda: engine.verify(ctx, refs), False),
            ("revert", lambda: engine.revert(ctx, refs), False),
            ("status", lambda: engine.status(ctx, refs), False),
        ]
        echo(f"demo project: {folder} (a copy of the installed toto-ts under toto/, and a sample backtest script)"
             + ("" if diff else "; --diff shows each step's report and diffs"))
        width = max(len(title) for title, _, _ in steps)
        for title, step, with_diff in steps:
            report = step()
            if diff:
                echo(f"\n$ totopatch {title}\n{as_text(report, with_diff)}")
            else:
                echo(f"$ totopatch {title:<{width}}  {summary(report)}")
            if report.code:
                echo(f"demo failed at `{title}`: {report.error or 'exit ' + str(int(report.code))}")
                return int(report.code)
        same = _snapshot(folder) == before
        echo(f"{chr(10) if diff else ''}revert restored every file byte for byte: {'yes' if same else 'NO'}")
        return 0 if same else 1
    except engine.Abort as exc:
        echo(error_line(str(exc)))
        return int(exc.code)
    finally:
        os.chdir(cwd)
        if keep:
            echo(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
