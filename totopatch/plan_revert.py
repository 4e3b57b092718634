"""What revert (and forget) would write: the verified original back, or the patch merged out, or the record dropped."""
from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

from . import manifest as mf
from .fsio import sha256
from .outcome import Item, Report, State
from .patches import by_id
from .plan_apply import keep_aside
from .reading import diff, read
from .state import Context
from .undo import How, backup_path, expected_after, replaced, take_out
from .transaction import Change


def select(manifest: mf.Manifest, ids: set[str], include_unknown: bool) -> list[mf.Entry]:
    """The recorded entries of these patches, newest first (with those of patches this version does not know)."""
    return [e for e in reversed(manifest.entries) if e.patch in ids or (include_unknown and by_id(e.patch) is None)]


def plan(ctx: Context, report: Report, manifest: mf.Manifest, entries: list[mf.Entry], force: bool) -> list[Change]:
    pending: dict[Path, bytes | None] = {}
    changes: list[Change] = []
    for entry in sorted(entries, key=lambda e: -len(manifest.below(e))):  # stacked patches: the top one first
        if kept := [e.patch for e in manifest.above(entry) if e not in entries]:
            path = ctx.layout.resolve(entry.base, entry.file)
            report.items.append(replace(_item(ctx, entry, path), state=State.REFUSED, detail=(
                f"{', '.join(kept)} is applied on top of it in this file; revert {' and '.join(kept)} first, "
                "or both together")))
            continue
        item, change = _plan_one(ctx, manifest, entry, pending, force)
        report.items.append(item)
        if change is not None:
            changes.append(change)
            pending[change.path] = change.new if change.new is not None else change.old
    return _drop_unneeded_backups(ctx, manifest, entries, changes)


def plan_forget(ctx: Context, report: Report, entries: list[mf.Entry]) -> list[Change]:
    """Drop the records of files that are gone or were replaced; write nothing else."""
    changes = []
    for entry in entries:
        path = ctx.layout.resolve(entry.base, entry.file)
        data = read(path)
        current = None if data is None else sha256(data)
        why = "the file is gone" if current is None else replaced(ctx, entry, current)
        if why and current != entry.after_sha256:
            item, change = _forget(ctx, entry, path, data, why)
            report.items.append(item)
            changes.append(change)
    if not changes:
        report.notes.append("nothing to forget: every recorded file is still there and still the one patched")
    return changes


def _item(ctx: Context, entry: mf.Entry, path: Path) -> Item:
    return Item(entry.patch, ctx.layout.key_for(entry.base, entry.file), ctx.layout.display(path), "")


def _forget(ctx: Context, entry: mf.Entry, path: Path, data: bytes | None, why: str) -> tuple[Item, Change]:
    """Drop the record without writing the file; a backup this tool left beside it moves to the state folder."""
    first, remove = keep_aside(ctx, entry)
    kept = first[0][0] if first else backup_path(ctx, entry)
    where = f"original kept at {ctx.layout.display(kept)}" if first or kept.exists() else "no backup was left"
    detail = f"{why.removeprefix('target replaced: ')}; nothing restored, record dropped, {where}"
    journal = mf.JournalItem("remove", entry, None if data is None else sha256(data))
    return replace(_item(ctx, entry, path), state=State.FORGOTTEN, detail=detail), \
        Change(path, data, None, journal, first, remove)


def _plan_one(ctx: Context, manifest: mf.Manifest, entry: mf.Entry, pending: dict[Path, bytes | None],
              force: bool) -> tuple[Item, Change | None]:
    """Write what ``undo.take_out`` decides (the decision status reports), or with --force the original."""
    path = ctx.layout.resolve(entry.base, entry.file)
    item = _item(ctx, entry, path)
    data = pending[path] if path in pending else read(path)
    undo = take_out(ctx, manifest, entry, data)
    remove = mf.JournalItem("remove", entry, entry.before_sha256)
    if undo.how == How.FORGET:
        return _forget(ctx, entry, path, data, undo.detail)
    assert data is not None
    if undo.how == How.ORIGINAL:
        return replace(item, state=State.REVERTED, detail=f"{undo.detail}; dropped from the manifest"), \
            Change(path, data, data, remove)
    assert undo.before is not None
    before = undo.before
    if undo.how == How.RESTORE:
        return replace(item, state=State.REVERTED, diff=diff(path, data, before, item.file)), \
            Change(path, data, before, remove)
    if undo.how == How.MERGED:
        assert undo.result is not None
        journal = mf.JournalItem("remove", entry, sha256(undo.result))
        return replace(item, state=State.REVERTED, detail=f"merged: {undo.detail}",
                       diff=diff(path, data, undo.result, item.file)), Change(path, data, undo.result, journal)
    change_diff = diff(path, expected_after(ctx, entry, before) or before, data, item.file)
    unknown = "" if by_id(entry.patch) else f"recorded by patch {entry.patch}, which this totopatch does not know; "
    if not force:
        then = "" if undo.outdated else "; revert --force restores the original and saves your version aside"
        return replace(item, state=State.CONFLICT, detail=f"{unknown}{undo.detail}{then}", diff=change_diff), None
    current = sha256(data)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = ctx.layout.state_dir / "saved" / f"{Path(entry.file).name}.{stamp}.{current[:12]}"
    return replace(item, state=State.REVERTED, detail=f"forced: your version was saved to {ctx.layout.display(aside)}",
                   diff=change_diff), Change(path, data, before, remove, first=((aside, data),))


def _drop_unneeded_backups(ctx: Context, manifest: mf.Manifest, reverted: list[mf.Entry],
                           changes: list[Change]) -> list[Change]:
    """Delete the backups this tool created, once no remaining entry needs them."""
    remaining = [e for e in manifest.entries if e not in reverted]
    needed = {(e.backup_base, e.backup) for e in remaining}
    out = list(changes)
    for entry in reverted:
        if not entry.backup_created or (entry.backup_base, entry.backup) in needed:
            continue
        path = ctx.layout.resolve(entry.base, entry.file)
        backup = backup_path(ctx, entry)
        for index, change in enumerate(out):
            if change.path == path and change.new is not None and backup not in change.remove_after:
                out[index] = replace(change, remove_after=change.remove_after + (backup,))
                break
    return out
