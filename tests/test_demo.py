from __future__ import annotations

import re

from click.testing import CliRunner

from conftest import SAMPLE_BACKTEST
from totopatch.cli import main
from totopatch.patches import PATCHES


def backtest_diff(output: str) -> list[str]:
    """The changed lines of the first diff of the backtest script in the demo's output."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("+++ ") and line.endswith("backtest_test3_inline.py"))
    changed = []
    for line in lines[start + 1:]:
        if not line.startswith((" ", "-", "+", "@@")) or line.startswith(("--- ", "+++ ")):
            break
        if line.startswith(("-", "+")):
            changed.append(line)
    return changed


def test_demo_prints_one_line_per_step_and_the_verdict() -> None:
    result = CliRunner().invoke(main, ["demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("demo project: ") and "--diff" in lines[0]
    steps = [line.split("  ")[0].strip() for line in lines[1:-1]]
    assert steps == ["$ totopatch apply --dry-run", "$ totopatch apply", "$ totopatch apply (again: nothing to do)",
                     "$ totopatch status", "$ totopatch verify", "$ totopatch revert", "$ totopatch status"]
    default = [p for p in PATCHES if p.default]
    written = sum(len(p.targets) for p in default) - 1  # every default patch's files; util_optimized is absent
    assert lines[2].endswith(f"{written} applied, 1 not-present") and lines[6].endswith(f"{written} reverted")
    assert lines[-1] == "revert restored every file byte for byte: yes"
    assert "@@" not in result.stdout and "/tmp" not in "\n".join(lines[1:])


def test_demo_diff_shows_the_diffs_with_paths_relative_to_the_demo_tree() -> None:
    assert b'or os.getenv("TOTO_COMPILE_BACKEND")\n        or "inductor"' in SAMPLE_BACKTEST
    result = CliRunner().invoke(main, ["demo", "--diff"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "+++ b/backtest_test3_inline.py" in result.stdout
    assert re.search(r"^would-apply +kv-cache +toto/toto/model/util\.py$", result.stdout, re.M)
    assert backtest_diff(result.stdout) == [
        '-        or "max-autotune"  # fastest kernels, slow first call',
        '+        or "reduce-overhead"  # fastest kernels, slow first call',
        "-    compile_mode = (compile_mode_env or \"\").strip() or 'max-autotune'",
        "+    compile_mode = (compile_mode_env or \"\").strip() or 'reduce-overhead'",
    ]
    assert "revert restored every file byte for byte: yes" in result.stdout
