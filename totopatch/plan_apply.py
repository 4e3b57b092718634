"""What apply would write: one ``Change`` per file, decided by ``status.classify``."""
from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

from . import __version__, manifest as mf
from .fsio import sha256
from .layout import Target, toto_version
from .merge import unified
from .outcome import REFUSING_STATES, Abort, Code, Item, Report, State
from .patches import by_id, code_sha256
from .reading import diff, read, text
from .spec import Patch, PatchRef, Refusal, Rewrite
from .state import Context
from .status import Finding, classify, effective_options, options_text, targets
from .textio import SourceError, check_syntax
from .transaction import Change
from .undo import How, backup_path, options as recorded_options, unstack, verified_backup
from .update import Rebuilt


def plan(ctx: Context, report: Report, manifest: mf.Manifest, refs: list[PatchRef], given: Mapping[str, str],
         adopt_legacy: bool) -> list[Change]:
    pending: dict[Path, bytes] = {}  # what each file will hold once earlier patches in this run are written
    changes: list[Change] = []
    updated: dict[tuple[str, str, str], str] = {}  # entries a stack's update rewrote -> the patch whose row did
    for ref in refs:
        for target in targets(ctx, ref):
            if (by := updated.get((ref.id, target.base, target.rel))) is not None:
                report.items.append(replace(_item(ctx, ref, target), state=State.UPDATED,
                                            detail=f"updated with {by}, in the same file"))
                continue
            item, planned = _plan_one(ctx, manifest, ref, target, pending, given, adopt_legacy)
            report.items.append(item)
            for change in planned:
                changes.append(change)
                if change.new is not None:
                    pending[target.path] = change.new
                if change.journal is not None and change.new == change.old:  # recorded as it stands:
                    manifest = manifest.with_entry(change.journal.entry)  # later patches of the run see it
                if item.state == State.UPDATED and change.journal is not None:
                    updated[change.journal.entry.key] = ref.id
    return _keep_used_backups(ctx, manifest, changes)


def _keep_used_backups(ctx: Context, manifest: mf.Manifest, changes: list[Change]) -> list[Change]:
    """Remove a backup only where no record left after the run points at it (one dropped as stale may be the very
    file another patch of the run took as its original); a record of the run that points at it takes it over."""
    journal = [c.journal for c in changes if c.journal is not None]
    touched = {i.entry.key for i in journal}
    after = [e for e in manifest.entries if e.key not in touched] + [i.entry for i in journal if i.op == "add"]
    used = {backup_path(ctx, e) for e in after} & {p for c in changes for p in c.remove_after}
    if not used:
        return changes
    out = []
    for change in changes:
        item = change.journal
        if item is not None and item.op == "add" and backup_path(ctx, item.entry) in used:
            change = replace(change, journal=replace(item, entry=replace(item.entry, backup_created=True)))
        out.append(replace(change, remove_after=tuple(p for p in change.remove_after if p not in used)))
    return out


def _plan_one(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target, pending: dict[Path, bytes],
              given: Mapping[str, str], adopt_legacy: bool) -> tuple[Item, list[Change]]:
    item = _item(ctx, ref, target)
    try:
        data = pending[target.path] if target.path in pending else read(target.path)
        entry = manifest.find(ref.id, target.base, target.rel)
        options = effective_options(ref, entry, given)
        found = classify(ctx, manifest, ref, target, options, data)
        if found.state != State.REPLACED and entry is not None and target.path in pending:
            # stacked on a patch planned in this run: the disk says whether the file was replaced since
            on_disk = classify(ctx, manifest, ref, target, options, read(target.path))
            found = on_disk if on_disk.state == State.REPLACED else found
        if found.state in (State.DRIFTED, State.OUTDATED) and entry is not None:
            if (recorded := effective_options(ref, entry)) != options:
                return replace(item, state=State.REFUSED, detail=f"applied with {options_text(recorded)}; "
                               "revert it first to apply other options"), []
            if found.state == State.OUTDATED:
                assert found.rebuilt is not None and found.data is not None
                return _update(ctx, target, item, found.rebuilt, found.data)
            return _rerecord(ctx, manifest, ref, target, found, pending)
        if found.state == State.APPLIED and entry is not None and found.data is not None \
                and effective_options(ref, entry) == options and (problem := _backup_problem(ctx, entry)):
            return _listed(*_rebacked(ctx, manifest, ref, target, item, entry, found.data, options, problem,
                                          pending))
        if found.state == State.APPLIED and found.rebuilt is not None and found.data is not None:
            item, _ = _act(ctx, ref, target, item, found, options, adopt_legacy, pending)  # as this totopatch
            done = item.state == State.ALREADY_APPLIED  # writes it, under another fingerprint: record this one
            return item, _fingerprinted(target, found.rebuilt, found.data) if done else []
        if found.state != State.REPLACED:
            return _listed(*_act(ctx, ref, target, item, found, options, adopt_legacy, pending))
        item, change = _act(ctx, ref, target, item, classify(ctx, manifest, ref, target, options, data,
                                                              ignore_entry=True), options, adopt_legacy, pending)
        return _listed(*_drop_stale(ctx, item, change, found))
    except Abort as exc:
        if exc.code != Code.REFUSED:
            raise
        return replace(item, state=State.REFUSED, detail=str(exc)), []


