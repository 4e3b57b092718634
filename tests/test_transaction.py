"""A multi-file apply is all-or-nothing, whatever fails in the middle of it."""
from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import snapshot
from totopatch import engine, transaction
from totopatch.layout import locate
from totopatch.spec import Patch, Rewrite

MARK = "# touched by a test patch\n"


def _touch(source: str, options: object) -> Rewrite:
    return Rewrite(source if source.endswith(MARK) else source + MARK)


@dataclass(frozen=True)
class ThreeFiles:
    """A stand-in registry entry: one patch over three files, duck-typed like PatchRef."""

    id: str = "touch"
    targets: tuple[str, ...] = ("util", "util_optimized", "backtest")
    default: bool = True
    options: dict = field(default_factory=dict)

    def load(self) -> Patch:
        return Patch(self.id, "append a marker", self.targets, _touch)


@pytest.fixture
def three(project: Path) -> engine.Context:
    model = project / "toto" / "toto" / "model"
    shutil.copy(model / "util.py", model / "util_optimized.py")
    return engine.Context(locate(project))


def failing_second_target_write(monkeypatch, ctx: engine.Context, failure: BaseException) -> None:
    targets = {ctx.layout.target(k).path for k in ThreeFiles().targets}
    real = transaction.atomic_write
    seen: list[Path] = []

    def write(path: Path, data: bytes, mode: int | None = None) -> None:
        if path in targets:
            seen.append(path)
            if len(seen) == 2:
                raise failure
        real(path, data, mode)

    monkeypatch.setattr(transaction, "atomic_write", write)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="ENOSPC"),
        pytest.param(PermissionError(errno.EACCES, "Permission denied"), id="EACCES"),
        pytest.param(RuntimeError("boom"), id="exception"),
    ],
)
def test_failure_in_second_of_three_writes_rolls_everything_back(project, three, monkeypatch, failure) -> None:
    before = snapshot(project)
    failing_second_target_write(monkeypatch, three, failure)
    report = engine.apply(three, [ThreeFiles()], {})
    assert report.code == engine.Code.IO and "rolled back" in (report.error or "")
    assert {k: v[:2] for k, v in snapshot(project).items()} == {k: v[:2] for k, v in before.items()}
    manifest = three.manifest_path
    assert not manifest.exists() or '"entries": []' in manifest.read_text()
    assert not three.journal_path.exists()


def test_three_files_apply_and_revert_together(project, three) -> None:
    before = snapshot(project)
    assert engine.apply(three, [ThreeFiles()], {}).code == engine.Code.OK
    assert all(three.layout.target(k).path.read_text().endswith(MARK) for k in ThreeFiles().targets)
    assert engine.revert(three, [ThreeFiles()]).code == engine.Code.OK
    assert {k: v[:2] for k, v in snapshot(project).items()} == {k: v[:2] for k, v in before.items()}


def test_a_refusal_in_one_file_writes_no_file(project, three) -> None:
    optimized = three.layout.target("util_optimized").path
    optimized.write_text("def broken(:\n")
    before = snapshot(project)
    report = engine.apply(three, [ThreeFiles()], {})
    assert report.code == engine.Code.REFUSED and "util_optimized.py" in (report.error or "")
    assert snapshot(project) == before
