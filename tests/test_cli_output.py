"""What the CLI prints: under --json one JSON object on stdout for every exit code; errors are one line; no
doubled or contradictory prefixes.  Never a traceback."""
from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import prefork
import pytest
from click.testing import CliRunner
from hypothesis import event, given, settings, strategies as st

from conftest import SAMPLE_BACKTEST, installed_toto_package, snapshot
from totopatch import render, transaction
from totopatch.cli import main
from totopatch.fsio import Lock
from totopatch.patches import COMPILE_MODES, PATCHES

CM = "compile-mode"
ENVELOPE = {"schema", "command", "ok", "exit_code", "error"}
ERROR = "totopatch: error: "


def invoke(*args: str) -> tuple[int, str, str]:
    """The CLI in this process: exit code, stdout, stderr; anything but an exit is a failed test."""
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{args}: {type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.stdout, result.stderr


def check(args: tuple[str, ...], code: int, stdout: str, stderr: str) -> dict | None:
    """The invariants of any command line; the JSON object under --json."""
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) <= 1, stderr
    if code not in (0, 1):
        assert len(errors) == 1, f"{args}: exit {code} without an error line: {stderr!r}"
    for line in errors:
        assert render.severity(line[len(ERROR):])[0] is None, line  # no second severity word
    if "--json" not in args:
        return None
    data = json.loads(stdout)  # exactly one JSON value, and nothing else, on stdout
    assert isinstance(data, dict) and ENVELOPE <= set(data), data
    assert data["schema"] == 1 and data["exit_code"] == code and data["ok"] == (code == 0)
    assert errors == ([ERROR + data["error"]] if data["error"] is not None else []), (errors, data["error"])
    return data


def make_project(root: Path) -> Path:
    shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
    return root


