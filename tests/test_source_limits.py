"""Sources no parser here can read: a one-line refusal naming the file and saying why, never a traceback.

Two kinds (issue 20, items 7 and 8): nesting too deep for Python's parser or for LibCST's tree walks
(huge sums, long ``elif`` chains, deep brackets, huge string concatenations), and syntax of a newer
Python than the one running totopatch, which must say so and what to do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_BACKTEST
from totopatch.patches import PATCHES

LOADER = "    global _TOTO_PIPELINE\n"  # a line inside the Toto loader, which compile-mode parses with LibCST
DEEP = {
    # name: (text, put inside the loader, what the refusal says)
    "sum-200000-terms": ("x = " + " + ".join(["1"] * 200_000) + "\n", False, "nested too deeply for Python"),
    "elif-5000": ("if x:\n    pass\n" + "elif x:\n    pass\n" * 5000, False, "nested too deeply for Python"),
    "concat-50000-strings": ("x = " + " + ".join(['"a"'] * 50_000) + "\n", False, "nested too deeply for Python"),
    "parentheses-1000-deep": ("x = " + "(" * 1000 + "1" + ")" * 1000 + "\n", False, "too many nested parentheses"),
    "sum-1500-terms-in-loader": ("    _x = " + " + ".join(["1"] * 1500) + "\n", True, "nested too deeply for LibCST"),
    "call-900-deep-in-loader": ("    _x = f" + "()" * 900 + "\n", True, "nested too deeply for LibCST"),
}


def _with(source: bytes, text: str, in_loader: bool) -> bytes:
    script = source.decode()
    if in_loader:
        assert LOADER in script
        return script.replace(LOADER, text + LOADER, 1).encode()
    return (script + "\n" + text).encode()


def _one_line_error(ran, name: str = "backtest_test3_inline.py") -> str:
    assert "Traceback" not in ran.stdout + ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], ran.stderr
    return lines[0]


@pytest.mark.parametrize("name", list(DEEP))
def test_every_deep_shape_is_refused_in_one_line(project: Path, cli, name: str) -> None:
    text, in_loader, reason = DEEP[name]
    script = project / "backtest_test3_inline.py"
    script.write_bytes(_with(SAMPLE_BACKTEST, text, in_loader))
    before = script.read_bytes()
    ran = cli(project, "apply", "compile-mode")
    assert ran.exit_code == 3 and reason in _one_line_error(ran)
    assert script.read_bytes() == before


@pytest.mark.parametrize("name", ["sum-200000-terms", "sum-1500-terms-in-loader"])
def test_a_deep_source_never_gives_a_traceback_in_any_command(project: Path, cli, name: str) -> None:
    text, in_loader, reason = DEEP[name]
    script = project / "backtest_test3_inline.py"
    script.write_bytes(_with(SAMPLE_BACKTEST, text, in_loader))
    before = script.read_bytes()
    ran = cli(project, "apply")
    assert ran.exit_code == 3 and reason in _one_line_error(ran)
    assert script.read_bytes() == before
    for args, code in ((("status",), 0), (("status", "--check"), 1), (("verify",), 1), (("revert",), 0),
                       (("status", "--json"), 0)):
        ran = cli(project, *args)
        assert ran.exit_code == code and "Traceback" not in ran.stdout + ran.stderr
        assert args == ("revert",) or reason in ran.stdout, (args, ran.stdout)
    ran = cli(project, "doctor")
    assert "Traceback" not in ran.stdout + ran.stderr


@pytest.mark.parametrize("ref", PATCHES, ids=[p.id for p in PATCHES])
def test_every_patch_turns_a_recursion_error_into_a_refusal(ref) -> None:
    assert getattr(ref.load().rewrite, "refuses_deep_trees", False)


def test_a_deep_edit_after_apply_is_a_conflict_for_status_and_revert(project: Path, cli) -> None:
    text, in_loader, reason = DEEP["sum-200000-terms"]
    assert cli(project, "apply", "compile-mode").exit_code == 0
    script = project / "backtest_test3_inline.py"
    script.write_bytes(_with(script.read_bytes(), text, in_loader))
    edited = script.read_bytes()
    ran = cli(project, "status", "compile-mode")
    assert "conflict" in ran.stdout and reason in ran.stdout and "Traceback" not in ran.stderr
    ran = cli(project, "verify", "compile-mode")
    assert ran.exit_code == 1 and "Traceback" not in ran.stdout + ran.stderr
    ran = cli(project, "revert", "compile-mode")
    assert ran.exit_code == 3 and "conflict" in ran.stdout and "Traceback" not in ran.stderr
    assert script.read_bytes() == edited


def test_an_edit_too_deep_for_libcst_after_apply_never_gives_a_traceback(project: Path, cli) -> None:
    """Python reads it, so the script runs; status needs no LibCST tree walk there, revert's proof does."""
    text, in_loader, _ = DEEP["sum-1500-terms-in-loader"]
    assert cli(project, "apply", "compile-mode").exit_code == 0
    script = project / "backtest_test3_inline.py"
    script.write_bytes(_with(script.read_bytes(), text, in_loader))
    for args in (("status", "compile-mode"), ("verify", "compile-mode"), ("revert", "compile-mode")):
        ran = cli(project, *args)
        assert ran.exit_code in (0, 1, 3) and "Traceback" not in ran.stdout + ran.stderr


