"""The state folder: the original bytes stay recoverable, and a manifest or journal is trusted only when sane.

The stateful property over every crash point, edit and version is ``test_state_machine.py``; these are
its examples, kept as plain tests, and the checks of what the state folder accepts.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import prefork
import pytest

from conftest import SAMPLE_BACKTEST, Ran
from totopatch.fsio import CRASH_POINTS

CM = "compile-mode"
ATTENTION = Path("toto/toto/model/attention.py")
TRANSFORMER = Path("toto/toto/model/transformer.py")


def totopatch(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(root), *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def held_by_state(root: Path, data: bytes) -> list[Path]:
    """Files of the state folder, and backups its manifest records, that hold exactly ``data``."""
    state = root / ".totopatch"
    found = [p for p in state.rglob("*") if p.is_file() and p.read_bytes() == data]
    manifest = state / "manifest.json"
    if manifest.is_file():
        bases = {"toto": root / "toto", "root": root, "state": state}
        for entry in json.loads(manifest.read_text())["entries"]:
            backup = bases[entry["backup_base"]] / entry["backup"]
            if backup.is_file() and backup.read_bytes() == data:
                found.append(backup)
    return found


def one_line_error(ran: Ran, code: int, *words: str) -> None:
    assert ran.exit_code == code, (ran.exit_code, ran.stderr)
    assert "Traceback" not in ran.stderr and len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    assert all(w in ran.stderr for w in words), ran.stderr


# ---------------------------------------------------------------- the original is never lost


def test_an_edit_after_a_killed_apply_keeps_the_original(project: Path, cli) -> None:
    """The issue's example: killed before the manifest, a comment added on top, apply again."""
    original = (project / ATTENTION).read_bytes()
    assert totopatch(project, "apply", TOTOPATCH_TEST_CRASH_AT="before-manifest").returncode == -signal.SIGKILL
    (project / ATTENTION).write_bytes(b"# my note\n" + (project / ATTENTION).read_bytes())
    ran = cli(project, "apply")
    assert ran.exit_code == 0 and "removed" not in ran.stdout, ran.stdout
    (kept,) = held_by_state(project, original)
    assert str(kept.relative_to(project)) in ran.stdout  # the run says where the unedited original is
    status = json.loads(cli(project, "status", "--json").stdout)
    # apply records a drifted file as it now stands, so the gate passes; revert keeps the user's edit
    assert {i["target"]: i["state"] for i in status["items"]}["attention"] == "applied"
    ran = cli(project, "revert")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert (project / ATTENTION).read_bytes() == b"# my note\n" + original
    assert held_by_state(project, original) == [kept]


def test_revert_force_after_a_killed_apply_and_an_edit_gives_the_original_back(project: Path, cli) -> None:
    original = (project / "backtest_test3_inline.py").read_bytes()
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="before-manifest")
    target = project / "backtest_test3_inline.py"
    target.write_bytes(target.read_bytes().replace(b'"reduce-overhead"', b'"default"', 1))  # inside the region
    ran = cli(project, "revert", "--force")
    assert ran.exit_code == 0 and "forced" in ran.stdout, ran.stdout + ran.stderr
    assert target.read_bytes() == original


