from __future__ import annotations

from click.testing import CliRunner

from conftest import SAMPLE_BACKTEST
from totopatch.cli import main


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


def test_demo_runs_the_cycle_over_a_sample_with_the_backend_chain() -> None:
    assert b'or os.getenv("TOTO_COMPILE_BACKEND")\n        or "inductor"' in SAMPLE_BACKTEST
    result = CliRunner().invoke(main, ["demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert backtest_diff(result.stdout) == [
        '-        or "max-autotune"  # fastest kernels, slow first call',
        '+        or "reduce-overhead"  # fastest kernels, slow first call',
        "-    compile_mode = (compile_mode_env or \"\").strip() or 'max-autotune'",
        "+    compile_mode = (compile_mode_env or \"\").strip() or 'reduce-overhead'",
    ]
    assert "revert restored every file byte for byte: yes" in result.stdout