def _listed(item: Item, change: Change | None) -> tuple[Item, list[Change]]:
    return item, [change] if change is not None else []


def _item(ctx: Context, ref: PatchRef, target: Target) -> Item:
    return Item(ref.id, target.key, ctx.layout.display(target.path), "")


def _rerecord(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target, found: Finding,
              pending: dict[Path, bytes]) -> tuple[Item, list[Change]]:
    """Record a drifted file as it now stands, so the gate passes: each patch of its stack gets as original
    what revert gives back (the user's edits kept); the earlier originals are kept in ``<state>/backups/``."""
    item = _item(ctx, ref, target)
    assert found.entry is not None and found.data is not None
    data = found.data
    current = sha256(data)
    steps = unstack(ctx, manifest, found.entry, data)
    stuck = [(e, u) for e, _, u in steps if u.how not in (How.RESTORE, How.MERGED, How.ORIGINAL)]
    if stuck:
        entry, undo = stuck[0]
        return replace(item, state=State.CONFLICT, detail=f"edited since apply; {entry.patch} cannot be taken "
                       f"out ({undo.detail}); see `totopatch status`, or revert --force"), []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    changes, others = [], []
    for entry, holds, undo in steps:
        assert undo.result is not None
        if sha256(holds) == entry.after_sha256:
            continue  # still as recorded
        backup_base, backup_rel, create = _backup_place(ctx, target, undo.result, {**pending, target.path: data})
        rebased = replace(entry, before_sha256=sha256(undo.result), after_sha256=sha256(holds),
                          backup_base=backup_base, backup=backup_rel, backup_sha256=sha256(undo.result),
                          backup_created=create, totopatch_version=__version__, applied_at=stamp,
                          toto_version=toto_version(ctx.layout.toto_parent) if target.base == "toto" else None,
                          code_sha256=_fingerprint(entry.patch))  # merge_out proved this version's patch
        first, remove = keep_aside(ctx, entry)
        if create:
            first += ((ctx.layout.resolve(backup_base, backup_rel), undo.result),)
        changes.append(Change(target.path, data, data, mf.JournalItem("add", rebased, current), first, remove))
        if entry.patch != ref.id:
            others.append(entry.patch)
    stacked = f" (and {', '.join(others)} in the same file)" if others else ""
    bottom = steps[-1][0]
    kept = backup_path(ctx, bottom) if bottom.backup_base == "state" or not bottom.backup_created else \
        ctx.layout.state_dir / "backups" / bottom.backup_sha256
    return replace(item, state=State.RECORDED, detail=f"re-recorded as it now stands{stacked}: revert keeps your "
                   f"later edits; the original before them is kept at {ctx.layout.display(kept)}"), changes