NEWER = {  # name: (source, the first Python whose grammar reads it, the line Python stops at)
    "pep695-type-statement": ("type Vector = list[float]\n", (3, 12), 1),
    "pep695-generic-function": ("def first[T](items: list[T]) -> T:\n    return items[0]\n", (3, 12), 1),
    "pep695-generic-class": ("class Box[T]:\n    item: T\n", (3, 12), 1),
    "pep696-type-parameter-default": ("def first[T = int](items: list[T]) -> T:\n    return items[0]\n", (3, 13), 1),
    "pep701-nested-quotes": ("names = ['a']\nprint(f\"{', '.join(names)}\")\nprint(f\"{\"-\".join(names)}\")\n",
                             (3, 12), 3),
    "pep750-template-string": ("name = 'x'\ngreeting = t'hello {name}'\n", (3, 14), 2),
}


@pytest.mark.parametrize("name", list(NEWER))
def test_newer_syntax_names_the_running_pythons_grammar_and_what_to_do(project: Path, cli, name: str) -> None:
    text, version, at = NEWER[name]
    if sys.version_info[:2] >= version:
        pytest.skip(f"Python {sys.version_info[0]}.{sys.version_info[1]} reads this syntax")
    script = project / "backtest_test3_inline.py"
    script.write_text(SAMPLE_BACKTEST.decode() + text)
    line = SAMPLE_BACKTEST.decode().count("\n") + at
    ran = cli(project, "apply", "compile-mode")
    error = _one_line_error(ran)
    running = f"Python {sys.version_info[0]}.{sys.version_info[1]}'s grammar cannot parse"
    assert ran.exit_code == 3 and running in error and "candidates" not in error
    assert f"backtest_test3_inline.py:{line};" in error, error
    assert error.endswith(f"run totopatch with the Python {version[0]}.{version[1]}+ that runs this code; nothing was written")
    ran = cli(project, "status", "compile-mode")
    assert running in ran.stdout and "Traceback" not in ran.stderr


def test_a_syntax_error_names_its_line_not_candidates(project: Path, cli) -> None:
    script = project / "backtest_test3_inline.py"
    script.write_text(SAMPLE_BACKTEST.decode() + "\ndef broken(:\n")
    line = SAMPLE_BACKTEST.decode().count("\n") + 2
    error = _one_line_error(cli(project, "apply", "compile-mode"))
    assert f"not valid Python: invalid syntax at " in error and error.count(f"backtest_test3_inline.py:{line}") == 1
    assert "candidates" not in error
