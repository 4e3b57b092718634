"""Bytes a patch does not mean to change survive it: every whitespace and line ending Python accepts.

The kind: for any valid whitespace or line ending (form feed, lone CR, CRLF, LF, tabs, mixed, trailing
whitespace, a missing final newline, BOM, encoding cookie) next to or inside what a patch splices, every
byte outside the change survives, or the patch refuses at the user's ``file:line``.  Each patch runs on
each source it targets (the three supported toto-ts releases, the sample backtest script, the fixtures)
with such variants put in around its splice and elsewhere; its output must be the patch's output on the
plain source with the same variants put in (``whitespace_variants``), and a second run must change
nothing.  The CLI tests add the revert path: apply, then revert gives the input byte for byte.
"""
from __future__ import annotations

import codecs
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SAMPLE_BACKTEST, installed_toto_package, snapshot
from totopatch.patches import PATCHES, by_id, layer_region, rope_cache, shared_prefill
from totopatch.textio import decode
from whitespace_variants import (BLANKS, ENDINGS, FILES, GAPS, PREFIXES, TRAILING, WHOLE, Case, Edit, build, cases,
                                 check, every_kind_at, usable, whole_file)

PATCH_IDS = [p.id for p in PATCHES]
STEPS = max(len(PREFIXES), len(TRAILING), len(ENDINGS), len(GAPS), len(BLANKS), len(WHOLE))
# examples per patch: about 8 s of one core each (a kv-cache or shared-prefill run parses a whole module)
EXAMPLES = {"kv-cache": 20, "shared-prefill": 8}


def _mixed(index: int) -> str:
    return ENDINGS[(index * 7 + 3) % len(ENDINGS)]


@pytest.mark.parametrize("patch_id", PATCH_IDS)
def test_every_variant_at_every_line_around_the_splice(patch_id: str) -> None:
    """Each value of each edit kind lands on each line around the splice, on every source, with a whole-file variant."""
    for case in cases(patch_id):
        for step in range(STEPS):
            plan = whole_file(case, WHOLE[step % len(WHOLE)], every_kind_at(case, case.near, step), _mixed)
            check(case, build(case, plan, WHOLE[step % len(WHOLE)]))


def _edits(case: Case, index: int) -> st.SearchStrategy[Edit]:
    gaps = case.gaps.get(index, ())
    return st.builds(
        Edit,
        prefix=st.sampled_from(("",) + PREFIXES),
        trailing=st.sampled_from(("",) + TRAILING),
        ending=st.sampled_from((None,) + ENDINGS) if case.lines[index].endswith(("\n", "\r")) else st.none(),
        gap=st.tuples(st.sampled_from(gaps), st.sampled_from(GAPS)) | st.none() if gaps else st.none(),
        before=st.lists(st.sampled_from(BLANKS), max_size=2).map(tuple),
    )