def _act(ctx: Context, ref: PatchRef, target: Target, item: Item, found: Finding, options: dict[str, str],
         adopt_legacy: bool, pending: dict[Path, bytes]) -> tuple[Item, Change | None]:
    state, entry = found.state, found.entry
    if state == State.APPLIED:
        assert entry is not None
        recorded = effective_options(ref, entry)
        if recorded != options:
            return replace(item, state=State.REFUSED, detail=f"already applied with {options_text(recorded)}; "
                           "revert it first to apply other options"), None
        return replace(item, state=State.ALREADY_APPLIED), None
    if state == State.CONFLICT and entry is not None:
        return replace(item, state=State.CONFLICT, detail=found.detail if found.outdated else "recorded as applied, "
                       "but the patched region was edited since; see `totopatch status`, or revert --force"), None
    if state == State.LEGACY:
        patch = ref.load()
        if not adopt_legacy or patch.adopt_legacy is None:
            return replace(item, state=State.LEGACY, detail=f"{found.detail}; "
                           "rerun with --adopt-legacy to take it over"), None
        return _adopt(ctx, patch, target, item, found, options, pending)
    if state == State.APPLIED_UNRECORDED:
        assert found.data is not None
        return _plan_unrecorded(ctx, ref.load(), target, item, found.data, options, pending)
    if state == State.NOT_APPLIED and found.rewritten is None:  # needs a patch beneath it that is not applied
        return replace(item, state=State.CONFLICT, detail=found.detail), None
    if state == State.NOT_APPLIED:
        assert found.data is not None and found.rewritten is not None
        source, encode = text(target.path, found.data)
        _check_output(ref.load(), target, found.rewritten.source, options)
        new_text = found.rewritten.source
        change = _change(ctx, ref.id, target, found.data, encode(new_text), options, None, pending)
        return replace(item, state=State.APPLIED, detail="; ".join(found.rewritten.notes),
                       diff=unified(source, new_text, item.file)), change
    return replace(item, state=state, detail=found.detail), None


def _drop_stale(ctx: Context, item: Item, change: Change | None, stale: Finding) -> tuple[Item, Change | None]:
    """A target replaced since apply: its record goes, its backup is kept aside in the state folder."""
    entry = stale.entry
    assert entry is not None
    if item.state in REFUSING_STATES:
        return item, change
    note = f"{stale.detail.removeprefix('target replaced: ')}; dropped the stale record"
    if change is not None and change.journal is not None:
        new = change.journal.entry
        if (new.backup_base, new.backup) == (entry.backup_base, entry.backup):  # the same original, same place
            added = replace(new, backup_created=new.backup_created or entry.backup_created)
            change = replace(change, journal=replace(change.journal, entry=added))
            return replace(item, detail=_joined(note, item.detail)), change
    first, remove = keep_aside(ctx, entry)
    if first or read(backup_path(ctx, entry)) is not None:
        note += ", kept " + _keep_aside_note(ctx, entry)
    if change is None or change.journal is None:
        change = Change(ctx.layout.resolve(entry.base, entry.file), stale.data, None,
                        mf.JournalItem("remove", entry, sha256(stale.data) if stale.data is not None else None),
                        first, remove)
    else:
        change = replace(change, first=first + change.first, remove_after=remove + change.remove_after)
    return replace(item, detail=_joined(note, item.detail)), change


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def keep_aside(ctx: Context, entry: mf.Entry) -> tuple[tuple[tuple[Path, bytes], ...], tuple[Path, ...]]:
    """Move a backup this tool made beside a target into ``<state>/backups/``: writes first, removals after."""
    path = backup_path(ctx, entry)
    if entry.backup_base == "state" or not entry.backup_created:
        return (), ()
    data = read(path)
    if data is None or sha256(data) != entry.backup_sha256:
        return (), ()
    return ((ctx.layout.state_dir / "backups" / entry.backup_sha256, data),), (path,)


def _keep_aside_note(ctx: Context, entry: mf.Entry) -> str:
    if entry.backup_base == "state" or not entry.backup_created:
        return f"its backup at {ctx.layout.display(backup_path(ctx, entry))}"
    return f"its backup as {ctx.layout.display(ctx.layout.state_dir / 'backups' / entry.backup_sha256)}"


