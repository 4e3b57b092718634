"""status, verify and revert decide from one classification: whatever status promises, revert does.

For any user edit of a line or its whitespace around each patch's changed lines: ``drifted`` exactly
where revert succeeds without --force, keeping the edit (the result re-patched gives the user's file back),
and ``conflict`` exactly where revert refuses and writes nothing.
"""
from __future__ import annotations

import difflib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import Phase, assume, given, note, settings, strategies as st
from hypothesis.control import currently_in_test_context

from conftest import SAMPLE_BACKTEST, installed_toto_package, project_file
from totopatch import engine, merge
from totopatch.merge import three_way
from totopatch.patches import PATCHES, beneath, by_id
from totopatch.state import open_context

MARK = "# user note"


@dataclass(frozen=True)
class Case:
    """A patch (or a stack of patches in one file) applied to a project; edits go next to ``top``'s changes."""

    patches: tuple[str, ...]
    file: str  # relative to the project root


# every registered patch, on its first target, over the patches it stacks on in that file
CASES = {ref.id: Case(tuple(p.id for p in beneath(ref)) + (ref.id,), project_file(ref.targets[0])) for ref in PATCHES}


def _project(root: Path) -> Path:
    shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
    return root


class Applied(dict):  # type: ignore[type-arg]
    """Per case: a project with its patches applied, the file as patched, and as it was before."""

    def __repr__(self) -> str:
        return f"Applied({sorted(self)})"


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Applied:
    out = Applied()
    for name, case in CASES.items():
        root = _project(tmp_path_factory.mktemp(name) / "project")
        before = (root / case.file).read_bytes()
        report = engine.apply(open_context(root), [by_id(p) for p in case.patches])
        assert report.code == 0, report.error
        out[name] = (root, (root / case.file).read_bytes(), before)
    return out