@pytest.mark.parametrize("patch_id", PATCH_IDS)
def test_random_variants_keep_every_byte_outside_the_change(patch_id: str) -> None:
    """Random edits, around the splice and anywhere, on a random source and whole-file variant."""

    @settings(max_examples=EXAMPLES.get(patch_id, 40), deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(st.sampled_from(cases(patch_id)), label="source")
        kind = data.draw(st.sampled_from(WHOLE), label="whole file")
        near = st.lists(st.sampled_from(case.near), max_size=6) if case.near else st.just([])  # (unchanged sources)
        lines = data.draw(near, label="near the splice")
        lines += data.draw(st.lists(st.integers(0, len(case.lines) - 1), max_size=4), label="anywhere")
        plan = usable(case, {index: data.draw(_edits(case, index)) for index in lines})
        choose = data.draw(st.lists(st.sampled_from(ENDINGS), min_size=1, max_size=5), label="mixed endings")
        check(case, build(case, whole_file(case, kind, plan, lambda i: choose[i % len(choose)]), kind))

    run()


# ---------------------------------------------------------------- the examples of issue 20, item 6, as found


def test_a_form_feed_far_from_the_kv_cache_survives_and_status_tells_the_truth(project: Path, cli) -> None:
    util = project / "toto" / "toto" / "model" / "util.py"
    text = util.read_text()
    marked = text.replace("        x_normed = x / torch", "\f        x_normed = x / torch", 1)
    assert marked != text and "class RMSNorm" in marked[:marked.index("\f")]
    util.write_text(marked)
    before = _bytes_and_modes(project)
    assert cli(project, "apply", "kv-cache").exit_code == 0
    patched = util.read_text()
    assert patched.count("\f") == 1 and patched.startswith(marked[:marked.index("class KVCache")])
    assert cli(project, "status", "kv-cache", "--check").exit_code == 0
    assert cli(project, "revert", "kv-cache").exit_code == 0
    assert _bytes_and_modes(project) == before


@pytest.mark.parametrize("after", ["        # a comment\n", "        unrelated = 1\n"], ids=["comment", "code"])
def test_a_lone_cr_after_the_mask_statement_keeps_the_next_line(project: Path, cli, after: str) -> None:
    target = project / "toto" / "toto" / "model" / "transformer.py"
    text = target.read_text()
    end = text.index("\n", text.index("(batch seq_len) 1 variate1 variate2"))
    marked = text[:end] + "\r" + after + text[end + 1:]
    target.write_bytes(marked.encode())
    before = _bytes_and_modes(project)
    ran = cli(project, "apply", "spacewise-mask")
    assert ran.exit_code == 0, ran.stderr
    patched = target.read_bytes().decode()
    assert patched.replace(").unsqueeze(1)", ")").replace(") variate1", ") 1 variate1") == marked
    assert cli(project, "verify", "spacewise-mask").exit_code == 0
    assert cli(project, "revert", "spacewise-mask").exit_code == 0
    assert _bytes_and_modes(project) == before


def test_a_cr_only_backtest_keeps_its_blank_lines(project: Path, cli) -> None:
    target = project / "backtest_test3_inline.py"
    data = SAMPLE_BACKTEST.replace(b"\n", b"\r")
    target.write_bytes(data)
    before = _bytes_and_modes(project)
    assert cli(project, "apply", "compile-mode").exit_code == 0
    patched = target.read_bytes()
    assert patched.count(b"\r") == data.count(b"\r") and b"\n" not in patched
    changed = [(a, b) for a, b in zip(data.split(b"\r"), patched.split(b"\r")) if a != b]
    assert len(changed) == 2 and all(a.replace(b"max-autotune", b"reduce-overhead") == b for a, b in changed)
    ran = cli(project, "verify", "compile-mode")
    assert ran.exit_code == 0 and "proven" in ran.stdout
    assert cli(project, "revert", "compile-mode").exit_code == 0
    assert _bytes_and_modes(project) == before


def test_a_lone_cr_ending_the_shared_prefill_block_stays_its_own_line_under_cuda_graphs() -> None:
    """Found by the sweep: the block's first blank line after a lone CR made one CRLF of the two."""
    from totopatch.patches import cuda_graphs, shared_prefill
    from totopatch.patches._cst import split_lines, template_text

    below = shared_prefill.rewrite((installed_toto_package() / FILES["forecaster"]).read_text(), {}).source
    end = below.index("\n", below.index(shared_prefill.END))
    marked = below[:end] + "\r" + below[end + 1:]
    new = cuda_graphs.rewrite(marked, {}).source
    added = 2 + len(split_lines(template_text("cuda_graphs_template.py.txt")))
    assert new.startswith(marked[:end + 1]) and new.endswith(marked[end + 1:])
    assert len(split_lines(new)) == len(split_lines(marked)) + added
    assert cuda_graphs.rewrite(new, {}).source == new


# ---------------------------------------------------------------- whole files through the CLI: apply, revert


def _whole_tree_variant(data: bytes, kind: str) -> bytes:
    text = data.decode()
    if kind == "cr-only":
        return text.replace("\n", "\r").encode()
    if kind == "crlf-bom-no-final-newline":
        return codecs.BOM_UTF8 + text.rstrip("\n").replace("\n", "\r\n").encode()
    newline = {"cookie": "\n", "cookie-crlf": "\r\n", "cookie-cr-only": "\r"}[kind]  # Python reads the cookie in each
    return ("# -*- coding: latin-1 -*-\n# caf\xe9\n" + text).replace("\n", newline).encode("latin-1")


@pytest.mark.parametrize("kind", ["cr-only", "crlf-bom-no-final-newline", "cookie", "cookie-crlf", "cookie-cr-only"])
def test_every_patch_on_a_whole_tree_variant_applies_and_reverts_exactly(tmp_path: Path, cli, kind: str) -> None:
    root = tmp_path / "project"
    shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    targets = [root / "toto" / "toto" / name for name in FILES.values()] + [root / "backtest_test3_inline.py"]
    (root / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
    for path in targets:
        path.write_bytes(_whole_tree_variant(path.read_bytes(), kind))
    before = _bytes_and_modes(root)
    ran = cli(root, "apply", *PATCH_IDS)
    assert ran.exit_code == 0, ran.stderr
    for path in targets:
        source = decode(path.read_bytes())
        assert path.read_bytes()[:3] == before[str(path.relative_to(root))][0][:3]
        assert ("\r" in source.text) == (kind != "cookie") and ("\r\n" in source.text) == ("crlf" in kind)
        assert codecs.lookup(source.encoding) == codecs.lookup("latin-1" if kind.startswith("cookie") else "utf-8")
    assert cli(root, "status", *PATCH_IDS, "--check").exit_code == 0
    assert cli(root, "verify", *PATCH_IDS).exit_code == 0
    assert cli(root, "revert", *PATCH_IDS).exit_code == 0
    assert _bytes_and_modes(root) == before


def _bytes_and_modes(root: Path) -> dict[str, tuple[bytes, int]]:
    return {name: found[:2] for name, found in snapshot(root).items()}


def test_a_line_libcst_cannot_give_back_is_refused_at_the_users_line() -> None:
    """The proof before any output: where LibCST's code differs from what it read, the refusal names that line."""
    import libcst as cst

    from totopatch.patches._cst import Exact
    from totopatch.spec import Refusal

    exact = Exact(("x = 1\n", "y\f= 2\n"), ("x = 1\n", "y = 2\n"), cst.parse_module("x = 1\ny  = 2\n"), first_line=40)
    with pytest.raises(Refusal) as refused:
        exact.restore("x = 3\ny  = 2\n")
    assert refused.value.at and refused.value.lines == (41,) and "y\\x0c= 2" in refused.value.reason


# ---------------------------------------------------------------- found by the random sweep: a block marker after a form feed

BLOCKS = {"cuda-graphs": shared_prefill, "rope-cache": rope_cache, "layer-region": layer_region}  # whose marker


@pytest.mark.parametrize("prefix", PREFIXES, ids=[repr(p) for p in PREFIXES])
@pytest.mark.parametrize("patch_id", BLOCKS)
def test_a_block_marker_after_a_form_feed_is_at_python_s_column_0(patch_id: str, prefix: str) -> None:
    """Whitespace ending in a form feed before a ``begin`` marker line: Python's tokenizer restarts the column
    there, so it is the same marker.  cuda-graphs finds shared-prefill's block under it (it used to refuse,
    naming only the end line), and a block patch's own block so written is left as it is, byte for byte."""
    patch, begin = by_id(patch_id).load(), BLOCKS[patch_id].BEGIN
    for case in cases(patch_id):
        text = "".join(case.out if BLOCKS[patch_id].PATCH.id == patch_id else case.lines)
        assert text.count(begin) == 1, case.name
        marked = text.replace(begin, prefix + begin, 1)
        out = patch.rewrite(marked, {})
        assert out.source == "".join(case.out).replace(begin, prefix + begin, 1) and not out.notes, case.name


@pytest.mark.parametrize("ending", ENDINGS, ids=["lf", "cr", "crlf"])
@pytest.mark.parametrize("above", ["", "#!/usr/bin/env python\n"], ids=["line-1", "line-2"])
def test_the_encoding_cookie_is_read_as_python_reads_it_at_any_line_ending(ending: str, above: str) -> None:
    """PEP 263: the cookie on line 1 or 2, whichever line ending splits them (a CR-only file's too)."""
    text = (above + "# vim: set fileencoding=latin-1 :\nname = 'caf\xe9'\n").replace("\n", ending)
    data = text.encode("latin-1")
    namespace: dict = {}
    exec(compile(data, "<cookie>", "exec"), namespace)  # Python's own reading of the bytes
    source = decode(data)
    assert codecs.lookup(source.encoding) == codecs.lookup("latin-1") and source.text == text
    assert namespace["name"] == "caf\xe9"
    assert source.encode(source.text) == data