def _check_output(patch: Patch, target: Target, new: str, options: Mapping[str, str]) -> None:
    """A patch's output must parse and be a fixed point of the patch."""
    try:
        check_syntax(new, str(target.path))
    except SourceError as exc:
        raise Abort(Code.REFUSED, f"{target.path}: patch {patch.id} produced invalid output ({exc}); nothing written")
    if patch.rewrite(new, options).source != new:
        raise Abort(Code.REFUSED, f"{target.path}: patch {patch.id} is not stable on its own output; nothing written")


def _rewrite(patch: Patch, target: Target, source: str, options: Mapping[str, str]) -> Rewrite:
    result = patch.rewrite(source, options)
    if result.source != source:
        _check_output(patch, target, result.source, options)
    return result


def _adopt(ctx: Context, patch: Patch, target: Target, item: Item, found: Finding, options: dict[str, str],
           pending: dict[Path, bytes]) -> tuple[Item, Change | None]:
    assert found.data is not None
    legacy = found.data
    source, encode = text(target.path, legacy)
    original, original_text = _pre_legacy(patch, target, source, encode)
    try:
        result = _rewrite(patch, target, original_text, options)
    except Refusal as exc:
        return replace(item, state=State.CONFLICT, detail=exc.reason), None
    detail = "; ".join(("adopted the legacy script's file",) + result.notes)
    change = _change(ctx, patch.id, target, original, encode(result.source), options, legacy, pending)
    return replace(item, state=State.APPLIED, detail=detail,
                   diff=unified(original_text, result.source, item.file)), change


def _pre_legacy(patch: Patch, target: Target, source: str, encode: Callable[[str], bytes]) -> tuple[bytes, str]:
    """The file as it was before the legacy script: its .backup when consistent, else the legacy lines removed."""
    assert patch.adopt_legacy is not None
    try:
        cleaned = patch.adopt_legacy(source)
    except Refusal as exc:
        raise Abort(Code.REFUSED, f"{target.path}: cannot adopt the legacy edit ({exc.reason}); nothing written")
    sibling = Path(str(target.path) + ".backup")
    legacy_backup = read(sibling)
    if legacy_backup is not None:
        try:
            backup_text, _ = text(sibling, legacy_backup)
        except Abort:
            backup_text = None
        # The old script rewrote line endings; its .backup still has the original ones.
        if backup_text is not None and backup_text.replace("\r\n", "\n") == cleaned.replace("\r\n", "\n"):
            return legacy_backup, backup_text
    return encode(cleaned), cleaned


def _plan_unrecorded(ctx: Context, patch: Patch, target: Target, item: Item, data: bytes,
                     options: dict[str, str], pending: dict[Path, bytes]) -> tuple[Item, Change | None]:
    """The patch is in the file already: record it if a backup proves what the original was.

    ``pending``: what earlier patches of this run will write; where one writes this file, its backup may be
    the one beside it, so this record's backup goes into the state folder (``_backup_place``)."""
    source, _ = text(target.path, data)
    for backup in _backup_candidates(ctx, target):
        try:
            original = read(backup)
            if original is None:
                continue
            original_text, _ = text(backup, original)
            if original_text != source and patch.rewrite(original_text, options).source == source:
                change = replace(_change(ctx, patch.id, target, original, data, options, None, pending), old=data)
                return replace(item, state=State.RECORDED,
                               detail=f"already patched; recorded with {ctx.layout.display(backup)} as original"), change
        except (Refusal, Abort):
            continue
    change = _change(ctx, patch.id, target, data, data, options, None, pending)
    return replace(item, state=State.RECORDED, detail="already patched, and no backup holds an earlier original: "
                   "recorded as found (revert leaves this file as it is)"), change


def _backup_problem(ctx: Context, entry: mf.Entry) -> str:
    """Why revert could not restore this entry's original from its backup, or '' where it could."""
    try:
        verified_backup(ctx, entry)
    except Abort as exc:
        if exc.code != Code.STATE:
            raise
        return "is missing" if read(backup_path(ctx, entry)) is None else "no longer holds the original"
    return ""


