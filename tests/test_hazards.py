"""One test per hazard found by using totopatch as a new user would: wrong results, hangs, misleading output."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import prefork
import pytest

from conftest import SAMPLE_BACKTEST, installed_toto_package, snapshot
from totopatch import engine
from totopatch.fsio import sha256
from totopatch.layout import installed_as, toto_version
from totopatch.patches import PATCHES
from totopatch.state import open_context

CM = "compile-mode"
WORKTREE = Path(__file__).resolve().parent.parent
VERSIONS_DIR = WORKTREE / ".toto-versions"


def site_of(tmp_path: Path, version: str) -> Path:
    """A site-packages folder holding one toto-ts release and its dist-info."""
    site = tmp_path / "site"
    source = installed_toto_package().parent if version == "0.2.0" else VERSIONS_DIR / version
    shutil.copytree(source / "toto", site / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source / f"toto_ts-{version}.dist-info", site / f"toto_ts-{version}.dist-info")
    return site


def reinstall(site: Path, version: str) -> None:
    """What `pip install --no-deps toto-ts==<version>` does to the folder: other files, other dist-info."""
    for old in site.glob("toto_ts-*.dist-info"):
        shutil.rmtree(old)
    shutil.rmtree(site / "toto")
    fresh = site_of(site.parent / f"fresh-{version}", version)
    shutil.copytree(fresh / "toto", site / "toto")
    shutil.copytree(fresh / f"toto_ts-{version}.dist-info", site / f"toto_ts-{version}.dist-info")


def totopatch(*args: str, cwd: Path | None = None, site: Path | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(str(p) for p in (site, WORKTREE) if p is not None)
    return subprocess.run([prefork.python("cli"), "-m", "totopatch", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": path}, timeout=timeout)


def items(ran) -> dict[str, str]:
    return {f"{i['patch']}:{i['target']}": i["state"] for i in json.loads(ran.stdout)["items"]}


# ---------------------------------------------------------------- wrong results and silent no-ops


def test_installed_state_is_found_from_any_directory(tmp_path: Path) -> None:
    site, a, b = site_of(tmp_path, "0.2.0"), tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    util = site / "toto" / "model" / "util.py"
    original = util.read_bytes()
    assert totopatch("--installed", "apply", "kv-cache", cwd=a, site=site).returncode == 0
    assert "applied" == items(totopatch("--installed", "status", "kv-cache", "--json", cwd=b, site=site))["kv-cache:util"]
    ran = totopatch("--installed", "revert", cwd=b, site=site)
    assert ran.returncode == 0 and "reverted" in ran.stdout, ran.stderr
    assert util.read_bytes() == original
    assert not (a / ".totopatch").exists() and not (b / ".totopatch").exists()
    assert not list(site.rglob("*.backup"))  # backups live in the per-user state folder


def test_run_from_inside_the_toto_checkout_uses_the_project_state(project: Path, cli) -> None:
    assert cli(project, "apply").exit_code == 0
    inner = project / "toto"
    status = cli(inner, "status", "--json")
    assert set(json.loads(status.stdout)["items"][i]["state"] for i in range(5)) == {"applied", "not-present"}
    assert cli(inner, "revert").exit_code == 0
    assert not (inner / ".totopatch").exists()
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_replaced_version_fails_the_gate_and_apply_patches_the_new_one(tmp_path: Path, cli) -> None:
    site = site_of(tmp_path, "0.1.4")
    assert cli(site, "apply", "kv-cache", "spacewise-mask").exit_code == 0
    reinstall(site, "0.2.0")
    fresh = snapshot(site / "toto")
    status = cli(site, "status", "spacewise-mask", "--check")
    assert status.exit_code == 1 and "replaced" in status.stdout and "0.1.4, now 0.2.0" in status.stdout
    ran = cli(site, "apply", "kv-cache", "spacewise-mask")
    assert ran.exit_code == 0 and "dropped the stale record" in ran.stdout, ran.stderr
    assert cli(site, "verify", "kv-cache", "spacewise-mask").exit_code == 0
    assert cli(site, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(site / "toto").items()} == {k: v[:2] for k, v in fresh.items()}
    assert not list((site / "toto").rglob("*.backup"))


def test_revert_force_never_writes_one_versions_bytes_into_another(tmp_path: Path, cli) -> None:
    site = site_of(tmp_path, "0.1.4")
    assert cli(site, "apply", "spacewise-mask").exit_code == 0
    reinstall(site, "0.2.0")
    fresh = (site / "toto" / "model" / "transformer.py").read_bytes()
    ran = cli(site, "revert", "--force")
    assert ran.exit_code == 0 and "forgotten" in ran.stdout and "nothing restored" in ran.stdout
    assert (site / "toto" / "model" / "transformer.py").read_bytes() == fresh
    assert json.loads((site / ".totopatch" / "manifest.json").read_text())["entries"] == []


def test_revert_after_a_reinstall_that_took_the_backups_needs_none(tmp_path: Path, cli) -> None:
    site = site_of(tmp_path, "0.1.4")
    assert cli(site, "apply", "kv-cache", "spacewise-mask").exit_code == 0
    reinstall(site, "0.2.0")  # the whole folder is replaced: the .backup files went with it
    fresh = snapshot(site / "toto")
    ran = cli(site, "revert")
    assert ran.exit_code == 0 and "no backup was left" in ran.stdout, ran.stderr
    assert snapshot(site / "toto") == fresh


def test_one_state_dir_shared_by_two_roots_is_refused(project: Path, cli, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(project, other)
    state = str(tmp_path / "shared-state")
    assert cli(project, "--state-dir", state, "apply").exit_code == 0
    ran = cli(other, "--state-dir", state, "apply")
    assert ran.exit_code == 2 and str(project / "toto") in ran.stderr and str(other / "toto") in ran.stderr
    assert cli(project, "--state-dir", state, "revert").exit_code == 0
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_a_backtest_named_explicitly_must_exist(project: Path, cli) -> None:
    typo = ["--backtest", str(project / "typo.py")]
    ran = cli(project, *typo, "apply", CM)
    assert ran.exit_code == 3 and "missing" in ran.stdout
    assert cli(project, *typo, "status", CM, "--check").exit_code == 1


def test_a_deleted_patched_file_fails_the_gate_and_revert_forgets_it(project: Path, cli) -> None:
    applied = cli(project, "apply")
    assert applied.exit_code == 0
    (project / "backtest_test3_inline.py").unlink()
    assert cli(project, "status", "--check").exit_code == 1
    assert cli(project, "verify").exit_code == 1
    ran = cli(project, "revert")
    patched = [line for line in applied.stdout.splitlines() if line.startswith("applied")]
    assert ran.exit_code == 0 and "forgotten" in ran.stdout
    assert ran.stdout.count("reverted") == len(patched) - 1  # every patch of a file but the deleted backtest's
    assert "KVCacheCompileFriendly" not in (project / "toto" / "toto" / "model" / "util.py").read_text()
    assert not (project / "backtest_test3_inline.py.backup").exists()
    assert (project / ".totopatch" / "backups").is_dir()  # the original is kept aside
    assert json.loads((project / ".totopatch" / "manifest.json").read_text())["entries"] == []


def test_forget_drops_only_the_records_of_deleted_files(project: Path, cli) -> None:
    assert cli(project, "apply").exit_code == 0
    (project / "backtest_test3_inline.py").unlink()
    ran = cli(project, "forget")
    assert ran.exit_code == 0 and "forgotten" in ran.stdout and "compile-mode" in ran.stdout
    assert cli(project, "status", "--check").exit_code == 0  # kv-cache etc. still applied; backtest not-present


def test_a_plain_apply_keeps_an_explicit_option(project: Path, cli) -> None:
    assert cli(project, "apply", CM, "--compile-mode", "default").exit_code == 0
    ran = cli(project, "apply")
    assert ran.exit_code == 0 and "already-applied" in ran.stdout, ran.stderr
    assert 'or "default"' in (project / "backtest_test3_inline.py").read_text()


def test_a_library_apply_without_options_then_a_cli_apply(project: Path, cli) -> None:
    ctx = open_context(project)
    assert engine.apply(ctx, engine.select(PATCHES, (CM,)), {}).code == engine.Code.OK
    (entry,) = json.loads((project / ".totopatch" / "manifest.json").read_text())["entries"]
    assert entry["options"] == {"compile_mode": "reduce-overhead"}  # the declared default is recorded
    assert cli(project, "apply", CM).exit_code == 0


def test_uninstalled_package_leftovers_are_cleaned_and_not_claimed(tmp_path: Path, cli, monkeypatch) -> None:
    site = site_of(tmp_path, "0.2.0")
    monkeypatch.setattr("totopatch.status.installed_toto", lambda: site)  # `import toto` finds this folder
    assert cli(site, "apply", "kv-cache").exit_code == 0
    assert "resolves to the patched copy" in cli(site, "status", "kv-cache").stdout
    installed = [p for p in sorted(site.rglob("*"), reverse=True) if ".totopatch" not in p.relative_to(site).parts]
    for path in installed:  # pip uninstall: removes the files it installed, then the folders left empty
        if path.is_file() and not path.name.endswith(".backup"):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    assert list(site.rglob("*.backup"))
    status = cli(site, "status", "kv-cache")
    assert "missing" in status.stdout and "resolves to the patched copy" not in status.stdout
    assert "toto-ts is not installed there" in status.stdout
    ran = cli(site, "revert")
    assert ran.exit_code == 0 and "forgotten" in ran.stdout, ran.stderr
    assert not (site / "toto").exists()  # nothing left for `import toto` to find
    assert list((site / ".totopatch" / "backups").iterdir())


def test_status_and_verify_agree_after_a_kill(project: Path) -> None:
    killed = subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(project), "apply", CM],
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(WORKTREE), "TOTOPATCH_TEST_CRASH_AT": "after-write"})
    assert killed.returncode < 0
    status = totopatch("--root", str(project), "status", CM, "--check")
    verify = totopatch("--root", str(project), "verify", CM)
    assert status.returncode == verify.returncode == 0, verify.stdout
    assert "proven" in verify.stdout


def test_an_unknown_patch_in_the_manifest_is_still_reverted(project: Path, cli) -> None:
    assert cli(project, "apply", CM).exit_code == 0
    path = project / ".totopatch" / "manifest.json"
    data = json.loads(path.read_text())
    data["entries"][0]["patch"] = "retired-patch"
    path.write_text(json.dumps(data))
    assert "retired-patch" in cli(project, "status").stdout
    ran = cli(project, "revert")
    assert ran.exit_code == 0 and "reverted" in ran.stdout
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


# ---------------------------------------------------------------- tracebacks and hangs


@pytest.mark.parametrize("kind", ["directory", "unreadable"])
def test_a_journal_that_cannot_be_read_is_one_line(project: Path, cli, monkeypatch, kind: str) -> None:
    journal = project / ".totopatch" / "journal.json"
    journal.parent.mkdir()
    if kind == "directory":
        journal.mkdir()
    else:
        journal.write_text("{}")
        real = Path.read_bytes

        def deny(self: Path) -> bytes:
            if self == journal:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", deny)
    for command in (["status"], ["apply", CM], ["revert"]):
        ran = cli(project, *command)
        assert ran.exit_code == 7 and "journal" in ran.stderr and ran.stderr.count("\n") == 1


@pytest.mark.parametrize("content", ["[]", "null", ""], ids=["list", "null", "empty"])
def test_a_journal_of_the_wrong_shape_says_what_to_do(project: Path, cli, content: str) -> None:
    (project / ".totopatch").mkdir()
    (project / ".totopatch" / "journal.json").write_text(content)
    ran = cli(project, "status")
    assert ran.exit_code == 7 and "not a totopatch journal" in ran.stderr and "move it aside" in ran.stderr
    assert "list indices" not in ran.stderr


def test_a_target_linked_to_dev_zero_is_refused(project: Path, cli) -> None:
    target = project / "backtest_test3_inline.py"
    target.unlink()
    target.symlink_to("/dev/zero")
    for command in ("status", "apply"):
        ran = cli(project, command, CM)
        assert ran.exit_code == 3 and "character device" in (ran.stderr + ran.stdout)


def test_a_fifo_as_the_backtest_script_does_not_hang(project: Path) -> None:
    target = project / "backtest_test3_inline.py"
    target.unlink()
    os.mkfifo(target)
    for command in ("status", "apply"):
        ran = totopatch("--root", str(project), command, CM, timeout=60)
        assert ran.returncode == 3 and "FIFO" in (ran.stderr + ran.stdout)
    ran = totopatch("--root", str(project), "doctor", "--json", timeout=60)
    states = {p["patch"]: p["state"] for p in json.loads(ran.stdout)["patches"]}
    assert states["compile-mode"] == "unreadable"


# ---------------------------------------------------------------- misleading output


def test_a_refused_run_lists_no_file_as_written(project: Path, cli) -> None:
    (project / "backtest_test3_inline.py").write_text("def broken(:\n")
    before = snapshot(project)
    ran = cli(project, "apply")
    assert ran.exit_code == 3 and "skipped" in ran.stdout
    assert not [line for line in ran.stdout.splitlines() if line.startswith(("applied", "reverted"))]
    assert snapshot(project) == before


def test_a_refused_run_creates_no_lock(project: Path, cli) -> None:
    (project / "backtest_test3_inline.py").write_text("def broken(:\n")
    assert cli(project, "apply").exit_code == 3
    assert not (project / ".totopatch").exists()


def test_an_undecodable_file_does_not_hide_the_other_states(project: Path, cli) -> None:
    (project / "backtest_test3_inline.py").write_bytes(b"x = '\xff'\n")
    ran = cli(project, "status", "--json")
    states = items(ran)
    assert ran.exit_code == 3 and states["compile-mode:backtest"] == "refused"
    assert states["kv-cache:util"] == "not-applied" and states["sdpa-causal:attention"] == "not-applied"


def test_a_lock_error_always_names_the_pid(project: Path, cli) -> None:
    """The holder is between taking the lock and writing its pid: the error still names it."""
    lock = project / ".totopatch" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, b"4242", 0))
    writer.start()
    try:
        ran = cli(project, "apply", CM)
    finally:
        writer.join()
        os.close(fd)
    assert ran.exit_code == 6 and "pid 4242" in ran.stderr


def test_a_state_dir_that_is_a_file_is_a_usage_error(project: Path, cli, tmp_path: Path) -> None:
    state = tmp_path / "state-file"
    state.write_text("")
    ran = cli(project, "--state-dir", str(state), "status")
    assert ran.exit_code == 2 and "--state-dir must be a folder" in ran.stderr


def test_an_unknown_smoke_backend_is_rejected_up_front(project: Path, cli) -> None:
    ran = cli(project, "verify", "--smoke", "--backend", "bogus")
    assert ran.exit_code == 2 and "'bogus' is not one of" in ran.stderr


# ---------------------------------------------------------------- state found by the files' content, not names


def upgrade_with_target(site: Path, version: str) -> None:
    """What `pip install --upgrade --no-deps --target SITE toto-ts==<version>` does: the package folders are
    replaced, the new dist-info is added, and the old dist-info stays beside it (pip keeps what it did not
    install).  Checked against pip 23.2 with 0.1.4 -> 0.2.0 and back; built here from the installed copies."""
    fresh = site_of(site.parent / f"target-{version}", version)
    shutil.rmtree(site / "toto")
    shutil.copytree(fresh / "toto", site / "toto")
    shutil.rmtree(site / f"toto_ts-{version}.dist-info", ignore_errors=True)
    shutil.copytree(fresh / f"toto_ts-{version}.dist-info", site / f"toto_ts-{version}.dist-info")


def test_the_version_is_read_from_the_files_where_pip_left_two_dist_infos(tmp_path: Path) -> None:
    site = site_of(tmp_path, "0.1.4")
    assert toto_version(site) == "0.1.4"
    upgrade_with_target(site, "0.2.0")
    assert sorted(p.name for p in site.glob("toto_ts-*.dist-info")) == ["toto_ts-0.1.4.dist-info",
                                                                       "toto_ts-0.2.0.dist-info"]
    assert toto_version(site) == "0.2.0"
    forecaster = site / "toto" / "inference" / "forecaster.py"
    assert installed_as(site, "toto/inference/forecaster.py", sha256(forecaster.read_bytes())) == "0.2.0"
    upgrade_with_target(site, "0.1.4")
    assert toto_version(site) == "0.1.4"


def test_an_upgrade_that_leaves_the_old_dist_info_is_replaced_and_patched_again(tmp_path: Path, cli) -> None:
    """Issue 20: transformer.py and forecaster.py were `conflict` ("edited inside the patched region") and apply exited 3."""
    site = site_of(tmp_path, "0.1.4")
    assert cli(site, "apply").exit_code == 0
    upgrade_with_target(site, "0.2.0")
    fresh = {k: v[:2] for k, v in snapshot(site / "toto").items()}
    rows = json.loads(cli(site, "status", "--json").stdout)["items"]
    toto_rows = [r for r in rows if r["state"] != "not-present"]
    assert toto_rows and all(r["state"] == "replaced" and "0.1.4, now 0.2.0" in r["detail"] for r in toto_rows), rows
    assert cli(site, "status", "--check").exit_code == 1
    ran = cli(site, "apply")
    assert ran.exit_code == 0 and ran.stdout.count("dropped the stale record") == len(toto_rows), ran.stdout + ran.stderr
    assert cli(site, "verify").exit_code == 0
    recorded = json.loads((site / ".totopatch" / "manifest.json").read_text())["entries"]
    assert {e["toto_version"] for e in recorded} == {"0.2.0"}
    assert cli(site, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(site / "toto").items()} == fresh


@pytest.mark.parametrize(("first", "then"), [("0.2.0", "0.1.4"), ("0.1.4", "0.2.0")])
def test_the_import_note_never_calls_a_copy_patched_that_holds_no_patch(tmp_path: Path, cli, monkeypatch,
                                                                        first: str, then: str) -> None:
    """Issue 20: after a downgrade every row said `replaced` and the note "resolves to the patched copy"."""
    site = site_of(tmp_path, first)
    monkeypatch.setattr("totopatch.status.installed_toto", lambda: site)  # `import toto` finds this folder
    assert cli(site, "apply").exit_code == 0
    assert "resolves to the patched copy" in cli(site, "status").stdout
    upgrade_with_target(site, then)
    for args in (["status"], ["status", CM], ["verify"]):
        ran = json.loads(cli(site, *args, "--json").stdout)
        holds = any(i["state"] in ("applied", "drifted") and i["target"] != "backtest" for i in ran["items"])
        claims = any("the patched copy" in n for n in ran["notes"])
        assert not holds and not claims, ran
    assert cli(site, "apply").exit_code == 0
    assert "resolves to the patched copy" in cli(site, "status").stdout


def test_installed_state_recording_the_backtest_is_found_from_any_directory(tmp_path: Path) -> None:
    """Issue 20: compile-mode recorded from a project folder made `--installed status --check` exit 2 elsewhere."""
    site, project, other = site_of(tmp_path, "0.2.0"), tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), other.mkdir()
    script = project / "backtest_test3_inline.py"
    script.write_bytes(SAMPLE_BACKTEST)
    assert totopatch("--installed", "apply", CM, cwd=project, site=site).returncode == 0
    ran = totopatch("--installed", "status", CM, "--check", cwd=other, site=site)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    doctor = json.loads(totopatch("--installed", "doctor", "--json", cwd=other, site=site).stdout)
    assert {p["patch"]: p["state"] for p in doctor["patches"]}[CM] == "applied"
    assert totopatch("--installed", "apply", cwd=other, site=site).returncode == 0
    for folder in (other, project, tmp_path):
        assert totopatch("--installed", "status", "--check", cwd=folder, site=site).returncode == 0
    named = totopatch("--installed", "--root", str(other), "status", cwd=other, site=site)  # a root named: refused
    assert named.returncode == 2 and str(project) in named.stderr
    assert totopatch("--installed", "revert", cwd=other, site=site).returncode == 0
    assert script.read_bytes() == SAMPLE_BACKTEST


def test_a_backtest_named_once_is_found_by_its_record(project: Path, cli) -> None:
    script = project / "scripts" / "my_backtest.py"
    script.parent.mkdir()
    (project / "backtest_test3_inline.py").rename(script)
    assert cli(project, "--backtest", str(script), "apply", CM).exit_code == 0
    status = cli(project, "status", CM, "--check")
    assert status.exit_code == 0 and "my_backtest.py" in status.stdout
    assert cli(project, "revert", CM).exit_code == 0 and script.read_bytes() == SAMPLE_BACKTEST


def test_a_recorded_opt_in_patch_is_listed_by_status_and_verify(project: Path, cli) -> None:
    """Issue 20: an applied layer-region never appeared in `status`, `verify` or their JSON."""
    assert cli(project, "apply").exit_code == 0
    assert "layer-region" not in cli(project, "status").stdout  # opt-in, not recorded: not listed
    assert cli(project, "apply", "layer-region").exit_code == 0
    for command in ("status", "verify"):
        rows = json.loads(cli(project, command, "--json").stdout)["items"]
        assert [r["state"] for r in rows if r["patch"] == "layer-region"] == ["applied"], rows
        assert "layer-region" in cli(project, command).stdout
    transformer = project / "toto" / "toto" / "model" / "transformer.py"
    transformer.write_bytes((installed_toto_package() / "model" / "transformer.py").read_bytes())
    assert cli(project, "status", "--check").exit_code == 1  # layer-region replaced: the gate sees it
    assert cli(project, "apply").exit_code == 0  # and a plain apply patches it again
    assert cli(project, "status", "--check").exit_code == 0