def test_two_stacked_patches_killed_before_the_manifest_keep_the_original(project: Path, cli) -> None:
    """Both edits of one file in one run: the file holds the top one's result, so both happened."""
    original = (project / TRANSFORMER).read_bytes()
    both = ("spacewise-mask", "layer-region")
    assert totopatch(project, "apply", *both, TOTOPATCH_TEST_CRASH_AT="before-manifest").returncode == -signal.SIGKILL
    ran = cli(project, "apply", *both)
    assert ran.exit_code == 0 and "removed" not in ran.stdout, ran.stdout
    states = {i["patch"]: i["state"] for i in json.loads(cli(project, "status", *both, "--json").stdout)["items"]}
    assert states == {"spacewise-mask": "applied", "layer-region": "applied"}
    assert cli(project, "revert", *both).exit_code == 0
    assert (project / TRANSFORMER).read_bytes() == original


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_at_any_step_of_apply_then_an_edit_loses_nothing(project: Path, cli, point: str) -> None:
    target = project / "backtest_test3_inline.py"
    note = b"# a note on top\n"
    killed = totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT=point)
    assert killed.returncode in (0, -signal.SIGKILL) and "Traceback" not in killed.stderr
    written = target.read_bytes() != SAMPLE_BACKTEST
    target.write_bytes(note + target.read_bytes())
    again = cli(project, "apply", CM)
    assert again.exit_code == 0, again.stderr
    assert not written or held_by_state(project, SAMPLE_BACKTEST)  # the original of a file it wrote
    assert cli(project, "revert", CM).exit_code == 0
    assert target.read_bytes() == note + SAMPLE_BACKTEST
    assert not written or held_by_state(project, SAMPLE_BACKTEST)


# A run that records files without writing them (a drifted file re-recorded as it stands): the file's hash
# cannot tell how far it got, so its records must be taken whole or not at all, each with its backups.
RECORDING = {"stack": (TRANSFORMER, ("spacewise-mask", "layer-region"), ("spacewise-mask",)),
             "single": (Path("backtest_test3_inline.py"), (CM,), (CM,))}


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if not p.startswith("recover-")])
@pytest.mark.parametrize("case", RECORDING)
def test_a_re_record_killed_at_any_step_is_taken_whole_or_not_at_all(project: Path, cli, case: str,
                                                                      point: str) -> None:
    rel, applied, again = RECORDING[case]
    original = (project / rel).read_bytes()
    assert cli(project, "apply", *applied).exit_code == 0
    (project / rel).write_bytes(b"# edited by the user\n" + (project / rel).read_bytes())
    killed = totopatch(project, "apply", *again, TOTOPATCH_TEST_CRASH_AT=point)
    assert killed.returncode in (0, -signal.SIGKILL) and "Traceback" not in killed.stderr, killed.stderr
    status = cli(project, "status", *applied)
    assert status.exit_code == 0 and "Traceback" not in status.stderr, status.stderr  # trusted, whatever it got to
    ran = cli(project, "apply", *again)
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert cli(project, "status", "--check", *applied).exit_code == 0
    assert cli(project, "verify", *applied).exit_code == 0
    assert held_by_state(project, original)  # the original before the edit, kept aside
    assert cli(project, "revert", *applied).exit_code == 0
    assert (project / rel).read_bytes() == b"# edited by the user\n" + original


@pytest.mark.parametrize("point", ["after-write", "before-manifest", "after-manifest", "mid-cleanup"])
def test_a_kill_during_a_merging_revert_keeps_the_unedited_original(project: Path, cli, point: str) -> None:
    target = project / "backtest_test3_inline.py"
    assert cli(project, "apply", CM).exit_code == 0
    target.write_bytes(target.read_bytes() + b"# a note at the end\n")
    killed = totopatch(project, "revert", CM, TOTOPATCH_TEST_CRASH_AT=point)
    assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == SAMPLE_BACKTEST + b"# a note at the end\n" or held_by_state(project, SAMPLE_BACKTEST)
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 0, ran.stderr
    assert target.read_bytes() == SAMPLE_BACKTEST + b"# a note at the end\n"
    assert held_by_state(project, SAMPLE_BACKTEST)


@pytest.mark.parametrize("point", ["recover-after-manifest", "recover-mid-cleanup"])
def test_a_kill_during_recovery_is_recovered_again(project: Path, cli, point: str) -> None:
    target = project / "backtest_test3_inline.py"
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="after-backup")  # backup made, file not written
    target.write_bytes(b"# edited while the run was dead\n" + target.read_bytes())
    killed = totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT=point)
    assert killed.returncode == -signal.SIGKILL
    assert held_by_state(project, SAMPLE_BACKTEST) or (project / "backtest_test3_inline.py.backup").is_file()
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0, ran.stderr
    assert held_by_state(project, SAMPLE_BACKTEST)  # the file it was made from was edited: kept, never deleted
    assert cli(project, "revert", CM).exit_code == 0
    assert target.read_bytes() == b"# edited while the run was dead\n" + SAMPLE_BACKTEST