def _rebacked(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target, item: Item, entry: mf.Entry,
              data: bytes, options: dict[str, str], problem: str,
              pending: dict[Path, bytes]) -> tuple[Item, Change | None]:
    """An applied file whose backup is gone or changed: verify would fail, so apply repairs the record.

    From a copy of the original found beside the file or in ``<state>/backups/``; where none is left, the
    patch is recorded as found (revert then leaves the file as this patch left it), and the detail says the
    original is lost.
    """
    recorded = backup_path(ctx, entry)
    shown = ctx.layout.display(recorded)
    for candidate in [ctx.layout.state_dir / "backups" / entry.before_sha256, *_backup_candidates(ctx, target)]:
        try:
            original = read(candidate)
        except Abort:
            continue
        if original is None or candidate == recorded or sha256(original) != entry.before_sha256:
            continue
        found = ctx.layout.display(candidate)
        if read(recorded) is None:  # made again where the manifest expects it
            return replace(item, state=State.RECORDED, detail=f"its backup {shown} {problem}; made again from "
                           f"{found}, which holds the original"), Change(target.path, data, data, None,
                                                                          ((recorded, original),))
        base, rel = ("state", candidate.relative_to(ctx.layout.state_dir).as_posix()) \
            if candidate.is_relative_to(ctx.layout.state_dir) else (target.base, target.rel + ".backup")
        moved = replace(entry, backup_base=base, backup=rel, backup_sha256=entry.before_sha256, backup_created=False)
        return replace(item, state=State.RECORDED, detail=f"its backup {shown} {problem}; recorded {found}, "
                       "which holds the original"), Change(target.path, data, data,
                                                          mf.JournalItem("add", moved, sha256(data)))
    try:  # what this patch left in the file: the file itself, or under patches stacked on it, their original
        holds = data if sha256(data) == entry.after_sha256 else verified_backup(ctx, manifest.above(entry)[0])
    except Abort as exc:
        if exc.code != Code.STATE:
            raise
        return replace(item, state=State.REFUSED, detail=f"its backup {shown} {problem}, and so does the one of the "
                       f"patch stacked on it ({exc}); revert --force of both restores what can be"), None
    change = _change(ctx, ref.id, target, holds, holds, options, None, pending)
    assert change.journal is not None
    found_entry = replace(change.journal.entry, code_sha256=entry.code_sha256)  # what wrote it is unchanged
    change = replace(change, old=data, new=data, journal=replace(change.journal, entry=found_entry,
                                                                 result_sha256=sha256(data)))
    return replace(item, state=State.RECORDED, detail=f"its backup {shown} {problem}, and no copy of the original "
                   f"(sha256 {entry.before_sha256[:12]}) is left: recorded as found, so revert leaves this file "
                   "as it is"), change


def _backup_candidates(ctx: Context, target: Target) -> list[Path]:
    found = [Path(str(target.path) + ".backup")]
    folder = ctx.layout.state_dir / "backups"
    if folder.is_dir():
        found += sorted(folder.iterdir())
    return found


def _change(ctx: Context, patch_id: str, target: Target, before: bytes, after: bytes, options: dict[str, str],
            legacy: bytes | None, pending: dict[Path, bytes]) -> Change:
    """The write of ``after`` over the file, its backup, and the manifest entry it completes."""
    backup_base, backup_rel, create = _backup_place(ctx, target, before, pending)
    legacy_rel = f"backups/{sha256(legacy)}" if legacy is not None else None
    entry = mf.Entry(
        patch=patch_id, base=target.base, file=target.rel,
        before_sha256=sha256(before), after_sha256=sha256(after),
        backup_base=backup_base, backup=backup_rel, backup_sha256=sha256(before), backup_created=create,
        options=options, totopatch_version=__version__,
        toto_version=toto_version(ctx.layout.toto_parent) if target.base == "toto" else None,
        applied_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        legacy_sha256=sha256(legacy) if legacy is not None else None, legacy_backup=legacy_rel,
        code_sha256=_fingerprint(patch_id),
    )
    first: list[tuple[Path, bytes]] = []
    if legacy is not None and legacy_rel:
        first.append((ctx.layout.state_dir / legacy_rel, legacy))
    if create:
        first.append((ctx.layout.resolve(backup_base, backup_rel), before))
    old = legacy if legacy is not None else before
    return Change(target.path, old, after, mf.JournalItem("add", entry, entry.after_sha256), tuple(first))