# ---------------------------------------------------------------- the examples, in a real process


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([prefork.python("cli"), "-m", "totopatch", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.mark.parametrize("args, code, message", [
    pytest.param(("--root", "/nonexistent", "status", "--json"), 2, "--root is not a directory", id="missing-root"),
    pytest.param(("apply", "nosuch", "--json"), 2, "unknown patch nosuch", id="unknown-patch"),
    pytest.param(("verify", "--json"), 7, "manifest is corrupt", id="corrupt-manifest"),
])
def test_json_is_printed_for_errors_before_the_command_runs(project, cli, args, code, message) -> None:
    assert cli(project, "apply", CM).exit_code == 0
    (project / ".totopatch" / "manifest.json").write_text('{"schema": 1, "entries": [')
    proc = run(*args, cwd=project)
    data = check(args, proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == code and data is not None and message in data["error"]
    assert proc.stderr == f"{ERROR}{data['error']}\n"


# ---------------------------------------------------------------- every exit code under --json


def _fail_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transaction.atomic_write
    calls = []

    def write(path: Path, data: bytes, mode: int | None = None) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, mode)

    monkeypatch.setattr(transaction, "atomic_write", write)


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def fail(*args: object, **kwargs: object) -> None:
        raise exc
    return fail


@pytest.mark.parametrize("case, code", [
    ("status", 0), ("check", 1), ("usage", 2), ("conflict", 3), ("io", 4), ("read-only", 5), ("locked", 6),
    ("corrupt", 7), ("bug", 70), ("interrupt", 130),
])
@pytest.mark.parametrize("as_json", [True, False])
def test_every_exit_code_prints_one_json_object_or_one_error_line(project, monkeypatch, case, code, as_json) -> None:
    backtest = project / "backtest_test3_inline.py"
    command = ["status", CM] if case in ("status", "check", "bug", "interrupt") else ["apply", CM]
    if case == "check":
        command.append("--check")
    elif case == "usage":
        command.append("--compile-mode=turbo")
    elif case == "conflict":
        backtest.write_text("def broken(:\n")
    elif case == "io":
        _fail_the_write(monkeypatch)
    elif case == "read-only":
        backtest.chmod(0o444)
    elif case == "corrupt":
        (project / ".totopatch").mkdir()
        (project / ".totopatch" / "manifest.json").write_text("[[[")
    elif case == "bug":
        monkeypatch.setattr("totopatch.engine.status", _raise(RecursionError("maximum recursion depth exceeded")))
    elif case == "interrupt":
        monkeypatch.setattr("totopatch.engine.status", _raise(KeyboardInterrupt()))
    args = ("--root", str(project), *command, *(["--json"] if as_json else []))
    with Lock(project / ".totopatch" / "lock") if case == "locked" else contextlib.nullcontext():
        ran = invoke(*args)
    assert ran[0] == code, ran
    data = check(args, *ran)
    if data is not None:
        assert data["command"] == command[0]
    elif code not in (0, 1):
        assert ran[2].strip() and "\n" not in ran[2].strip()  # all of stderr is the one error line
    if case == "bug":
        assert "RecursionError" in ran[2] and "bug in totopatch" in ran[2]


def test_list_doctor_help_and_version_print_json_too(project) -> None:
    for args in (("list", "--json"), ("--root", str(project), "doctor", "--json"), ("status", "-h", "--json"),
                 ("--json", "--version")):
        code, stdout, stderr = invoke(*args)
        data = check(args, code, stdout, stderr)
        assert code == 0 and data is not None
    assert [p["id"] for p in json.loads(invoke("list", "--json")[1])["patches"]] == [p.id for p in PATCHES]


# ---------------------------------------------------------------- the property over command lines


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders a command line may name: missing, a file, no Toto tree, a corrupt manifest, pristine, applied."""
    base = tmp_path_factory.mktemp("roots")
    (base / "file").write_text("not a folder\n")
    (base / "empty").mkdir()
    corrupt = make_project(base / "corrupt")
    (corrupt / ".totopatch").mkdir()
    (corrupt / ".totopatch" / "manifest.json").write_text('{"schema": 1, "entries": [')
    applied = make_project(base / "applied")
    assert invoke("--root", str(applied), "apply")[0] == 0
    make_project(base / "pristine")
    (make_project(base / "syntax") / "backtest_test3_inline.py").write_text("def broken(:\n")
    return {name: base / name for name in ("missing", "file", "empty", "corrupt", "pristine", "applied", "syntax")}


# Each list weighs what it draws by repeating it: mostly command lines that run, some that cannot.
ROOTS = ["pristine", "applied", "syntax"] * 3 + ["missing", "file", "empty", "corrupt"]
HEADS = [[]] * 6 + [["--no-color"], ["--backtest", "nope.py"], ["--state-dir", "{file}"], ["--bogus"]]
COMMANDS = ["apply", "status", "verify", "revert", "forget"] * 3 + ["doctor", "list", "demo", "nosuch", ""]
IDS = [p.id for p in PATCHES] * 2 + ["nosuch", "", "-"]
OPTIONS = {  # per command: flags and options with values, valid (mostly) and not
    "apply": [["--dry-run"], ["--adopt-legacy"], ["--compile-mode", "turbo"], ["--bogus"]]
    + [["--compile-mode", m] for m in COMPILE_MODES],
    "status": [["--check"]] * 3 + [["--check=yes"], ["-x"]],
    "verify": [["--device", "cpu"], ["--backend", "eager"], ["--mode", "default"]] * 2
    + [["--device", "gpu"], ["--backend", "bogus"], ["--smoke=1"]],
    "revert": [["--dry-run"], ["--force"]] * 2 + [["--bogus"]],
    "forget": [["--dry-run"]] * 2 + [["--bogus"]],
    "doctor": [["--check"]],
    "list": [["--all"]],
    "demo": [["--keep", "--bogus"], ["--bogus"]],
}
WRITES = {"apply", "revert", "forget"}


@st.composite
def command_lines(draw: st.DrawFn, roots: dict[str, Path]) -> tuple[str, ...]:
    root = draw(st.sampled_from(ROOTS))
    head = ["--root", str(roots[root])] + [w.format(file=roots["file"]) for w in draw(st.sampled_from(HEADS))]
    command = draw(st.sampled_from(COMMANDS))
    options: list[str] = sum(draw(st.lists(st.sampled_from(OPTIONS.get(command, [[]])), max_size=2)), [])
    if command == "demo" and "--bogus" not in options:
        options.append("--bogus")  # a demo that runs takes minutes
    if command in WRITES and root in ("pristine", "applied", "syntax"):
        options.insert(0, "--dry-run")  # the folders serve every example
    ids = draw(st.lists(st.sampled_from(IDS), max_size=2)) if command not in ("doctor", "list", "demo") else []
    tail = (["--"] if ids and draw(st.booleans()) else []) + ids
    words = head + ([command] if command else []) + options + tail
    for _ in range(draw(st.integers(0, 2))):
        words.insert(draw(st.integers(0, len(words))), "--json")
    return tuple(words)


@settings(max_examples=60, deadline=None, print_blob=True)
@given(data=st.data())
def test_every_command_line_prints_one_json_object_under_json_and_one_error_line_otherwise(roots, data) -> None:
    args = data.draw(command_lines(roots))
    before = {name: snapshot(roots[name]) for name in ("pristine", "applied", "syntax")}
    with contextlib.chdir(roots["empty"]):
        code, stdout, stderr = invoke(*args)
    event(f"exit {code}{' --json' if '--json' in args else ''}")
    check(args, code, stdout, stderr)
    assert {name: snapshot(roots[name]) for name in before} == before  # dry runs and refusals write nothing


# ---------------------------------------------------------------- one prefix a line


def test_status_says_warning_once(project, cli, monkeypatch) -> None:
    assert cli(project, "apply", CM, "kv-cache").exit_code == 0
    monkeypatch.setattr("totopatch.status.installed_toto", lambda: installed_toto_package().parent)
    ran = cli(project, "status")
    assert "note: warning:" not in ran.stdout
    assert re.search(r"^warning: `import toto` resolves to ", ran.stdout, re.M), ran.stdout


PREFIXES = ["", "error: ", "Error:", "warning: ", "WARNING:", "note: ", "totopatch: error: ", "  note :", "\n"]


@settings(max_examples=200, deadline=None, print_blob=True)
@given(prefixes=st.lists(st.sampled_from(PREFIXES), max_size=3), text=st.text(max_size=40))
def test_every_note_and_error_line_has_one_prefix_and_one_line(prefixes, text) -> None:
    message = "".join(prefixes) + text
    error, note = render.error_line(message), render.note_line(message)
    assert error.startswith(ERROR) and render.severity(error[len(ERROR):])[0] is None, error
    level, rest = render.severity(note)
    assert level in render.SEVERITIES and render.severity(rest)[0] is None, note  # one severity word, first
    assert len(error.splitlines()) == len(note.splitlines()) == 1
