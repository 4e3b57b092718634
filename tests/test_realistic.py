"""`apply` of all default patches on a script with the structures of the users' real one, end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import snapshot
from realistic_backtest import realistic_script

FIXTURES = Path(__file__).parent / "fixtures" / "backtest"


@pytest.mark.parametrize("source", [
    pytest.param(realistic_script(4300), id="generated-4300-lines"),
    pytest.param((FIXTURES / "all_shapes.py").read_text(), id="all-shapes"),
])
def test_apply_changes_only_the_mode_literals_and_revert_restores(project: Path, cli, source: str) -> None:
    script = project / "backtest_test3_inline.py"
    script.write_text(source)
    before = snapshot(project)
    ran = cli(project, "apply")
    assert ran.exit_code == 0, ran.stderr
    after = script.read_text().splitlines()
    changed = [(a, b) for a, b in zip(source.splitlines(), after) if a != b]
    assert len(after) == len(source.splitlines()) and changed and len(changed) <= 2
    assert all(a.replace('"max-autotune"', '"reduce-overhead"') == b for a, b in changed)
    assert all("compile_mode" in a or a.strip().startswith('or "max-autotune"') for a, _ in changed)
    assert cli(project, "status", "--check").exit_code == 0
    assert cli(project, "revert").exit_code == 0
    assert {k: v[0] for k, v in snapshot(project).items()} == {k: v[0] for k, v in before.items()}