def test_revert_with_nothing_recorded_names_the_kept_originals(project: Path, cli) -> None:
    """Killed after the backup, the file then edited: nothing was patched, and the original is not lost."""
    target = project / "backtest_test3_inline.py"
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="after-backup")
    target.write_bytes(b"# my edit\n" + SAMPLE_BACKTEST)
    ran = cli(project, "revert")
    (kept,) = held_by_state(project, SAMPLE_BACKTEST)
    assert ran.exit_code == 0 and "nothing to revert" in ran.stdout, ran.stderr
    assert ran.stdout.count(str(kept.relative_to(project))) == 2, ran.stdout  # where it was kept, and a reminder
    assert target.read_bytes() == b"# my edit\n" + SAMPLE_BACKTEST


def test_a_journal_in_the_earlier_format_is_still_finished(project: Path, cli) -> None:
    """Journals written before ``from_sha256`` and ``discard`` existed are replayed the same way."""
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="before-manifest")
    journal = project / ".totopatch" / "journal.json"
    data = json.loads(journal.read_text())
    journal.write_text(json.dumps({"schema": 1, "items": [{k: v for k, v in i.items() if k != "from_sha256"}
                                                          for i in data["items"]]}))
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "finished recording" in ran.stdout, ran.stderr
    assert cli(project, "revert", CM).exit_code == 0
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_a_journal_adding_a_result_that_is_neither_written_nor_held_is_untrusted(project: Path, cli) -> None:
    """An add's result is its entry's after, or what the file held where the run records it without writing it."""
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="before-manifest")
    journal = project / ".totopatch" / "journal.json"
    data = json.loads(journal.read_text())
    data["items"][0]["result_sha256"] = "0" * 64
    journal.write_text(json.dumps(data))
    one_line_error(cli(project, "status"), 7, str(journal), "result is not its after_sha256")


def test_a_backup_is_deleted_only_when_the_file_holds_its_bytes(project: Path, cli) -> None:
    """An apply killed before writing left a backup equal to the file: that one may go, and the run says so."""
    totopatch(project, "apply", CM, TOTOPATCH_TEST_CRASH_AT="after-backup")
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "holds the same bytes" in ran.stdout, ran.stdout
    assert cli(project, "revert", CM).exit_code == 0
    assert not (project / "backtest_test3_inline.py.backup").exists()
    assert not (project / ".totopatch" / "backups").exists()


def test_a_journal_never_makes_a_non_backup_file_go(project: Path, cli) -> None:
    state = project / ".totopatch"
    state.mkdir()
    (project / "notes.backup.txt").write_bytes(SAMPLE_BACKTEST)
    journal = {"schema": 1, "items": [], "discard": [{"base": "root", "path": "backtest_test3_inline.py"},
                                                      {"base": "root", "path": "notes.backup.txt"}]}
    (state / "journal.json").write_text(json.dumps(journal))
    assert cli(project, "apply", CM).exit_code == 0
    assert (project / "notes.backup.txt").read_bytes() == SAMPLE_BACKTEST
    assert not (state / "journal.json").exists()


def test_a_listed_backup_that_no_other_file_holds_is_kept_aside(project: Path, cli) -> None:
    state = project / ".totopatch"
    state.mkdir()
    lone = b"print('the only copy')\n"
    (project / "old.py.backup").write_bytes(lone)
    (state / "journal.json").write_text(json.dumps({"schema": 1, "items": [],
                                                    "discard": [{"base": "root", "path": "old.py.backup"}]}))
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0, ran.stderr
    kept = state / "backups" / hashlib.sha256(lone).hexdigest()
    assert kept.read_bytes() == lone and str(kept.relative_to(project)) in ran.stdout