def _pieces(text: str) -> list[str]:
    """Lines with their endings (CRLF, lone CR, LF), as Python reads them."""
    return [x for x in re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", text) if x]


def changed_lines(before: str, after: str) -> list[int]:
    """The first and last line of each stretch of ``after`` the patch wrote (a deletion: the line after it)."""
    old, new = _pieces(before), _pieces(after)
    out: set[int] = set()
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag != "equal":
            out.update((j1, max(j1, j2 - 1)))
    return sorted(min(i, len(new) - 1) for i in out)


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")):]


def edit(lines: list[str], at: int, kind: str) -> list[str]:
    """One user edit of line ``at`` or the whitespace around it; the text stays valid where Python allows it."""
    out = list(lines)
    line = out[at]
    body, ending = line[: len(line) - len(_ending(line))], _ending(line) or "\n"
    indent = body[: len(body) - len(body.lstrip())]
    if kind == "trailing-comment":
        out[at] = f"{body}  {MARK}{ending}" if body.strip() else f"{indent}{MARK}{ending}"
    elif kind == "trailing-space":
        out[at] = f"{body}   {ending}"
    elif kind in ("crlf", "cr", "lf"):
        out[at] = body + {"crlf": "\r\n", "cr": "\r", "lf": "\n"}[kind]
    elif kind == "form-feed":
        out[at] = "\f" + line
    elif kind == "blank-after":
        out.insert(at + 1, ending)
    elif kind == "comment-after":
        out.insert(at + 1, f"{indent}{MARK}{ending}")
    elif kind == "blank-replaced":  # an edit of a blank line: a comment there, else the line's blank twin removed
        if body.strip():
            out.insert(at + 1, ending)
        else:
            out[at] = f"{MARK}{ending}"
    elif kind == "delete-blank":
        if not body.strip():
            del out[at]
        else:
            out[at] = body + ending + ending
    elif kind == "inside":  # the patch's own text changed: a conflict unless revert can prove otherwise
        out[at] = body.replace("(", "( ", 1) + ending if "(" in body else f"{body}x{ending}"
    return out


EDITS = ("trailing-comment", "trailing-space", "crlf", "cr", "lf", "form-feed", "blank-after", "comment-after",
         "blank-replaced", "delete-blank", "inside")


def _note(text: str) -> None:
    if currently_in_test_context():
        note(text)


def check_agreement(root: Path, case: Case, edited: bytes, verify: bool = True) -> dict[str, str]:
    """Write ``edited``; status's (and verify's) rows and revert's outcome must agree; return status's states."""
    path = root / case.file
    path.write_bytes(edited)
    ctx = open_context(root)
    refs = [by_id(p) for p in case.patches]
    shown = path.relative_to(root).as_posix()
    mine = [i for i in engine.status(ctx, refs).items if Path(i.file).as_posix().endswith(shown)]
    rows = {i.patch: i for i in mine}
    states = {p: rows[p].state for p in case.patches}
    _note(f"status: {states}")
    assert set(states.values()) <= {"applied", "drifted", "conflict", "replaced"}, rows
    if verify:
        proved = {i.patch: i.state for i in engine.verify(ctx, refs).items if Path(i.file).as_posix().endswith(shown)}
        assert all(proved[p] == s for p, s in states.items() if s != "applied"), (proved, states)
    report = engine.revert(ctx, refs)
    done = {i.patch: i for i in report.items if Path(i.file).as_posix().endswith(shown)}
    _note(f"revert: {[(i.patch, i.state, i.detail) for i in report.items]}, {report.error}")
    if "conflict" in states.values():
        assert report.code == 3 and path.read_bytes() == edited
        assert {p for p, s in states.items() if s == "conflict"} == {p for p, i in done.items() if i.state == "conflict"}
        return states
    assert report.code == 0, report.error
    for patch, state in states.items():
        assert done[patch].state == "reverted"
        assert ("merged" in done[patch].detail) == (state == "drifted"), (patch, state, done[patch])
    result = path.read_bytes()
    if "drifted" in states.values():  # the merged result, re-patched, gives the user's file back
        text, again = result.decode(), result.decode()
        for patch in case.patches:
            again = by_id(patch).load().rewrite(again, by_id(patch).options).source
        assert again == edited.decode()
        assert result != edited and text.count(MARK) == edited.decode().count(MARK)
    return states


@settings(max_examples=30, deadline=None, print_blob=True,
          phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no shrinking: each example runs the tool
@given(data=st.data())
def test_status_and_revert_agree_for_any_edit_around_a_patched_line(applied, data) -> None:
    """For any edit of a line or its whitespace around a changed line: drifted <=> revert merges and keeps it."""
    name = data.draw(st.sampled_from(sorted(CASES)), label="case")
    case = CASES[name]
    template, patched, before = applied[name]
    lines = _pieces(patched.decode())
    near = changed_lines(before.decode(), patched.decode())
    at = data.draw(st.sampled_from(near), label="changed line") + data.draw(st.integers(-2, 2), label="offset")
    at = max(0, min(at, len(lines) - 1))
    kinds = data.draw(st.lists(st.sampled_from(EDITS), min_size=1, max_size=2), label="edits")
    edited = lines
    for kind in kinds:
        edited = edit(edited, min(at, len(edited) - 1), kind)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        shutil.copytree(template, root, symlinks=True)
        check_agreement(root, case, "".join(edited).encode(), verify=False)  # verify's rows: the plain tests


# ---------------------------------------------------------------- the examples of issue 20, as plain tests


@pytest.mark.parametrize("name", ["sdpa-causal", "spacewise-mask", "compile-mode"])
@pytest.mark.parametrize("kind", ["trailing-comment", "blank-replaced", "comment-after", "crlf"])
def test_an_edit_on_or_beside_a_patched_line_is_drifted_and_revert_keeps_it(applied, tmp_path: Path, name: str,
                                                                              kind: str) -> None:
    template, patched, before = applied[name]
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    lines = _pieces(patched.decode())
    at = changed_lines(before.decode(), patched.decode())[0]
    edited = "".join(edit(lines, at, kind)).encode()
    states = check_agreement(root, CASES[name], edited)
    assert states == {name: "drifted"}
    assert (root / CASES[name].file).read_bytes() == _expected_revert(before, patched, edited)


def _expected_revert(before: bytes, patched: bytes, edited: bytes) -> bytes:
    merged = three_way(patched.decode(), edited.decode(), before.decode())
    assert merged is not None
    return merged.encode()


def test_an_edit_of_the_patched_text_is_a_conflict_for_status_and_revert(applied, tmp_path: Path, cli) -> None:
    template, patched, _ = applied["sdpa-causal"]
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    target = root / CASES["sdpa-causal"].file
    edited = patched.replace(b"True if (attention_mask", b"True if ( attention_mask", 1)
    assert edited != patched
    target.write_bytes(edited)
    assert "conflict" in cli(root, "status", "sdpa-causal").stdout
    ran = cli(root, "revert", "sdpa-causal")
    assert ran.exit_code == 3 and "conflict" in ran.stdout and target.read_bytes() == edited


def test_a_note_in_each_block_of_a_stack_is_a_conflict_for_both_at_once(project: Path, cli) -> None:
    """The stateful test's example: a note on a line of each block of the forecaster's stack.  status says
    conflict for both, at once (merging shared-prefill out through the block cuda-graphs left, by character,
    took minutes), and revert refuses and writes nothing."""
    assert cli(project, "apply").exit_code == 0
    path = project / project_file("forecaster")
    lines = path.read_text().splitlines(keepends=True)
    for patch in ("shared-prefill", "cuda-graphs"):
        begin = next(i for i, line in enumerate(lines) if line.startswith(f"# totopatch {patch}: begin"))
        at = next(i for i in range(begin + 1, len(lines)) if re.match(r"\s*\w+ = \w", lines[i]))
        lines[at] = lines[at].rstrip("\n") + "  " + MARK + "\n"
    path.write_text("".join(lines))
    edited = path.read_bytes()
    status = cli(project, "--json", "status", "shared-prefill", "cuda-graphs")
    assert {i["patch"]: i["state"] for i in json.loads(status.stdout)["items"]} == \
        {"shared-prefill": "conflict", "cuda-graphs": "conflict"}, status.stdout
    ran = cli(project, "revert", "shared-prefill", "cuda-graphs")
    assert ran.exit_code == 3 and "conflict" in ran.stdout and path.read_bytes() == edited, ran.stdout


def test_a_long_stretch_both_sides_changed_is_combined_by_line_only(monkeypatch) -> None:
    """By character, difflib's cost grows as the product of the sides' lengths: only a few lines are combined so."""
    longest: list[int] = []
    edits = merge._edits
    monkeypatch.setattr(merge, "_edits",
                        lambda base, other, left: longest.append(len(base)) or edits(base, other, left))
    block = "".join(f"    value_{i} = compute({i})\n" for i in range(200))
    assert len(block) > merge.CHARACTERS
    noted = block.replace("value_100 = compute(100)", "value_100 = compute(100)  " + MARK)
    assert three_way(block, noted, "") is None  # a note in a block the other side takes out
    assert longest and max(longest) <= len(merge.lines(noted))  # lines, never characters
    short = "".join(f"    value_{i} = compute({i})\n" for i in range(3))
    assert three_way(short, short.replace("(1)", "(1)  " + MARK), short.replace("compute", "fast")) == \
        short.replace("compute", "fast").replace("(1)", "(1)  " + MARK)  # a few lines: by character


def test_the_merge_keeps_every_byte_of_both_sides() -> None:
    """Pieces split on CRLF, lone CR and LF; form feeds and tabs are ordinary characters."""
    base = "a = 1\r\nx = f(a).u(1)\r\n\f\ty = 2\rz = 3\n"
    theirs = base.replace(".u(1)", "")
    ours = base.replace(".u(1)\r\n", ".u(1)  # mine\n").replace("z = 3", "z = 4")
    assert three_way(base, ours, theirs) == "a = 1\r\nx = f(a)  # mine\n\f\ty = 2\rz = 4\n"
    assert three_way(base, base.replace(".u(1)", ".u(2)"), theirs) is None  # both changed one text


LOADER_WITH_BLANK = '''\
import os


def load_toto_pipeline():
    compile_mode = os.getenv("TOTO_COMPILE_MODE") or "max-autotune"

    backend = os.getenv("TOTO_COMPILE_BACKEND") or "inductor"
    return compile_mode, backend
'''


@pytest.mark.parametrize(("blank", "expected"), [
    pytest.param("    # chosen on the H200\n", "# chosen on the H200", id="comment-on-it"),
    pytest.param("    \n", "\"max-autotune\"\n    \n    backend", id="whitespace-on-it"),
    pytest.param("", '"max-autotune"\n    backend', id="deleted"),
    pytest.param("\r\n", '"max-autotune"\n\r\n', id="crlf-on-it"),
])
def test_an_edit_of_the_blank_line_after_a_patched_line_is_drifted_and_revert_keeps_it(project: Path, cli,
                                                                                        blank: str, expected: str) -> None:
    script = project / "backtest_test3_inline.py"
    script.write_bytes(LOADER_WITH_BLANK.encode())
    assert cli(project, "apply", "compile-mode").exit_code == 0
    patched = script.read_bytes().decode()
    script.write_bytes(patched.replace('"reduce-overhead"\n\n', f'"reduce-overhead"\n{blank}', 1).encode())
    assert "drifted" in cli(project, "status", "compile-mode").stdout
    ran = cli(project, "revert", "compile-mode")
    assert ran.exit_code == 0 and "merged" in ran.stdout, ran.stdout + ran.stderr
    result = script.read_bytes().decode()
    assert result == LOADER_WITH_BLANK.replace('"max-autotune"\n\n', f'"max-autotune"\n{blank}', 1)
    assert expected in result


_LINE = st.text(st.sampled_from("ab =()#\t\f"), max_size=6)
_ENDING = st.sampled_from(["\n", "\r\n", "\r"])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.tuples(_LINE, _ENDING), min_size=4, max_size=14), data=st.data())
def test_the_merge_makes_both_sides_edits_when_they_are_on_different_lines(lines, data) -> None:
    """Edits of both sides on different lines, next to each other or not, both land, byte for byte."""
    base = [f"{a}{n}{e}" for n, (a, e) in enumerate(lines)]  # distinct lines: equal ones align either way
    mine_at = data.draw(st.integers(0, len(base) - 1), label="ours edits line")
    gap = data.draw(st.integers(1, 4), label="gap")
    theirs_at = mine_at + gap if mine_at + gap < len(base) else mine_at - gap
    assume(0 <= theirs_at < len(base))
    ours, theirs = list(base), list(base)
    ours[mine_at] = data.draw(st.sampled_from([base[mine_at] + "# u\n", "", base[mine_at].rstrip("\r\n") + "  # u\r\n"]))
    theirs[theirs_at] = data.draw(st.sampled_from(["", "patched()\n", base[theirs_at] * 2]))
    both = list(base)
    both[mine_at], both[theirs_at] = ours[mine_at], theirs[theirs_at]
    merged = three_way("".join(base), "".join(ours), "".join(theirs))
    assert merged == "".join(both)
