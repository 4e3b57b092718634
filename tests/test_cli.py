from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import prefork
import pytest

from conftest import SAMPLE_BACKTEST, snapshot
from totopatch.fsio import Lock

CM = "compile-mode"


def manifest(root: Path) -> dict:
    return json.loads((root / ".totopatch" / "manifest.json").read_text())


def test_dry_run_prints_diff_and_writes_nothing(project, cli) -> None:
    before = snapshot(project)
    ran = cli(project, "apply", CM, "--dry-run")
    assert ran.exit_code == 0
    assert '-        or "max-autotune"' in ran.stdout and '+        or "reduce-overhead"' in ran.stdout
    assert snapshot(project) == before
    assert not (project / ".totopatch").exists()


def test_apply_twice_writes_nothing_the_second_time(project, cli) -> None:
    assert cli(project, "apply", CM).exit_code == 0
    after_first = snapshot(project)
    manifest_mtime = (project / ".totopatch" / "manifest.json").stat().st_mtime_ns
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "already-applied" in ran.stdout
    assert snapshot(project) == after_first
    assert (project / ".totopatch" / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_apply_then_revert_is_byte_identical(project, cli) -> None:
    before = snapshot(project)
    assert cli(project, "apply", CM).exit_code == 0
    assert (project / "backtest_test3_inline.py.backup").read_bytes() == SAMPLE_BACKTEST
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 0 and "reverted" in ran.stdout
    assert {k: v[:2] for k, v in snapshot(project).items()} == {k: v[:2] for k, v in before.items()}
    assert manifest(project)["entries"] == []


def test_manifest_records_hashes_backup_and_options(project, cli) -> None:
    cli(project, "apply", CM, "--compile-mode", "default")
    (entry,) = manifest(project)["entries"]
    assert manifest(project)["schema"] == 1
    assert entry["patch"] == CM and entry["file"] == "backtest_test3_inline.py"
    assert entry["options"] == {"compile_mode": "default"}
    assert entry["backup"] == "backtest_test3_inline.py.backup" and entry["backup_created"] is True
    assert len(entry["before_sha256"]) == len(entry["after_sha256"]) == 64
    assert entry["totopatch_version"] and entry["applied_at"]


def test_status_never_writes_and_check_gates(project, cli) -> None:
    before = snapshot(project)
    ran = cli(project, "status", CM, "--check")
    assert ran.exit_code == 1 and "not-applied" in ran.stdout
    assert snapshot(project) == before and not (project / ".totopatch").exists()
    cli(project, "apply", CM)
    applied = snapshot(project)
    assert cli(project, "status", CM, "--check").exit_code == 0
    assert snapshot(project) == applied


def test_status_json_schema(project, cli) -> None:
    cli(project, "apply", CM)
    data = json.loads(cli(project, "status", CM, "--json").stdout)
    assert set(data) == {"schema", "command", "ok", "exit_code", "error", "items", "notes", "smoke", "environment"}
    (item,) = data["items"]
    assert set(item) == {"patch", "target", "file", "state", "detail", "diff"}
    assert (item["patch"], item["target"], item["state"]) == (CM, "backtest", "applied")


def test_changing_options_of_an_applied_patch_is_refused(project, cli) -> None:
    cli(project, "apply", CM)
    ran = cli(project, "apply", CM, "--compile-mode", "default")
    assert ran.exit_code == 3 and "revert it first" in ran.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["apply", CM, "--compile-mode", "turbo"], "'turbo' is not one of", id="bad-mode"),
        pytest.param(["apply", "no-such-patch"], "unknown patch no-such-patch", id="unknown-patch"),
    ],
)
def test_usage_errors_exit_2(project, cli, args, message) -> None:
    ran = cli(project, *args)
    assert ran.exit_code == 2 and message in ran.stderr


def test_missing_root_is_one_line(tmp_path, cli) -> None:
    ran = cli(tmp_path / "nope", "status")
    assert ran.exit_code == 2
    assert ran.stderr.strip().count("\n") == 0 and "not a directory" in ran.stderr


def test_no_toto_tree_names_the_layouts(tmp_path, cli) -> None:
    ran = cli(tmp_path, "apply")
    assert ran.exit_code == 2
    assert "toto/toto/model/util.py" in ran.stderr and "<root>/toto/model/util.py" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_syntax_error_is_refused_without_writing(project, cli) -> None:
    (project / "backtest_test3_inline.py").write_text("def broken(:\n")
    before = snapshot(project)
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 3 and "backtest_test3_inline.py" in ran.stderr and "not valid Python" in ran.stderr
    assert snapshot(project) == before


