"""The one write path of apply, revert and forget: plan, then lock, journal, atomic writes, manifest.

Nothing is locked or written for a run that is refused; a run that writes takes ``<state>/lock``,
finishes whatever an interrupted run left, re-plans if another run changed anything meanwhile,
and then writes everything or nothing.  The state folder's side (journal, backups, manifest, recovery)
is ``state_folder.StateFolder``'s; this module writes the targets and rolls them back.
"""
from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from . import manifest as mf
from .fsio import LockedError, atomic_write, clear_bytecode, crash_point, is_hardlinked, sha256
from .outcome import DRY_STATES, REFUSING_STATES, WRITING_STATES, Abort, Code, Report, State
from .reading import read
from .state import Context
from .state_folder import StateFolder


@dataclass(frozen=True)
class Change:
    """One file the command changes (or only its record), with the manifest operation it completes."""

    path: Path
    old: bytes | None  # None: the file is absent
    new: bytes | None  # None or equal to old: the file is not written
    journal: mf.JournalItem | None = None
    first: tuple[tuple[Path, bytes], ...] = ()  # written before the file: backups, the user's version
    remove_after: tuple[Path, ...] = ()  # backups nothing needs once recorded: cleared if held elsewhere, else kept

    @property
    def writes(self) -> bool:
        return self.new is not None and self.new != self.old


Plan = Callable[[mf.Manifest], list[Change]]  # appends its items to the report


def run(ctx: Context, report: Report, plan: Plan, *, dry_run: bool = False) -> Report:
    """Plan without the lock; refuse, show (dry run) or, under the lock, commit."""
    folder = StateFolder(ctx)
    try:
        if not dry_run:
            folder.probe()
        loaded = folder.load()
        start = len(report.notes)
        changes = plan(loaded.manifest)
        planned = report.notes[start:]
        if _refused(report):
            return report
        if dry_run:
            report.items = [replace(i, state=DRY_STATES.get(i.state, i.state)) for i in report.items]
            return report
        if not changes and not loaded.interrupted:
            return report
        preflight(ctx, changes)
        with folder.lock() as lock:
            crash_point("after-lock")
            if lock.stale_pid is not None:
                report.notes.append(f"recovered a stale lock left by pid {lock.stale_pid}")
            manifest = folder.recover(report)
            if loaded.interrupted or manifest != loaded.manifest or _changed_since_plan(changes):
                report.items.clear()  # recovery or another run changed things: plan again, under the lock
                del report.notes[start:start + len(planned)]
                changes = plan(manifest)
                if _refused(report):
                    return report
                preflight(ctx, changes)
            if changes:
                _commit(folder, report, changes, manifest)
    except LockedError as exc:
        _skip(report, Code.LOCKED, str(exc))
    except Abort as exc:
        _skip(report, exc.code, str(exc))
    return report


def _changed_since_plan(changes: list[Change]) -> bool:
    """Whether a file no longer holds what the plan read; a file two stacked patches change is read once."""
    first: dict[Path, bytes | None] = {}
    for change in changes:
        first.setdefault(change.path, change.old)
    return any(read(path) != old for path, old in first.items())


def _refused(report: Report) -> bool:
    refused = [i for i in report.items if i.state in REFUSING_STATES]
    if refused:
        reasons = dict.fromkeys(f"{i.file}: {i.detail}" for i in refused)  # two patches of one file, one reason once
        _skip(report, Code.REFUSED, "refused: " + "; ".join(reasons) + "; nothing was written")
    return bool(refused)


def _skip(report: Report, code: Code, error: str) -> None:
    """Fail the run; no item may claim a write that did not happen."""
    report.items = [replace(i, state=State.SKIPPED, detail="nothing written: the run failed")
                    if i.state in WRITING_STATES else i for i in report.items]
    report.fail(code, error)


# ---------------------------------------------------------------- checks before the lock


