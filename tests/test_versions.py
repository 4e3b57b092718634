"""Every supported toto-ts release: the patches apply, re-apply is a no-op, revert is exact.

0.2.0 is the installed package; scripts/bootstrap installs 0.1.3 and 0.1.4 side by side
into .toto-versions/ (pip install --no-deps --target).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import installed_toto_package, snapshot
from totopatch.layout import TARGETS
from totopatch.patches import PATCHES, by_id

VERSIONS_DIR = Path(__file__).resolve().parent.parent / ".toto-versions"


def package(version: str) -> Path:
    if version == "0.2.0":
        return installed_toto_package()
    found = VERSIONS_DIR / version / "toto"
    assert found.is_dir(), f"toto-ts {version} missing: run scripts/bootstrap"
    return found


TOTO_PATCHES = [p.id for p in PATCHES if all(TARGETS[key].base == "toto" for key in p.targets)]  # no backtest here


@pytest.mark.parametrize("version", ["0.1.3", "0.1.4", "0.2.0"])
def test_every_release_patches_and_reverts(tmp_path, cli, version) -> None:
    """Every patch of the Toto tree, opt-in ones too: each changes its files, the gate passes, revert is exact."""
    root = tmp_path / "checkout"
    shutil.copytree(package(version), root / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    ran = cli(root, "apply", *TOTO_PATCHES)
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    patched = snapshot(root)
    for ref in map(by_id, TOTO_PATCHES):
        present = [TARGETS[k].path for k in ref.targets if TARGETS[k].path in before]
        assert present and all(patched[f][0] != before[f][0] for f in present), ref.id
    assert cli(root, "status", *TOTO_PATCHES, "--check").exit_code == 0
    assert cli(root, "verify", *TOTO_PATCHES).exit_code == 0
    again = cli(root, "apply", *TOTO_PATCHES)
    assert again.exit_code == 0
    assert {k: v[0] for k, v in snapshot(root).items()} == {k: v[0] for k, v in patched.items()}
    assert cli(root, "revert").exit_code == 0
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}
