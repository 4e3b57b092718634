"""One test per hazard: kill -9 at every step, concurrent runs, corrupt state, links, stale bytecode."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prefork
import pytest

from conftest import SAMPLE_BACKTEST, snapshot

CM = "compile-mode"
CRASH_POINTS = ["after-lock", "after-backup", "mid-write", "after-write", "before-manifest"]


def totopatch(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(root), *args],
                          capture_output=True, text=True, env={**os.environ, **env})


def state_of(root: Path) -> str:
    proc = totopatch(root, "status", CM, "--json")
    return json.loads(proc.stdout)["items"][0]["state"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_every_step_is_recoverable(project: Path, point: str) -> None:
    target = project / "backtest_test3_inline.py"
    killed = totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT=point)
    assert killed.returncode == -signal.SIGKILL
    wrote = point in ("after-write", "before-manifest")
    assert target.read_bytes() != SAMPLE_BACKTEST if wrote else target.read_bytes() == SAMPLE_BACKTEST
    # status tells the truth, without a manifest entry for the written file
    assert state_of(project) == ("applied" if wrote else "not-applied")
    recovered = totopatch(project, "apply", CM)
    assert recovered.returncode == 0, recovered.stderr
    assert state_of(project) == "applied"
    assert not any(p.name.startswith(".totopatch-tmp-") for p in project.iterdir())
    assert totopatch(project, "revert", CM).returncode == 0
    assert target.read_bytes() == SAMPLE_BACKTEST
    assert sorted(p.name for p in project.iterdir()) == [".totopatch", "backtest_test3_inline.py", "toto"]


@pytest.mark.parametrize("point", ["after-backup", "after-write"])
def test_revert_alone_recovers_after_a_kill(project: Path, point: str) -> None:
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT=point)
    ran = totopatch(project, "revert", CM)
    assert ran.returncode == 0 and "interrupted" in ran.stdout
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_unrecorded_patch_is_recorded_from_its_backup(project: Path, cli) -> None:
    """Journal lost too: the backup beside the file proves what the original was."""
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="after-write")
    (project / ".totopatch" / "journal.json").unlink()
    assert state_of(project) == "applied-unrecorded"
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "recorded" in ran.stdout
    assert cli(project, "revert", CM).exit_code == 0
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


@pytest.mark.parametrize("first_run", ["apply", "revert"])
def test_concurrent_runs_one_fails_fast_with_locked(project: Path, first_run: str) -> None:
    """An apply started while another apply (or a revert) holds the lock fails fast."""
    if first_run == "revert":
        assert totopatch(project, "apply", CM).returncode == 0
    first = subprocess.Popen([prefork.python("cli"), "-m", "totopatch", "--root", str(project), first_run, CM],
                             env={**os.environ, "TOTOPATCH_TEST_PAUSE_AT": "after-lock:3"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    lock = project / ".totopatch" / "lock"
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    started = time.time()
    other = totopatch(project, "apply", CM)
    assert time.time() - started < 2.5
    assert other.returncode == 6 and "locked" in other.stderr
    assert first.wait(30) == 0
    expected = "applied" if first_run == "apply" else "not-applied"
    assert state_of(project) == expected


def test_corrupt_manifest_is_a_distinct_error(project: Path, cli) -> None:
    cli(project, "apply", CM)
    (project / ".totopatch" / "manifest.json").write_text('{"schema": 1, "entries": [')
    for command in (["status"], ["revert", CM], ["apply", CM]):
        ran = cli(project, *command)
        assert ran.exit_code == 7 and "manifest is corrupt" in ran.stderr


def test_backup_whose_hash_changed_is_never_restored(project: Path, cli) -> None:
    cli(project, "apply", CM)
    patched = (project / "backtest_test3_inline.py").read_bytes()
    (project / "backtest_test3_inline.py.backup").write_bytes(b"print('tampered')\n")
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 7 and "unverified backup" in ran.stderr
    assert (project / "backtest_test3_inline.py").read_bytes() == patched
    assert cli(project, "verify", CM).exit_code == 1


@pytest.mark.parametrize("bad", ["../outside.py", "/etc/passwd"])
def test_manifest_paths_outside_the_root_are_rejected(project: Path, cli, bad: str) -> None:
    cli(project, "apply", CM)
    path = project / ".totopatch" / "manifest.json"
    data = json.loads(path.read_text())
    data["entries"][0]["file"] = bad
    path.write_text(json.dumps(data))
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 7 and "escapes its base folder" in ran.stderr


def test_revert_keeps_later_edits_outside_the_patch(project: Path, cli) -> None:
    target = project / "backtest_test3_inline.py"
    cli(project, "apply", CM)
    text = target.read_text()
    edited = text.replace('print(run_backtest(["AAPL", "MSFT"]))', 'print(run_backtest(["AAPL", "NVDA"]))')
    edited += "\n\ndef added_later() -> int:\n    return 42\n"
    target.write_text(edited)
    status = cli(project, "status", CM)
    assert "drifted" in status.stdout and "with later edits" in status.stdout
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 0 and "merged" in ran.stdout
    expected = SAMPLE_BACKTEST.decode().replace('"MSFT"]))', '"NVDA"]))') + "\n\ndef added_later() -> int:\n    return 42\n"
    assert target.read_text() == expected


def test_symlinked_target_stays_a_link(project: Path, cli, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.py"
    real.write_bytes(SAMPLE_BACKTEST)
    link = project / "backtest_test3_inline.py"
    link.unlink()
    link.symlink_to(real)
    assert cli(project, "apply", CM).exit_code == 0
    assert link.is_symlink() and b"reduce-overhead\"  #" in real.read_bytes()
    assert cli(project, "revert", CM).exit_code == 0
    assert link.is_symlink() and real.read_bytes() == SAMPLE_BACKTEST


def test_hardlinked_target_leaves_the_other_link_alone(project: Path, cli, tmp_path: Path) -> None:
    other = tmp_path / "shared-cache-copy.py"
    os.link(project / "backtest_test3_inline.py", other)
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "hard-linked" in ran.stdout
    assert other.read_bytes() == SAMPLE_BACKTEST
    assert (project / "backtest_test3_inline.py").read_bytes() != SAMPLE_BACKTEST


def test_read_only_folder_fails_before_any_write_with_a_hint(project: Path, cli) -> None:
    project.chmod(0o555)
    try:
        ran = cli(project, "apply", CM)
    finally:
        project.chmod(0o755)
    # the target's own folder is read-only: a --state-dir would not help, so it is not suggested
    assert ran.exit_code == 5 and "its folder is not writable" in ran.stderr and "--state-dir" not in ran.stderr
    assert not (project / ".totopatch").exists()


@pytest.mark.parametrize("command", [("apply", CM), ("revert",)])
def test_a_lock_file_this_user_cannot_write_fails_with_permission_and_writes_nothing(project: Path, cli,
                                                                                    command) -> None:
    """Another user's lock file (read-only to this one): exit 5 naming it, as for the state folder; no traceback."""
    assert cli(project, "apply", "kv-cache").exit_code == 0  # something to revert
    lock = project / ".totopatch" / "lock"
    assert lock.is_file()
    lock.chmod(0o444)
    before = snapshot(project)
    try:
        ran = cli(project, *command)
        as_json = cli(project, "--json", *command)
    finally:
        lock.chmod(0o644)
    assert ran.exit_code == 5 and f"{lock}: the lock file is not writable" in ran.stderr, ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and "Traceback" not in ran.stderr
    assert as_json.exit_code == 5 and json.loads(as_json.stdout)["exit_code"] == 5
    assert snapshot(project) == before


