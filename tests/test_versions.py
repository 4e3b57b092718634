"""Every supported toto-ts release: the patches apply, re-apply is a no-op, revert is exact.

0.2.0 is the installed package; scripts/bootstrap installs 0.1.3 and 0.1.4 side by side
into .toto-versions/ (pip install --no-deps --target).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import installed_toto_package, snapshot

VERSIONS_DIR = Path(__file__).resolve().parent.parent / ".toto-versions"


def package(version: str) -> Path:
    if version == "0.2.0":
        return installed_toto_package()
    found = VERSIONS_DIR / version / "toto"
    assert found.is_dir(), f"toto-ts {version} missing: run scripts/bootstrap"
    return found


@pytest.mark.parametrize("version", ["0.1.3", "0.1.4", "0.2.0"])
def test_every_release_patches_and_reverts(tmp_path, cli, version) -> None:
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    ran = cli(root, "apply", "kv-cache", "sdpa-causal", "spacewise-mask")
    assert ran.exit_code == 0, ran.stderr
    assert "KVCacheCompileFriendly" in (root / "toto" / "model" / "util.py").read_text()
    assert "True if (attention_mask is None" in (root / "toto" / "model" / "attention.py").read_text()
    assert ").unsqueeze(1)" in (root / "toto" / "model" / "transformer.py").read_text()
    assert cli(root, "status", "kv-cache", "sdpa-causal", "spacewise-mask", "--check").exit_code == 0
    assert cli(root, "verify", "kv-cache", "sdpa-causal", "spacewise-mask").exit_code == 0
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}