def _backup_place(ctx: Context, target: Target, before: bytes, pending: dict[Path, bytes]) -> tuple[str, str, bool]:
    """Where the original goes: ``<file>.backup`` unless that holds something else, then content-addressed."""
    sibling = Path(str(target.path) + ".backup")
    if not ctx.backups_in_state and target.path not in pending:
        existing = read(sibling)
        if existing is None:
            return target.base, target.rel + ".backup", True
        if existing == before:
            return target.base, target.rel + ".backup", False
    rel = f"backups/{sha256(before)}"
    return "state", rel, read(ctx.layout.state_dir / rel) != before


def _fingerprint(patch_id: str) -> str | None:
    ref = by_id(patch_id)
    return code_sha256(ref) if ref is not None else None


def _update(ctx: Context, target: Target, item: Item, rebuilt: Rebuilt, data: bytes) -> tuple[Item, list[Change]]:
    """Write an outdated file as this totopatch writes it: every recorded patch of its stack applied again, in
    order, to the verified original, with the recorded options.

    The bottom entry keeps its original and backup; an entry above it is now applied to the new output beneath
    it, which becomes its backup (in ``<state>/backups/``), and its old backup, what an earlier version wrote,
    is cleared (``StateFolder`` deletes it: a recorded patch's output on a kept original).
    """
    if rebuilt.problem:
        return replace(item, state=State.CONFLICT, detail=rebuilt.detail(rebuilt.chain[-1])), []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new_entries, keep, drop = [], [], []
    for index, (entry, before, after) in enumerate(zip(rebuilt.chain, rebuilt.inputs, rebuilt.outputs)):
        ref = by_id(entry.patch)
        assert ref is not None
        _check_output(ref.load(), target, text(target.path, after)[0], recorded_options(entry))
        fields: dict[str, object] = {}
        if index:  # applied on the new output beneath it: that is its original now
            base, rel, create = _backup_place(ctx, target, before, {target.path: after})
            if create:
                keep.append((ctx.layout.resolve(base, rel), before))
            if entry.backup_created and (entry.backup_base, entry.backup) != (base, rel):
                drop.append(backup_path(ctx, entry))
            same = (entry.backup_base, entry.backup) == (base, rel)
            fields = {"backup_base": base, "backup": rel, "backup_sha256": sha256(before),
                      "backup_created": create or (same and entry.backup_created)}
        new_entries.append(replace(entry, before_sha256=sha256(before), after_sha256=sha256(after),
                                   code_sha256=code_sha256(ref), totopatch_version=__version__, applied_at=stamp,
                                   **fields))  # type: ignore[arg-type]
    final = rebuilt.outputs[-1]
    # The earlier records go once the file holds the new stack: a run killed on the way still knows what they
    # recorded, so the earlier version's output beneath a patch is cleared as a recorded patch's output.
    changes = [Change(target.path, data, data, mf.JournalItem("remove", e, sha256(final))) for e in rebuilt.chain]
    changes += [Change(target.path, data, final, mf.JournalItem("add", new_entries[0], new_entries[0].after_sha256),
                       tuple(keep))]
    changes += [Change(target.path, final, final, mf.JournalItem("add", e, e.after_sha256)) for e in new_entries[1:]]
    changes[-1] = replace(changes[-1], remove_after=tuple(drop))
    others = [e.patch for e in rebuilt.chain if e.patch != item.patch]
    stacked = f", with {', '.join(others)} in the same file" if others else ""
    return replace(item, state=State.UPDATED, detail=f"written again from the original by this totopatch{stacked}",
                   diff=diff(target.path, data, final, item.file)), changes


def _fingerprinted(target: Target, rebuilt: Rebuilt, data: bytes) -> list[Change]:
    """Record this totopatch's fingerprint in entries whose patch, as this version writes it, gives the same bytes."""
    return [Change(target.path, data, data, mf.JournalItem("add", replace(e, code_sha256=code_sha256(ref)),
                                                            e.after_sha256))
            for e in rebuilt.chain if (ref := by_id(e.patch)) is not None and e.code_sha256 != code_sha256(ref)]