def test_read_only_state_folder_hint_works_when_followed(project: Path, cli, tmp_path: Path) -> None:
    (project / ".totopatch").mkdir()
    (project / ".totopatch").chmod(0o555)
    before = snapshot(project)
    try:
        ran = cli(project, "apply", CM)
    finally:
        (project / ".totopatch").chmod(0o755)
    assert ran.exit_code == 5 and "--state-dir" in ran.stderr and snapshot(project) == before
    assert cli(project, "--state-dir", str(tmp_path / "state"), "apply", CM).exit_code == 0


def test_state_dir_keeps_manifest_and_backups_outside_the_tree(project: Path, cli, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cli(project, "--state-dir", str(state), "apply", CM).exit_code == 0
    assert not (project / ".totopatch").exists() and not (project / "backtest_test3_inline.py.backup").exists()
    (entry,) = json.loads((state / "manifest.json").read_text())["entries"]
    assert entry["backup_base"] == "state"
    assert cli(project, "--state-dir", str(state), "revert", CM).exit_code == 0
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_fresh_import_sees_current_source_after_apply_and_revert(project: Path, cli) -> None:
    probe = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); m = importlib.import_module("
             "'backtest_test3_inline'); print(m.load_toto_pipeline()['mode'])")

    def mode() -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOTO") and k != "PYTHONDONTWRITEBYTECODE"}
        return subprocess.run([sys.executable, "-c", probe, str(project)], capture_output=True, text=True,
                              env=env).stdout.strip()

    assert mode() == "max-autotune"
    assert list((project / "__pycache__").glob("backtest_test3_inline.*.pyc"))
    cli(project, "apply", CM)
    assert mode() == "reduce-overhead"
    cli(project, "revert", CM)
    assert mode() == "max-autotune"