@pytest.mark.parametrize("edited", [None, "forecaster", "transformer"])
def test_a_full_revert_of_two_stacked_patches_keeps_only_true_originals(project: Path, cli,
                                                                        edited: str | None) -> None:
    """shared-prefill under cuda-graphs, spacewise-mask under layer-region: the upper patch's backup is the lower
    patch's output, made again from the original, so revert never keeps it nor calls it an original."""
    files = {"forecaster": Path("toto/toto/inference/forecaster.py"), "transformer": TRANSFORMER}
    originals = {name: (project / rel).read_bytes() for name, rel in files.items()}
    assert cli(project, "apply").exit_code == 0 and cli(project, "apply", "layer-region").exit_code == 0
    if edited:
        path = project / files[edited]
        path.write_bytes(path.read_bytes() + b"\n# the user's note\n")
    ran = cli(project, "revert")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    kept = sorted((project / ".totopatch" / "backups").glob("*")) if (project / ".totopatch" / "backups").is_dir() \
        else []
    if edited is None:
        assert kept == [] and "kept" not in ran.stdout, ran.stdout
    else:
        # the one original of the edited file, whose bytes no file holds now; the note names that file
        assert [p.read_bytes() for p in kept] == [originals[edited]], ran.stdout
        assert ran.stdout.count("kept the unpatched original of") == 1 and files[edited].name in ran.stdout
    for name, rel in files.items():
        if name != edited:
            assert (project / rel).read_bytes() == originals[name]


def test_an_upper_backup_whose_original_is_lost_is_kept_and_named_for_what_it_is(project: Path, cli) -> None:
    """Where the lower patch's original is gone too, the upper backup is the one copy left: kept, and its note
    says it is the lower patch's output, not an unpatched original."""
    assert cli(project, "apply", "spacewise-mask", "layer-region").exit_code == 0
    (project / (str(TRANSFORMER) + ".backup")).unlink()  # spacewise-mask's original, lost
    (project / TRANSFORMER).write_bytes((project / TRANSFORMER).read_bytes() + b"\n# the user's note\n")
    ran = cli(project, "revert", "layer-region")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert "unpatched original" not in ran.stdout
    assert "as spacewise-mask left it, which layer-region was applied to" in ran.stdout, ran.stdout
    (kept,) = (project / ".totopatch" / "backups").iterdir()
    assert b"# the user's note" not in kept.read_bytes() and str(kept.relative_to(project)) in ran.stdout


# ---------------------------------------------------------------- what the state folder accepts


def _applied_manifest(project: Path, cli) -> tuple[Path, dict]:
    assert cli(project, "apply", "spacewise-mask", "layer-region", CM).exit_code == 0
    path = project / ".totopatch" / "manifest.json"
    return path, json.loads(path.read_text())


def _contradictions(data: dict) -> dict[str, tuple[dict, str]]:
    entries = data["entries"]
    spacewise, layer, cm = (next(e for e in entries if e["patch"] == p) for p in ("spacewise-mask", "layer-region", CM))
    other = "0" * 64

    def with_entries(*changed: dict) -> dict:
        return {**data, "entries": list(changed)}

    return {
        "backup-not-original": (with_entries(spacewise, layer, {**cm, "backup_sha256": other}), "backup_sha256"),
        "one-patch-twice": (with_entries(spacewise, layer, cm, {**cm, "options": {}}), "recorded twice"),
        "stack-forks": (with_entries(spacewise, layer, {**layer, "patch": "sdpa-causal", "after_sha256": other},
                                     cm), "cannot fork"),
        "stack-loops": (with_entries({**spacewise, "before_sha256": layer["after_sha256"],
                                      "backup_sha256": layer["after_sha256"]}, layer, cm), "loops"),
        "number-option": (with_entries(spacewise, layer, {**cm, "options": {"compile_mode": 1.5}}), "bad options"),
    }


@pytest.mark.parametrize("case", ["backup-not-original", "one-patch-twice", "stack-forks", "stack-loops",
                                  "number-option"])
