"""scaler-constant and id-mask-check: the two fixes a CUDA graph capture of the prefill needs, exact in eager."""
from __future__ import annotations

import shutil
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import snapshot
from test_versions import package
from totopatch.patches import id_mask_check, scaler_constant
from totopatch.spec import Refusal

VERSIONS = ["0.1.3", "0.1.4", "0.2.0"]


def source(version: str, name: str) -> str:
    return (package(version) / "model" / f"{name}.py").read_text()


def load(text: str, name: str) -> types.ModuleType:
    """A module made from ``text`` (scaler.py and embedding.py import no sibling module)."""
    module = types.ModuleType(name)
    exec(compile(text, f"{name}.py", "exec"), module.__dict__)
    return module


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    assert len(before.splitlines()) == len(after.splitlines())
    return [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]


# ---------------------------------------------------------------- scaler-constant

CLAMP = '''\
def stats(causal_scale, min_allowed_scale, minimum_scale):
    return torch.clamp(
        causal_scale,
        min=torch.max({call}, min_allowed_scale),  # keep
    )
'''
UPSTREAM = "torch.tensor(minimum_scale, device={device})"
PATCHED = "torch.full((), minimum_scale, device={device})"


@pytest.mark.parametrize(("before", "after"), [
    pytest.param(CLAMP.format(call=UPSTREAM.format(device="causal_scale.device")),
                 CLAMP.format(call=PATCHED.format(device="causal_scale.device")), id="upstream"),
    pytest.param(CLAMP.format(call=UPSTREAM.format(device="x.device")),
                 CLAMP.format(call=PATCHED.format(device="x.device")), id="other-device-expression"),
    pytest.param(CLAMP.format(call=UPSTREAM.format(device="causal_scale.device")).replace("\n", "\r\n"),
                 CLAMP.format(call=PATCHED.format(device="causal_scale.device")).replace("\n", "\r\n"), id="crlf"),
])
def test_scaler_constant_fixes(before: str, after: str) -> None:
    assert scaler_constant.rewrite(before, {}).source == after


@pytest.mark.parametrize("text", [
    pytest.param(CLAMP.format(call=PATCHED.format(device="causal_scale.device")), id="already-applied"),
    pytest.param(CLAMP.format(call=PATCHED.format(device="d")) + "y = torch.tensor(other, device=d)\n"
                 "z = torch.tensor(minimum_scale)\n", id="other-calls-untouched"),
])
def test_scaler_constant_noop(text: str) -> None:
    assert scaler_constant.rewrite(text, {}).source == text


@pytest.mark.parametrize("text, found", [
    pytest.param("x = 1\n", 0, id="absent"),
    pytest.param(CLAMP.format(call=UPSTREAM.format(device="d")) * 2, 2, id="twice"),
    pytest.param(CLAMP.format(call=UPSTREAM.format(device="d")) + CLAMP.format(call=PATCHED.format(device="d")), 2,
                 id="one-of-each"),
])
def test_scaler_constant_refuses_unknown_shapes(text: str, found: int) -> None:
    with pytest.raises(Refusal, match=f"found {found}"):
        scaler_constant.rewrite(text, {})


def test_scaler_constant_refuses_a_syntax_error() -> None:
    with pytest.raises(Refusal, match="not valid Python"):
        scaler_constant.rewrite("def broken(:\n", {})


@pytest.mark.parametrize("version", VERSIONS)
def test_scaler_constant_changes_one_line_of_every_release(version: str) -> None:
    before = source(version, "scaler")
    after = scaler_constant.rewrite(before, {}).source
    ((old, new),) = changed_lines(before, after)
    assert old.replace("torch.tensor(minimum_scale", "torch.full((), minimum_scale") == new
    assert scaler_constant.rewrite(after, {}).source == after


@settings(max_examples=60, deadline=None)
@given(data=st.data(), default=st.sampled_from([torch.float32, torch.float64]))
def test_the_device_constant_is_the_host_constant(data: st.DataObject, default: torch.dtype) -> None:
    """``torch.full((), v)`` and ``torch.tensor(v)``: the same dtype and bits, for any float the default dtype holds.

    (A minimum scale beyond the default dtype's range, above 3.4e38 in float32, raises in ``torch.full``.)
    """
    top = torch.finfo(default).max
    value = data.draw(st.floats(min_value=-top, max_value=top) | st.sampled_from([0.1, 1e-3, -0.0, 5e-324]))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        old, new = torch.tensor(value), torch.full((), value)
    finally:
        torch.set_default_dtype(previous)
    assert old.dtype == new.dtype == default and old.shape == new.shape == ()
    bits = torch.int32 if default == torch.float32 else torch.int64
    assert torch.equal(old.reshape(1).view(bits), new.reshape(1).view(bits))


@pytest.mark.parametrize("stabilize", [True, False])
def test_patched_scaler_is_bit_identical(stabilize: bool) -> None:
    text = source("0.2.0", "scaler")
    upstream, patched = load(text, "scaler_a"), load(scaler_constant.rewrite(text, {}).source, "scaler_b")
    generator = torch.Generator().manual_seed(3)
    data = torch.randn(2, 3, 64, generator=generator).cumsum(-1) * 1e-3  # small values: the clamp decides
    padding = torch.rand(2, 3, 64, generator=generator) > 0.2
    for module in (upstream, patched):
        module.result = module.CausalPatchStdMeanScaler(patch_size=16, stabilize_with_global=stabilize)(
            data, padding_mask=padding, weights=torch.ones_like(data))
    assert all(torch.equal(a, b) for a, b in zip(upstream.result, patched.result))


