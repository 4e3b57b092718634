"""Every state that `apply` reports as done (exit 0) passes the gate: `status --check`, `verify` and the hook."""
from __future__ import annotations

import difflib
import io
import json
import keyword
import shutil
import tempfile
import tokenize
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings, strategies as st

from conftest import SAMPLE_BACKTEST, installed_toto_package, make_outdated, project_file, upstream_bytes
from totopatch import engine
from totopatch.patches import PATCHES, beneath, by_id
from totopatch.spec import NeedsBase
from totopatch.state import open_context

CM = "compile-mode"
FIXTURES = Path(__file__).parent / "fixtures" / "backtest"
ALREADY = ["one_line_already_reduce_overhead.py", "early_method.py", "early_module_level.py"]


@pytest.mark.parametrize("name", ALREADY)
def test_a_script_already_in_the_mode_is_recorded_as_found_and_passes_the_gate(project: Path, cli, name: str) -> None:
    """The users' one-line chains that already end in "reduce-overhead": apply says done, so the gate passes."""
    script = project / "backtest_test3_inline.py"
    script.write_bytes((FIXTURES / name).read_bytes())
    found = script.read_bytes()
    assert json.loads(cli(project, "status", CM, "--json").stdout)["items"][0]["state"] == "applied-unrecorded"
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "recorded as found" in ran.stdout, ran.stdout + ran.stderr
    assert script.read_bytes() == found
    assert cli(project, "status", CM, "--check").exit_code == 0
    assert cli(project, "verify", CM).exit_code == 0
    assert "recorded as found" in cli(project, "status", CM).stdout
    assert cli(project, "apply").exit_code == 0
    assert cli(project, "status", "--check").exit_code == 0  # the pre-commit hook's entry
    reverted = cli(project, "revert", CM)
    assert reverted.exit_code == 0 and "nothing to undo" in reverted.stdout, reverted.stdout
    assert script.read_bytes() == found and not (project / "backtest_test3_inline.py.backup").exists()


def test_a_patched_toto_file_with_no_record_and_no_backup_is_recorded_as_found(patched_toto: Path, cli) -> None:
    ran = cli(patched_toto, "apply", "kv-cache")
    assert ran.exit_code == 0 and "recorded as found" in ran.stdout
    assert cli(patched_toto, "status", "kv-cache", "--check").exit_code == 0
    assert cli(patched_toto, "verify", "kv-cache").exit_code == 0


def test_a_drifted_file_is_re_recorded_by_apply_and_revert_still_keeps_the_edits(project: Path, cli) -> None:
    """Edited after apply (outside, and a comment on a patched line): apply re-records it; revert's result is unchanged."""
    assert cli(project, "apply").exit_code == 0
    script = project / "backtest_test3_inline.py"
    text = script.read_text()
    edited = text.replace("'reduce-overhead'\n", "'reduce-overhead'  # tuned\n") + "\n\ndef added_later():\n    return 1\n"
    script.write_text(edited)
    status = cli(project, "status", "--check")
    assert status.exit_code == 1 and "drifted" in status.stdout
    preview = cli(project, "revert", CM, "--dry-run")
    assert preview.exit_code == 0 and "merged" in preview.stdout
    ran = cli(project, "apply")
    assert ran.exit_code == 0 and "re-recorded" in ran.stdout, ran.stdout + ran.stderr
    assert "the original before them is kept at" in ran.stdout
    assert script.read_text() == edited
    assert cli(project, "status", "--check").exit_code == 0
    assert cli(project, "verify").exit_code == 0
    backups = project / ".totopatch" / "backups"
    assert SAMPLE_BACKTEST in [p.read_bytes() for p in backups.iterdir()]  # the earlier original is kept
    assert cli(project, "revert", CM).exit_code == 0
    expected = SAMPLE_BACKTEST.decode().replace("'max-autotune'\n", "'max-autotune'  # tuned\n")
    assert script.read_text() == expected + "\n\ndef added_later():\n    return 1\n"