def test_a_manifest_whose_hashes_contradict_each_other_is_refused(project: Path, cli, case: str) -> None:
    path, data = _applied_manifest(project, cli)
    bad, words = _contradictions(data)[case]
    path.write_text(json.dumps(bad))
    for command in (("status",), ("revert",), ("apply",), ("revert", "--force")):
        one_line_error(cli(project, *command), 7, str(path), words)


def test_a_stale_record_and_a_new_patch_may_share_an_original(project: Path, cli) -> None:
    """Not a contradiction: spacewise-mask's record outlives a hand-restored file that layer-region then patches."""
    target = project / TRANSFORMER
    original = target.read_bytes()
    assert cli(project, "apply", "spacewise-mask").exit_code == 0
    target.write_bytes(original)
    assert cli(project, "apply", "layer-region").exit_code == 0
    ran = cli(project, "status", "spacewise-mask", "layer-region", "--json")
    assert ran.exit_code == 0, ran.stderr
    assert {i["patch"]: i["state"] for i in json.loads(ran.stdout)["items"]}["layer-region"] == "applied"


DEEP = 100_000


@pytest.mark.parametrize("content", [
    pytest.param(b"[" * DEEP + b"]" * DEEP, id="deep-list"),
    pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, id="deep-object"),
    pytest.param(b'{"schema": 1, "entries": [], "root": NaN}', id="nan"),
    pytest.param(b'{"schema": 1, "schema": 1, "entries": []}', id="duplicate-key"),
    pytest.param(b'{"schema": true, "entries": []}', id="schema-true"),
    pytest.param(b'{"schema": 1, "entries": [], "n": ' + b"9" * 5000 + b"}", id="huge-number"),
    pytest.param(b'\xff\xfe{\x00}\x00', id="not-utf8"),
    pytest.param(b'{"schema": 1, "entries": [], "root": "a\\u0000b"}', id="nul-in-path"),
])
@pytest.mark.parametrize("name", ["manifest.json", "journal.json"])
def test_a_state_file_totopatch_never_writes_is_one_line(project: Path, cli, name: str, content: bytes) -> None:
    state = project / ".totopatch"
    state.mkdir()
    (state / name).write_bytes(content)
    for command in (("status",), ("apply", CM)):
        one_line_error(cli(project, *command), 7, str(state / name))
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


@pytest.mark.parametrize("kind", ["huge", "fifo", "dev-zero"])
def test_a_manifest_that_is_huge_or_not_a_file_is_refused_before_reading(project: Path, cli, kind: str) -> None:
    state = project / ".totopatch"
    state.mkdir()
    path = state / "manifest.json"
    if kind == "huge":
        with open(path, "wb") as fh:
            fh.truncate(1 << 30)  # sparse: 1 GB that takes no disk
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    one_line_error(cli(project, "status"), 7, str(path))


def test_a_state_dir_through_a_file_is_a_usage_error(project: Path, cli, tmp_path: Path) -> None:
    blocker = tmp_path / "somefile"
    blocker.write_text("")
    for command in (("status",), ("apply", CM)):
        one_line_error(cli(project, "--state-dir", str(blocker / "sub"), *command), 2, str(blocker), "a file")
    assert not (project / ".totopatch").exists()


def test_an_installed_state_folder_through_a_file_is_a_usage_error(tmp_path: Path, cli, monkeypatch) -> None:
    blocker = tmp_path / "state-home"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker / "x"))
    one_line_error(cli(tmp_path, "--installed", "status"), 2, str(blocker), "a file")


@pytest.mark.parametrize("name,make", [("lock", "folder"), ("backups", "file"), ("saved", "file")])
def test_a_state_folder_part_of_the_wrong_kind_is_refused(project: Path, cli, name: str, make: str) -> None:
    state = project / ".totopatch"
    state.mkdir()
    (state / name).mkdir() if make == "folder" else (state / name).write_text("")
    one_line_error(cli(project, "apply", CM), 7, str(state / name))
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST
