"""layer-region: one marked block after the layer class, found by structure; stacks with spacewise-mask."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import installed_toto_package, run_script, snapshot
from test_versions import package
from totopatch.patches import layer_region, spacewise_mask
from totopatch.spec import Refusal

VERSIONS = ["0.1.3", "0.1.4", "0.2.0"]
FIXTURES = Path(__file__).parent / "fixtures" / "region"

# A module of our own with the shape of Toto's transformer.py: the layer class, then the stack.
BEFORE = '''import torch


class Layer(torch.nn.Module):  # a layer
    def forward(self, layer_idx, inputs, attention_mask=None, kv_cache=None):
        return inputs


class Stack(torch.nn.Module):
    def forward(self, inputs, id_mask, kv_cache=None):
        return inputs
'''


def transformer_source(version: str) -> str:
    return (package(version) / "model" / "transformer.py").read_text()


def without_block(source: str) -> str:
    start = source.index("\n\n\n" + layer_region.BEGIN)
    end = source.index(layer_region.END) + len(layer_region.END) + 1
    return source[:start] + "\n" + source[end:]


def test_before_after() -> None:
    after = layer_region.rewrite(BEFORE, {}).source
    head, tail = BEFORE.split("\n\n\nclass Stack")
    assert after.startswith(head + "\n\n\n" + layer_region.BEGIN)
    assert after.endswith("Layer = TransformerLayerCompiledOnce  # totopatch layer-region: end\n\n\nclass Stack" + tail)
    assert "class TransformerLayerCompiledOnce(Layer):" in after
    assert layer_region.rewrite(after, {}).source == after
    assert without_block(after) == BEFORE


def test_crlf_and_a_class_at_the_end_without_final_newline() -> None:
    crlf = BEFORE.replace("\n", "\r\n")
    after = layer_region.rewrite(crlf, {}).source
    assert after.count("\n") == after.count("\r\n") and without_block(after.replace("\r\n", "\n")) == BEFORE
    last = BEFORE.split("\n\n\nclass Stack")[0]  # the layer class ends the file, no final newline
    after = layer_region.rewrite(last, {}).source
    assert after.startswith(last + "\n\n\n" + layer_region.BEGIN)
    assert after.endswith("# totopatch layer-region: end")  # and still no final newline: that byte is the user's


@pytest.mark.parametrize("version", VERSIONS)
def test_every_release_gets_one_block_and_stacks_with_spacewise_mask(version) -> None:
    source = transformer_source(version)
    patched = layer_region.rewrite(source, {}).source
    assert without_block(patched) == source and layer_region.rewrite(patched, {}).source == patched
    assert "TransformerLayer = TransformerLayerCompiledOnce  # totopatch layer-region: end" in patched
    compile(patched, "transformer.py", "exec")
    both = layer_region.rewrite(spacewise_mask.rewrite(source, {}).source, {}).source
    assert spacewise_mask.rewrite(patched, {}).source == both  # either order, one result
    assert spacewise_mask.rewrite(both, {}).source == both


@pytest.mark.parametrize("mutate, reason", [
    pytest.param(lambda s: s.replace("layer_idx, inputs", "inputs, layer_idx"), "no transformer layer class",
                 id="other-forward"),
    pytest.param(lambda s: s + "\n\nclass Other(torch.nn.Module):\n"
                 "    def forward(self, layer_idx, inputs, attention_mask=None, kv_cache=None):\n        pass\n",
                 r"ambiguous: 2 transformer layer classes \(Layer, Other\)", id="two-layers"),
    pytest.param(lambda s: s.replace("import torch\n", "from torch import nn\n"), "does not import torch",
                 id="no-torch"),
    pytest.param(lambda s: s + "\nTransformerLayerCompiledOnce = None\n", "already uses the name", id="name-clash"),
    pytest.param(lambda s: s + "\ndef broken(:\n", "not valid Python", id="syntax"),
])
def test_refuses_unknown_shapes(mutate, reason) -> None:
    with pytest.raises(Refusal, match=reason):
        layer_region.rewrite(mutate(BEFORE), {})


def test_refuses_a_damaged_block_and_a_block_elsewhere() -> None:
    after = layer_region.rewrite(BEFORE, {}).source
    with pytest.raises(Refusal, match="damaged layer-region block") as exc:
        layer_region.rewrite(after.replace(layer_region.END, "# end"), {})
    assert exc.value.lines == (9,)  # the begin marker, whose end is gone
    head, block_and_tail = after.split("\n\n\n" + layer_region.BEGIN)
    block, tail = block_and_tail.split("\n\n\nclass Stack")
    moved = head + "\n\n\nclass Stack" + tail + "\n\n" + layer_region.BEGIN + block
    with pytest.raises(Refusal, match="not right after class Layer"):
        layer_region.rewrite(moved, {})


def test_a_name_clash_after_the_block_is_refused_at_its_own_line() -> None:
    after = layer_region.rewrite(BEFORE, {}).source + "_totopatch_mine = 1\n"
    with pytest.raises(Refusal, match="already uses the name") as exc:
        layer_region.rewrite(after, {})
    assert exc.value.lines == (after.count("\n"),)


def test_an_outdated_block_is_replaced_with_a_note() -> None:
    after = layer_region.rewrite(BEFORE, {}).source
    old = after.replace("an int that differs", "an index that differs")
    again = layer_region.rewrite(old, {})
    assert again.source == after and again.notes


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_stacks_it_on_spacewise_mask_and_reverts_exactly(tmp_path, cli, version) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    assert cli(root, "apply").exit_code == 0
    assert cli(root, "apply", "layer-region").exit_code == 0  # opt-in
    status = json.loads(cli(root, "status", "spacewise-mask", "layer-region", "--json").stdout)["items"]
    states = {i["patch"]: (i["state"], i["detail"]) for i in status if i["target"] == "transformer"}
    assert states == {"spacewise-mask": ("applied", "under layer-region"), "layer-region": ("applied", "")}
    assert cli(root, "verify", "spacewise-mask", "layer-region").exit_code == 0
    refused = cli(root, "revert", "spacewise-mask")
    assert refused.exit_code == 3 and "revert layer-region first" in refused.stderr
    assert cli(root, "revert", "layer-region").exit_code == 0
    assert cli(root, "status", "spacewise-mask", "--check").exit_code == 0
    assert cli(root, "status", "layer-region", "--check").exit_code == 1
    assert cli(root, "apply", "layer-region").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


def test_a_reinstalled_stacked_file_is_patched_again(tmp_path, cli) -> None:
    """The file both patches changed comes back unpatched (a reinstall): apply re-patches it, drops the stale records."""
    root = tmp_path / "checkout"
    shutil.copytree(installed_toto_package(), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    assert cli(root, "apply").exit_code == 0
    assert cli(root, "apply", "layer-region").exit_code == 0
    transformer = root / "toto" / "model" / "transformer.py"
    transformer.write_bytes((installed_toto_package() / "model" / "transformer.py").read_bytes())
    ran = cli(root, "apply", "spacewise-mask", "layer-region")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.count("dropped the stale record") == 2
    assert cli(root, "status", "spacewise-mask", "layer-region", "--check").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}


def regions(parent: Path, out: Path, *options: str) -> dict:
    return run_script(FIXTURES / "layer_regions.py", "--toto-parent", str(parent), "--out", str(out), *options)


@pytest.mark.slow
def test_compiles_each_kind_of_layer_once_with_outputs_equal_to_eager(tmp_path, cli) -> None:
    """The tiny model's 4 layers (2 space-wise, 2 time-wise) become 2 regions; with a KV cache, none."""
    root = tmp_path / "checkout"
    shutil.copytree(installed_toto_package(), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    assert cli(root, "apply", "kv-cache", "spacewise-mask", "layer-region", "shared-prefill").exit_code == 0
    # upstream with a cache: run eagerly only (its compile, with graph breaks and recompiles, is test_toto_tree's)
    upstream = regions(installed_toto_package().parent, tmp_path / "a.pt", "--eager-only-with-cache")
    patched = regions(root, tmp_path / "b.pt")
    assert (upstream["layer_class"], patched["layer_class"]) == ("TransformerLayer", "TransformerLayerCompiledOnce")
    assert upstream["no_cache"]["region_calls"] == 0 and upstream["cache"] is None
    assert patched["no_cache"]["region_calls"] == 4 and patched["no_cache"]["regions"] == 2
    assert patched["cache"]["region_calls"] == 0
    assert patched["no_cache"]["max_abs_diff"] == 0.0 and patched["cache"]["max_abs_diff"] == 0.0
    before, after = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert before.keys() == after.keys() == {"cache", "no_cache"}
    assert all(torch.equal(before[k], after[k]) for k in before)  # eager: bit-identical to upstream