@pytest.mark.parametrize("version", VERSIONS)
def test_scaler_constant_applies_and_reverts_exactly(tmp_path, cli, version: str) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    assert cli(root, "apply", "scaler-constant", "id-mask-check").exit_code == 0
    assert cli(root, "status", "scaler-constant", "id-mask-check", "--check").exit_code == 0
    assert cli(root, "verify", "scaler-constant", "id-mask-check").exit_code == 0
    assert cli(root, "revert", "scaler-constant", "id-mask-check").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


# ---------------------------------------------------------------- id-mask-check

EMBED = '''\
import torch


def patchify(ids, size):
    p = ids.unfold(-1, size, size)
    assert torch.eq(p.min(-1).values, p.max(-1).values).all(), "Patches cannot span multiple datasets"
    return p


class Embed(torch.nn.Module):
    def forward(self, x, id_mask):
        {name} = self._patchify(id_mask)
        assert {test}, "Patches cannot span multiple datasets"
        return x
'''
TEST = "torch.eq({n}.min(-1).values, {n}.max(-1).values).all()"
MULTILINE = "torch.eq(\n            {n}.min(-1).values, {n}.max(-1).values\n        ).all()"


def embed(name: str = "ids", test: str = TEST, guarded: bool = False) -> str:
    check = test.format(n=name)
    if guarded:
        check = f"({id_mask_check.guard(name)}) or {check}"
    return EMBED.format(name=name, test=check)


@pytest.mark.parametrize(("before", "after"), [
    pytest.param(embed(), embed(guarded=True), id="one-line"),
    pytest.param(embed(test=MULTILINE), embed(test=MULTILINE, guarded=True), id="upstream-layout"),
    pytest.param(embed("id_mask_patched"), embed("id_mask_patched", guarded=True), id="other-name"),
    pytest.param(embed().replace("\n", "\r\n"), embed(guarded=True).replace("\n", "\r\n"), id="crlf"),
])
def test_id_mask_check_fixes(before: str, after: str) -> None:
    assert id_mask_check.rewrite(before, {}).source == after


@pytest.mark.parametrize("text", [
    pytest.param(embed(guarded=True), id="already-applied"),
    pytest.param(embed(test=MULTILINE, guarded=True), id="already-applied-upstream-layout"),
])
def test_id_mask_check_noop(text: str) -> None:
    assert id_mask_check.rewrite(text, {}).source == text


@pytest.mark.parametrize("text, match", [
    pytest.param(embed().replace("def forward", "def other"), "found 0", id="not-in-forward"),
    pytest.param(embed().replace('"Patches cannot', '"Patch cannot'), "found 0", id="other-message"),
    pytest.param(embed(test="torch.eq({n}.min(-1).values, other.max(-1).values).all()"), "found 0",
                 id="two-tensors"),
    pytest.param(embed().replace("        return x", "        assert " + TEST.format(n="ids")
                                 + ', "Patches cannot span multiple datasets"\n        return x'), "found 2",
                 id="twice"),
    pytest.param("def broken(:\n", "not valid Python", id="syntax"),
])
def test_id_mask_check_refuses_unknown_shapes(text: str, match: str) -> None:
    with pytest.raises(Refusal, match=match):
        id_mask_check.rewrite(text, {})


@pytest.mark.parametrize("version", VERSIONS)
def test_id_mask_check_changes_one_line_of_every_release(version: str) -> None:
    before = source(version, "embedding")
    after = id_mask_check.rewrite(before, {}).source
    ((old, new),) = changed_lines(before, after)
    assert new == old.replace("assert torch.eq(", f"assert ({id_mask_check.guard('id_mask_patched')}) or torch.eq(")
    assert id_mask_check.rewrite(after, {}).source == after
    assert after.count(id_mask_check.guard("")) == 1  # patchify_id_mask keeps its check


def test_patched_embedding_checks_outside_a_capture_with_upstream_error() -> None:
    text = source("0.2.0", "embedding")
    upstream, patched = load(text, "embedding_a"), load(id_mask_check.rewrite(text, {}).source, "embedding_b")
    torch.manual_seed(0)
    layers = [module.PatchEmbedding(4, 4, 8) for module in (upstream, patched)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 3, 16)
    good = torch.zeros(2, 3, 16, dtype=torch.int)
    outputs = [layer(x, good) for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[1]))
    bad = good.clone()
    bad[..., 6:] = 1  # a patch of 4 steps holding two datasets
    errors = []
    for layer in layers:
        with pytest.raises(AssertionError) as exc:
            layer(x, bad)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] == "Patches cannot span multiple datasets"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_default_patch_applies_and_reverts_exactly(tmp_path, cli, version: str) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    assert cli(root, "apply").exit_code == 0
    assert cli(root, "verify").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}