def test_read_only_target_fails_before_any_write(project, cli) -> None:
    target = project / "backtest_test3_inline.py"
    target.chmod(0o444)
    before = snapshot(project)
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 5 and "read-only" in ran.stderr and str(target.name) in ran.stderr
    assert snapshot(project) == before
    assert not (project / "backtest_test3_inline.py.backup").exists()


def test_target_that_is_a_directory_is_refused(project, cli) -> None:
    (project / "backtest_test3_inline.py").unlink()
    (project / "backtest_test3_inline.py").mkdir()
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 3 and "expected a Python file" in ran.stderr


def test_file_mode_is_preserved(project, cli) -> None:
    target = project / "backtest_test3_inline.py"
    target.chmod(0o750)
    cli(project, "apply", CM)
    assert target.stat().st_mode & 0o777 == 0o750
    cli(project, "revert", CM)
    assert target.stat().st_mode & 0o777 == 0o750


def test_a_held_lock_stops_a_second_run(project, cli) -> None:
    with Lock(project / ".totopatch" / "lock"):
        ran = cli(project, "apply", CM)
    assert ran.exit_code == 6 and "locked by another totopatch run" in ran.stderr
    assert not (project / "backtest_test3_inline.py.backup").exists()


def test_a_stale_lock_is_recovered(project, cli) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (project / ".totopatch").mkdir()
    (project / ".totopatch" / "lock").write_text(dead.stdout.strip())
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and f"recovered a stale lock left by pid {dead.stdout.strip()}" in ran.stdout


def test_a_different_existing_backup_is_never_overwritten(project, cli) -> None:
    old = project / "backtest_test3_inline.py.backup"
    old.write_bytes(b"# left by the old script\n")
    cli(project, "apply", CM)
    assert old.read_bytes() == b"# left by the old script\n"
    (entry,) = manifest(project)["entries"]
    assert entry["backup_base"] == "state" and entry["backup"].startswith("backups/")
    assert (project / ".totopatch" / entry["backup"]).read_bytes() == SAMPLE_BACKTEST
    cli(project, "revert", CM)
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST
    assert old.read_bytes() == b"# left by the old script\n"


def test_edit_in_patched_region_makes_revert_refuse_with_diff(project, cli) -> None:
    cli(project, "apply", CM)
    target = project / "backtest_test3_inline.py"
    edited = target.read_text().replace('or "reduce-overhead"  #', 'or "default"  #')
    target.write_text(edited)
    assert "conflict" in cli(project, "status", CM).stdout
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 3 and "edited inside the patched region" in ran.stderr
    assert '+        or "default"' in ran.stdout
    assert target.read_text() == edited


def test_force_revert_saves_the_users_version_aside(project, cli) -> None:
    cli(project, "apply", CM)
    target = project / "backtest_test3_inline.py"
    edited = target.read_text().replace('or "reduce-overhead"  #', 'or "default"  #')
    target.write_text(edited)
    ran = cli(project, "revert", CM, "--force")
    assert ran.exit_code == 0 and "saved to" in ran.stdout
    assert target.read_bytes() == SAMPLE_BACKTEST
    (saved,) = (project / ".totopatch" / "saved").iterdir()
    assert saved.read_text() == edited and saved.name in ran.stdout


def test_python_dash_m_runs_the_cli(project) -> None:
    proc = subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(project), "status", CM, "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["items"][0]["state"] == "not-applied"


def test_backtest_option_and_absent_backtest(project, cli) -> None:
    moved = project / "scripts" / "bt.py"
    moved.parent.mkdir()
    (project / "backtest_test3_inline.py").rename(moved)
    assert "not-present" in cli(project, "status", CM).stdout
    assert cli(project, "status", CM, "--check").exit_code == 0
    ran = cli(project, "--backtest", str(moved), "apply", CM)
    assert ran.exit_code == 0 and "applied" in ran.stdout
    assert manifest(project)["entries"][0]["file"] == "scripts/bt.py"


def test_backtest_outside_root_is_a_usage_error(project, tmp_path, cli) -> None:
    outside = tmp_path / "bt.py"
    outside.write_bytes(SAMPLE_BACKTEST)
    ran = cli(project, "--backtest", str(outside), "apply", CM)
    assert ran.exit_code == 2 and "must lie inside --root" in ran.stderr