def test_a_drifted_stack_is_re_recorded_together(tmp_path: Path, cli) -> None:
    """spacewise-mask with layer-region on it, the file edited: both records move together, the gate passes."""
    root = tmp_path / "checkout"
    shutil.copytree(installed_toto_package(), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    original = (root / "toto" / "model" / "transformer.py").read_bytes()
    assert cli(root, "apply").exit_code == 0 and cli(root, "apply", "layer-region").exit_code == 0
    transformer = root / "toto" / "model" / "transformer.py"
    transformer.write_bytes(b"# edited by the user\n" + transformer.read_bytes())
    assert cli(root, "status", "--check").exit_code == 1
    ran = cli(root, "apply", "spacewise-mask")
    assert ran.exit_code == 0 and "layer-region" in ran.stdout, ran.stdout + ran.stderr
    assert cli(root, "status", "--check").exit_code == 0 and cli(root, "verify").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert transformer.read_bytes() == b"# edited by the user\n" + original


# ---------------------------------------------------------------- the kind, as a property


def _edited_written_line(below: str, patched: str, how: str) -> tuple[str, str]:
    """The last line the patch wrote (``patched`` against ``below``) that a line break token ends and that holds an
    operator, and the same line edited: a comment after it, a space after its first operator, or its last
    string (else its first name) changed."""
    lines = patched.splitlines(keepends=True)
    written = {j for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, below.splitlines(keepends=True), lines,
                                                                   autojunk=False).get_opcodes()
               if tag != "equal" for j in range(j1, j2)}
    tokens = list(tokenize.generate_tokens(io.StringIO(patched).readline))
    on = {i: [t for t in tokens if t.start[0] - 1 == i == t.end[0] - 1] for i in written}
    at = max(i for i in written if {tokenize.OP, tokenize.NL} <= {t.type for t in on[i]}
             or {tokenize.OP, tokenize.NEWLINE} <= {t.type for t in on[i]})
    line = lines[at]
    if how == "beside":
        body = line.rstrip("\r\n")
        return line, body + "  # mine" + line[len(body):]
    if how == "spacing":
        token = next(t for t in on[at] if t.type == tokenize.OP)
        return line, line[:token.end[1]] + " " + line[token.end[1]:]
    strings = [t for t in on[at] if t.type == tokenize.STRING]
    token = strings[-1] if strings else next(t for t in on[at] if t.type == tokenize.NAME
                                             and not keyword.iskeyword(t.string))
    cut = token.start[1] + (token.string.index(token.string[-1]) + 1 if strings else len(token.string))
    return line, line[:cut] + "x" + line[cut:]


def _perturb(root: Path, step: str, patch: str) -> None:
    """One thing a user, a crash or an install does to a project."""
    ref = by_id(patch)
    key = ref.targets[0]
    path = root / project_file(key)
    original = upstream_bytes(key)
    below = original.decode()
    for lower in beneath(ref):
        below = lower.load().rewrite(below, lower.options).source
    ctx = open_context(root)
    if step == "apply":
        engine.apply(ctx, [ref])
    elif step == "revert":
        engine.revert(ctx, [ref])
    elif step == "edit-outside":
        path.write_bytes(path.read_bytes() + b"\n\ndef added_later():\n    return 1\n")
    elif step.startswith("edit-"):  # beside, spacing, inside: of the patch's last line, where the file has it
        line, edited = _edited_written_line(below, ref.load().rewrite(below, ref.options).source, step[len("edit-"):])
        path.write_bytes(path.read_bytes().replace(line.encode(), edited.encode(), 1))
    elif step == "lose-manifest":
        (root / ".totopatch" / "manifest.json").unlink(missing_ok=True)
    elif step == "lose-backups":
        for backup in [*root.rglob("*.backup"), *(root / ".totopatch" / "backups").glob("*")]:
            backup.unlink()
    elif step == "change-backups":
        for backup in [*root.rglob("*.backup"), *(root / ".totopatch" / "backups").glob("*")]:
            backup.write_bytes(b"print('not the original')\n")
    elif step == "original-back":
        path.write_bytes(original)
    elif step == "pre-patched":  # patched by hand or by another tool, nothing recorded
        path.write_bytes(ref.load().rewrite(below, ref.options).source.encode())
    elif step == "outdated":  # as an earlier totopatch left it (after an upgrade of totopatch)
        make_outdated(root, key)


