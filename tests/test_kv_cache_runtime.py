"""The patched cache at run time: the same results as the original (no breaks and no recompiles under compile:
the smoke tests of test_toto_tree.py, on the default patch set and on upstream's cache)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import prefork
import pytest
import torch

from conftest import installed_toto_package
from totopatch.patches import kv_cache

FIXTURES = Path(__file__).parent / "fixtures" / "kv"
sys.path.insert(0, str(FIXTURES))
import probe  # noqa: E402

FORKS = [pytest.param(name, id=name) for name in ("fork_tensor_item", "fork_list_graph_break", "fork_renamed_alias")]


def load(path: Path, source: str) -> ModuleType:
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original_and_patched(tmp_path: Path, name: str) -> tuple[ModuleType, ModuleType]:
    source = (FIXTURES / f"{name}.py").read_text()
    return load(tmp_path / f"{name}_a.py", source), load(tmp_path / f"{name}_b.py", kv_cache.rewrite(source, {}).source)


@pytest.mark.parametrize("name", FORKS)
def test_patched_fork_cache_behaves_like_the_original(tmp_path, name) -> None:
    from toto.model.attention import TimeWiseMultiheadAttention

    original, patched = original_and_patched(tmp_path, name)
    assert patched.KVCache.__name__ == "KVCacheCompileFriendly"
    assert patched.KVCache.reset._torchdynamo_disable and not hasattr(patched.KVCache.append, "_torchdynamo_disable")
    probe.assert_same(probe.exercise(original.KVCache, TimeWiseMultiheadAttention),
                      probe.exercise(patched.KVCache, TimeWiseMultiheadAttention))


def test_without_torch_compiler_the_patched_cache_is_undecorated_and_the_same(tmp_path, monkeypatch) -> None:
    from toto.model.attention import TimeWiseMultiheadAttention

    monkeypatch.delattr(torch, "compiler")
    original, patched = original_and_patched(tmp_path, "fork_tensor_item")
    assert not hasattr(patched.KVCache.reset, "_torchdynamo_disable")
    probe.assert_same(probe.exercise(original.KVCache, TimeWiseMultiheadAttention),
                      probe.exercise(patched.KVCache, TimeWiseMultiheadAttention))


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run fresh Python processes side by side (one per core) and wait for all of them."""
    procs = [subprocess.Popen([prefork.python(), *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    done = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_patched_util_cache_and_forecasts_equal_the_installed_toto(tmp_path, patched_toto) -> None:
    installed = installed_toto_package().parent
    runs = run_all([str(FIXTURES / "probe.py"), "--toto-parent", str(installed), "--out", str(tmp_path / "a.pt")],
                   [str(FIXTURES / "probe.py"), "--toto-parent", str(patched_toto), "--out", str(tmp_path / "b.pt")])
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    before, after = (torch.load(tmp_path / f, weights_only=False) for f in ("a.pt", "b.pt"))
    assert before[0] == ("class", "KVCache") and after[0] == ("class", "KVCacheCompileFriendly")
    assert sum("raised AssertionError" in str(value) for _, value in before) == 6  # overflows, both layouts
    probe.assert_same(before[1:], after[1:])


def smoke(parent: Path) -> list[str]:
    return ["-m", "totopatch.smoke", "--toto-parent", str(parent), "--device", "cpu", "--json"]


def test_smoke_refuses_a_toto_imported_from_elsewhere(tmp_path) -> None:
    (run,) = run_all(smoke(tmp_path))
    result = json.loads(run.stdout)
    assert run.returncode == 1 and result["ok"] is False
    assert "ImportError: toto was imported from" in result["error"] and str(tmp_path) in result["error"]