def preflight(ctx: Context, changes: list[Change]) -> None:
    """Refuse before locking or writing anything if a target, its folder or the state folder is read-only."""
    for change in changes:
        if not change.writes:
            continue
        real = Path(os.path.realpath(change.path))
        for probe, what in ((real, "target file is read-only"), (real.parent, "its folder is not writable")):
            if not can_write(probe):
                raise Abort(Code.PERMISSION, f"{change.path}: {what} (permission denied); nothing was changed; "
                            "patch a copy you own (--root), or run as a user who can write it")
    state = ctx.layout.state_dir
    if not can_write(state if state.exists() else state.parent):
        raise Abort(Code.PERMISSION, f"{state}: state folder is not writable (permission denied); "
                    "nothing was changed; keep the manifest and backups elsewhere with --state-dir DIR")
    if ctx.lock_path.is_file() and not can_write(ctx.lock_path):  # another user's, say: the lock opens it to write
        raise Abort(Code.PERMISSION, f"{ctx.lock_path}: the lock file is not writable (permission denied); "
                    "nothing was changed; remove it where no totopatch run holds it, or use --state-dir DIR")


def can_write(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return can_write(path.parent) if path.parent != path else False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(path, os.W_OK)


# ---------------------------------------------------------------- the all-or-nothing write


def _commit(folder: StateFolder, report: Report, changes: list[Change], manifest: mf.Manifest) -> None:
    """Journal, backups, files, manifest, rolling every file back on any failure; then clear what is unneeded."""
    ctx = folder.ctx
    items = [replace(c.journal, from_sha256=None if c.old is None else sha256(c.old))
             for c in changes if c.journal is not None]
    linked = [c.path for c in changes if c.writes and is_hardlinked(c.path)]
    earlier = manifest.entries
    undo: list[tuple[Path, bytes | None]] = []
    try:
        journal = folder.begin(items, dict.fromkeys(p for c in changes for p in c.remove_after))
        for change in changes:
            _write_change(folder, change, undo)
        for item in items:
            manifest = manifest.with_entry(item.entry) if item.op == "add" else manifest.without(item.entry)
        crash_point("before-manifest")
        folder.record(manifest)
    except BaseException as exc:
        _rollback(undo)
        folder.abort()
        if not isinstance(exc, Exception):
            raise
        raise Abort(*_io_failure(exc)) from None
    folder.finish(manifest, journal, report, earlier)
    for change in changes:
        if change.writes:
            clear_bytecode(change.path)
        if change.old is None:
            _prune_empty(change.path.parent, ctx.layout.toto_parent)
    for path in linked:
        report.notes.append(f"{ctx.layout.display(path)} was hard-linked: it now has its own copy, "
                            "and the other links keep the original bytes")


def _write_change(folder: StateFolder, change: Change, undo: list[tuple[Path, bytes | None]]) -> None:
    for path, data in change.first:
        undo.append((path, read(path)))
        folder.keep(path, data)
    crash_point("after-backup")
    if change.writes:
        assert change.new is not None
        undo.append((change.path, change.old))
        atomic_write(change.path, change.new)
    crash_point("after-write")


def _rollback(undo: list[tuple[Path, bytes | None]]) -> None:
    for path, old in reversed(undo):
        if old is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, old)


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove folders that a forgotten file's backup kept alive (an uninstalled package), up to ``stop``."""
    with contextlib.suppress(OSError, ValueError):
        folder.relative_to(stop)
        while folder != stop and not any(p.name != "__pycache__" for p in folder.iterdir()):
            for cache in folder.iterdir():
                for pyc in cache.iterdir():
                    pyc.unlink()
                cache.rmdir()
            folder.rmdir()
            folder = folder.parent


def _io_failure(exc: BaseException) -> tuple[Code, str]:
    """A failure part-way through writing is always the I/O code: by now everything is rolled back."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return Code.IO, f"{where}write failed ({exc.strerror or exc}); every file was rolled back"
    return Code.IO, f"write failed ({exc.__class__.__name__}: {exc}); every file was rolled back"