STEPS = ("apply", "revert", "edit-outside", "edit-beside", "edit-spacing", "edit-inside", "lose-manifest",
         "lose-backups", "change-backups", "original-back", "pre-patched", "outdated")


def _with_beneath(ids: list[str]) -> list[str]:
    """The patches and those they stack on, in the registry's order."""
    wanted = set(ids) | {lower.id for i in ids for lower in beneath(by_id(i))}
    return [p.id for p in PATCHES if p.id in wanted]


@settings(max_examples=30, deadline=None, print_blob=True, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_whatever_apply_reports_as_done_passes_the_gate(data: st.DataObject) -> None:
    """Any registered patches (with those they stack on), after any steps a user, a crash or an install takes."""
    chosen = data.draw(st.lists(st.sampled_from([p.id for p in PATCHES]), min_size=1, max_size=2, unique=True),
                       label="patches")
    patches = _with_beneath(chosen)
    steps = data.draw(st.lists(st.tuples(st.sampled_from(STEPS), st.sampled_from(patches)), min_size=1, max_size=4),
                      label="steps")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
        for step, patch in steps:
            _perturb(root, step, patch)
        refs = [by_id(p) for p in patches]
        applied = engine.apply(open_context(root), refs)
        done = [(i.patch, i.state, i.detail) for i in applied.items]
        if applied.code == 0:
            status = engine.status(open_context(root), refs, check=True)
            assert status.code == 0, (done, [(i.patch, i.state, i.detail) for i in status.items])
            verify = engine.verify(open_context(root), refs)
            assert verify.code == 0, (done, [(i.patch, i.state, i.detail) for i in verify.items])
        else:
            assert applied.code == 3 and any(i.state == "conflict" for i in applied.items), (done, applied.error)


def test_a_drifted_file_keeps_its_options_unless_reverted(project: Path, cli) -> None:
    assert cli(project, "apply", CM).exit_code == 0
    script = project / "backtest_test3_inline.py"
    script.write_bytes(script.read_bytes() + b"\n# edited\n")
    ran = cli(project, "apply", CM, "--compile-mode", "default")
    assert ran.exit_code == 3 and "revert it first" in ran.stdout
    assert cli(project, "status", CM, "--check").exit_code == 1  # still drifted: nothing was recorded


@pytest.mark.parametrize("damage", ["deleted", "changed"])
def test_an_applied_file_whose_backup_is_gone_is_recorded_again_so_verify_passes(project: Path, cli,
                                                                                 damage: str) -> None:
    """apply said `already-applied` while verify failed on the backup: the gate could never pass."""
    assert cli(project, "apply", CM).exit_code == 0
    backup = project / "backtest_test3_inline.py.backup"
    backup.unlink() if damage == "deleted" else backup.write_bytes(b"print('not the original')\n")
    assert cli(project, "verify", CM).exit_code == 1
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "recorded as found" in ran.stdout and "is left" in ran.stdout, ran.stdout
    assert cli(project, "verify", CM).exit_code == 0
    patched = (project / "backtest_test3_inline.py").read_bytes()
    ran = cli(project, "revert", CM)
    assert ran.exit_code == 0 and "nothing to undo" in ran.stdout
    assert (project / "backtest_test3_inline.py").read_bytes() == patched


def test_an_applied_file_whose_backup_is_gone_gets_it_back_from_a_kept_copy(project: Path, cli) -> None:
    assert cli(project, "apply", CM).exit_code == 0
    backup = project / "backtest_test3_inline.py.backup"
    (project / ".totopatch" / "backups").mkdir()
    backup.rename(project / ".totopatch" / "backups" / "a-copy")
    ran = cli(project, "apply", CM)
    assert ran.exit_code == 0 and "made again" in ran.stdout, ran.stdout
    assert backup.read_bytes() == SAMPLE_BACKTEST and cli(project, "verify", CM).exit_code == 0
    assert cli(project, "revert", CM).exit_code == 0
    assert (project / "backtest_test3_inline.py").read_bytes() == SAMPLE_BACKTEST


def test_a_stacked_patch_whose_backup_is_gone_is_recorded_as_found_under_the_other(tmp_path: Path, cli) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(installed_toto_package(), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    assert cli(root, "apply").exit_code == 0 and cli(root, "apply", "layer-region").exit_code == 0
    (root / "toto" / "model" / "transformer.py.backup").unlink()  # spacewise-mask's, the lower one
    assert cli(root, "verify").exit_code == 1
    ran = cli(root, "apply")
    assert ran.exit_code == 0 and "recorded as found" in ran.stdout, ran.stdout + ran.stderr
    assert cli(root, "verify").exit_code == 0
    ran = cli(root, "revert")
    assert ran.exit_code == 0 and "nothing to undo" in ran.stdout, ran.stdout + ran.stderr
    spacewise = by_id("spacewise-mask").load()
    original = (installed_toto_package() / "model" / "transformer.py").read_text()
    assert (root / "toto" / "model" / "transformer.py").read_text() == spacewise.rewrite(original, {}).source


def test_a_stale_records_backup_that_a_lower_patch_takes_as_its_original_is_not_removed(project: Path, cli) -> None:
    """Found by the property: layer-region applied alone, the file reinstalled, then spacewise-mask with it. Both
    originals are the same bytes in the same ``.backup`` file; dropping the stale record must not delete it."""
    transformer = project / project_file("transformer")
    original = transformer.read_bytes()
    assert cli(project, "apply", "layer-region").exit_code == 0
    transformer.write_bytes(original)  # reinstalled
    ran = cli(project, "apply", "spacewise-mask", "layer-region")
    assert ran.exit_code == 0 and "dropped the stale record" in ran.stdout, ran.stdout + ran.stderr
    assert cli(project, "verify", "spacewise-mask", "layer-region").exit_code == 0
    assert cli(project, "revert").exit_code == 0
    assert transformer.read_bytes() == original and not Path(f"{transformer}.backup").exists()


def _applies_alone(ref) -> bool:
    """Whether ``ref`` rewrites its upstream file with nothing beneath it (it raises NeedsBase where it cannot)."""
    try:
        ref.load().rewrite(upstream_bytes(ref.targets[0]).decode(), ref.options)
    except NeedsBase:
        return False
    return True


def _stacks_whose_upper_applies_alone() -> list[tuple[str, str]]:
    """(lower, upper): patches of one file where ``upper`` stacks on ``lower`` but applies without it."""
    return [(lower.id, ref.id) for ref in PATCHES for lower in beneath(ref)
            if lower.targets == ref.targets and _applies_alone(ref)]


@pytest.mark.parametrize("lower, upper", _stacks_whose_upper_applies_alone())
def test_a_record_made_in_the_run_that_writes_the_file_never_takes_that_writes_backup(project: Path, cli, lower: str,
                                                                                    upper: str) -> None:
    """The upper patch in the file with no record and no backup; one apply writes the lower patch under it (its
    backup beside the file) and records the upper as found: each record keeps a backup of its own."""
    path = project / project_file(by_id(upper).targets[0])
    assert cli(project, "apply", upper).exit_code == 0
    for backup in [*project.rglob("*.backup"), *(project / ".totopatch" / "backups").glob("*")]:
        backup.unlink()
    (project / ".totopatch" / "manifest.json").unlink()
    found = path.read_bytes()
    ran = cli(project, "apply", lower, upper, "--json")
    states = {i["patch"]: i["state"] for i in json.loads(ran.stdout)["items"]}
    assert ran.exit_code == 0 and states == {lower: "applied", upper: "recorded"}, ran.stdout
    manifest = json.loads((project / ".totopatch" / "manifest.json").read_text())
    places = [(e["backup_base"], e["backup"]) for e in manifest["entries"]]
    assert len(set(places)) == len(places), places  # one backup per record
    assert cli(project, "verify", lower, upper).exit_code == 0
    assert cli(project, "revert").exit_code == 0 and path.read_bytes() == found
