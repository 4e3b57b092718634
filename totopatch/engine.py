"""apply, status, verify and revert: each returns a Report and never exits or prints."""
from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from . import __version__, manifest as mf
from .fsio import LockedError, Lock, atomic_write, clear_bytecode, crash_point, is_hardlinked, remove_stale_temps, sha256
from .layout import Layout, Target, installed_toto, toto_version
from .merge import three_way, unified
from .patches import by_id
from .spec import LegacyPatched, Patch, PatchRef, Refusal, Rewrite
from .textio import SourceError, check_syntax, decode


class Code(IntEnum):
    OK = 0
    NOT_DESIRED = 1  # status --check / verify found something not applied and intact
    USAGE = 2
    REFUSED = 3  # conflict or unexpected shape; nothing written
    IO = 4  # a write failed; everything was rolled back
    PERMISSION = 5  # a target or the state folder is not writable; nothing written
    LOCKED = 6  # another run holds the lock
    STATE = 7  # the manifest, journal or a backup cannot be trusted


GOOD_STATES = ("applied", "not-present")
REFUSING_STATES = ("conflict", "legacy", "missing", "refused")


@dataclass(frozen=True)
class Item:
    """What happened to (or stands with) one patch on one file."""

    patch: str
    target: str
    file: str
    state: str
    detail: str = ""
    diff: str = ""


@dataclass
class Report:
    command: str
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    code: Code = Code.OK
    error: str | None = None
    smoke: dict[str, object] | None = None
    environment: dict[str, object] | None = None  # status and verify: what the run-time environment overrides

    def fail(self, code: Code, error: str) -> "Report":
        self.code, self.error = code, error
        return self


class Abort(Exception):
    """Stop the command with this exit code and one-line message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Context:
    layout: Layout
    backups_in_state: bool = False

    @property
    def manifest_path(self) -> Path:
        return self.layout.state_dir / "manifest.json"

    @property
    def journal_path(self) -> Path:
        return self.layout.state_dir / "journal.json"


@dataclass(frozen=True)
class Change:
    """One file write the command intends, with the manifest operation it completes."""

    path: Path
    old: bytes
    new: bytes
    journal: mf.JournalItem | None = None
    backup: tuple[Path, bytes] | None = None  # a backup file to create first
    remove_after: Path | None = None  # a backup file to delete once the change is made
    aside: tuple[Path, bytes] | None = None  # the user's version, saved before --force


# ---------------------------------------------------------------- selection and reading


def select(patches: Iterable[PatchRef], ids: tuple[str, ...]) -> list[PatchRef]:
    """The patches named (all default ones when none is), in registry order."""
    patches = list(patches)
    known = {p.id for p in patches}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise Abort(Code.USAGE, f"unknown patch {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [p for p in patches if (p.id in ids if ids else p.default)]


def _targets(ctx: Context, ref: PatchRef) -> Iterator[Target]:
    for key in ref.targets:
        yield ctx.layout.target(key)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise Abort(Code.REFUSED, f"{path}: expected a Python file, found a directory") from None
    except PermissionError:
        raise Abort(Code.PERMISSION, f"{path}: cannot read (permission denied)") from None
    except OSError as exc:
        raise Abort(Code.IO, f"{path}: cannot read ({exc.strerror})") from None


def _text(path: Path, data: bytes) -> tuple[str, Callable[[str], bytes]]:
    try:
        source = decode(data)
    except SourceError as exc:
        raise Abort(Code.REFUSED, f"{path}: {exc}") from None
    return source.text, source.encode


def _rewrite(patch: Patch, path: Path, text: str, options: Mapping[str, str]) -> Rewrite:
    """Run the patch; its output must parse and be a fixed point of the patch."""
    result = patch.rewrite(text, options)
    new = result.source
    if new != text:
        try:
            check_syntax(new, str(path))
        except SourceError as exc:
            raise Abort(Code.REFUSED, f"{path}: patch {patch.id} produced invalid output ({exc}); nothing written")
        if patch.rewrite(new, options).source != new:
            raise Abort(Code.REFUSED, f"{path}: patch {patch.id} is not stable on its own output; nothing written")
    return result


def _refusal_detail(exc: Refusal, display: str) -> str:
    where = "; candidates: " + ", ".join(f"{display}:{n}" for n in exc.lines) if exc.lines else ""
    return f"{exc.reason}{where}"


def _options(ref: Patch, options: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in options.items() if k in ref.option_names}


def _load_state(ctx: Context) -> tuple[mf.Manifest, list[mf.JournalItem]]:
    try:
        return mf.load(ctx.manifest_path), mf.load_journal(ctx.journal_path)
    except mf.StateError as exc:
        raise Abort(Code.STATE, str(exc)) from None


def _current_hashes(ctx: Context, items: list[mf.JournalItem]) -> dict[tuple[str, str], str | None]:
    hashes: dict[tuple[str, str], str | None] = {}
    for item in items:
        data = _read(ctx.layout.resolve(item.entry.base, item.entry.file))
        hashes[(item.entry.base, item.entry.file)] = None if data is None else sha256(data)
    return hashes


# ---------------------------------------------------------------- status


def status(ctx: Context, refs: list[PatchRef]) -> Report:
    report = Report("status")
    try:
        manifest, journal = _load_state(ctx)
        if journal:
            manifest = mf.replay(manifest, journal, _current_hashes(ctx, journal))
            report.notes.append(f"an interrupted run left {ctx.layout.display(ctx.journal_path)}; "
                                "the next apply or revert finishes it")
        for ref in refs:
            for target in _targets(ctx, ref):
                report.items.append(_status_one(ctx, manifest, ref, target))
        report.notes.extend(_import_notes(ctx, manifest))
    except Abort as exc:
        return report.fail(exc.code, str(exc))
    return report


def _status_one(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target) -> Item:
    display = ctx.layout.display(target.path)
    item = Item(ref.id, target.key, display, "")
    data = _read(target.path)
    if data is None:
        return replace(item, state="not-present" if target.optional else "missing",
                       detail="optional target absent" if target.optional else "required target file is missing")
    current = sha256(data)
    entry = manifest.find(ref.id, target.base, target.rel)
    if entry is not None and current == entry.after_sha256:
        return replace(item, state="applied", detail=_options_text(entry.options))
    if entry is not None and (replaced := _replaced(ctx, entry, current)):
        return replace(item, state="replaced", detail=replaced)
    patch = ref.load()
    text, _ = _text(target.path, data)
    try:
        rewritten = patch.rewrite(text, entry.options if entry else {})
    except LegacyPatched as exc:
        return replace(item, state="legacy", detail=f"patched by the legacy script ({exc.reason}); "
                       "`totopatch apply --adopt-legacy` takes it over")
    except Refusal as exc:
        inside = "edited inside the patched region: " if entry else ""
        return replace(item, state="conflict", detail=inside + _refusal_detail(exc, display))
    if entry is not None:
        if rewritten.source == text:
            return replace(item, state="drifted", detail="applied, with later edits outside the patched region")
        return replace(item, state="conflict", detail="edited inside the patched region since apply")
    if rewritten.source == text:
        return replace(item, state="applied-unrecorded",
                       detail="the patch is in the file but not in the manifest; `apply` records it if a backup is found")
    return replace(item, state="not-applied", detail="; ".join(rewritten.notes))


def _replaced(ctx: Context, entry: mf.Entry, current: str) -> str:
    now = toto_version(ctx.layout.toto_parent) if entry.base == "toto" else None
    if entry.base == "toto" and entry.toto_version and now and now != entry.toto_version:
        return f"target replaced: patched toto-ts {entry.toto_version}, now {now}"
    if current == entry.before_sha256:
        return "target replaced: the file is the unpatched original again (reinstalled?)"
    return ""


def _options_text(options: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


def _import_notes(ctx: Context, manifest: mf.Manifest) -> list[str]:
    if not any(e.base == "toto" for e in manifest.entries):
        return []
    resolved = installed_toto()
    patched = ctx.layout.toto_parent
    if resolved is None:
        return [f"`import toto` does not resolve in this Python; the patched copy is {patched / 'toto'}"]
    if resolved != patched.resolve():
        return [f"warning: `import toto` resolves to {resolved / 'toto'}, not the patched copy {patched / 'toto'}"]
    return [f"`import toto` resolves to the patched copy {patched / 'toto'}"]


# ---------------------------------------------------------------- apply


def apply(ctx: Context, refs: list[PatchRef], options: Mapping[str, str], *, dry_run: bool = False,
          adopt_legacy: bool = False) -> Report:
    report = Report("apply")
    return _locked(ctx, report, dry_run, lambda m: _apply(ctx, report, m, refs, options, dry_run, adopt_legacy))


def _apply(ctx: Context, report: Report, manifest: mf.Manifest, refs: list[PatchRef],
           options: Mapping[str, str], dry_run: bool, adopt_legacy: bool) -> Report:
    pending: dict[Path, bytes] = {}  # what each file will hold once earlier patches in this run are written
    changes: list[Change] = []
    for ref in refs:
        patch = ref.load()
        for target in _targets(ctx, ref):
            item, change = _plan_apply(ctx, manifest, patch, target, pending, _options(patch, options), adopt_legacy)
            report.items.append(item)
            if change is not None:
                changes.append(change)
                pending[target.path] = change.new
    return _finish(ctx, report, manifest, changes, dry_run, "would-apply")


def _finish(ctx: Context, report: Report, manifest: mf.Manifest, changes: list[Change], dry_run: bool,
            dry_state: str) -> Report:
    """Refuse if any file refused; otherwise show (dry run) or commit the planned changes."""
    refused = [i for i in report.items if i.state in REFUSING_STATES]
    if refused:
        return report.fail(Code.REFUSED, "refused: " + "; ".join(f"{i.file}: {i.detail}" for i in refused)
                           + "; nothing was written")
    if dry_run:
        report.items = [replace(i, state=dry_state) if i.state in ("applied", "reverted") else i for i in report.items]
        return report
    return _commit(ctx, report, changes, manifest) if changes else report


def _plan_apply(ctx: Context, manifest: mf.Manifest, patch: Patch, target: Target, pending: dict[Path, bytes],
                options: dict[str, str], adopt_legacy: bool) -> tuple[Item, Change | None]:
    display = ctx.layout.display(target.path)
    item = Item(patch.id, target.key, display, "")
    data = pending[target.path] if target.path in pending else _read(target.path)
    if data is None:
        if target.optional:
            return replace(item, state="not-present", detail="optional target absent"), None
        return replace(item, state="missing", detail="required target file is missing"), None
    entry = manifest.find(patch.id, target.base, target.rel)
    current = sha256(data)
    if entry is not None and current == entry.after_sha256:
        if entry.options != options:
            return replace(item, state="refused", detail=f"already applied with {_options_text(entry.options)}; "
                           "revert it first to apply other options"), None
        return replace(item, state="already-applied"), None
    if entry is not None and current != entry.before_sha256:
        return _plan_on_edited(patch, target, item, data, options)
    text, encode = _text(target.path, data)
    legacy: bytes | None = None
    try:
        try:
            result = _rewrite(patch, target.path, text, options)
        except LegacyPatched as exc:
            if not adopt_legacy or patch.adopt_legacy is None:
                return replace(item, state="legacy", detail=f"patched by the legacy script ({exc.reason}); "
                               "rerun with --adopt-legacy to take it over"), None
            legacy, data, text = data, *_pre_legacy(patch, target, text, encode)
            result = _rewrite(patch, target.path, text, options)
    except Refusal as exc:
        return replace(item, state="conflict", detail=_refusal_detail(exc, display)), None
    new_text = result.source
    if new_text == text and legacy is None:
        return _plan_unrecorded(ctx, patch, target, item, data, text, options)
    new = encode(new_text)
    detail = "; ".join(("adopted the legacy script's file",) * (legacy is not None) + result.notes)
    change = _change(ctx, patch, target, data, new, options, legacy, pending)
    return replace(item, state="applied", detail=detail, diff=unified(text, new_text, display)), change


def _plan_on_edited(patch: Patch, target: Target, item: Item, data: bytes,
                    options: dict[str, str]) -> tuple[Item, Change | None]:
    text, _ = _text(target.path, data)
    try:
        still = patch.rewrite(text, options).source == text
    except Refusal:
        still = False
    if still:
        return replace(item, state="already-applied", detail="with later edits outside the patched region"), None
    return replace(item, state="conflict", detail="recorded as applied, but the patched region was edited since; "
                   "see `totopatch status`, or revert --force"), None


def _plan_unrecorded(ctx: Context, patch: Patch, target: Target, item: Item, data: bytes, text: str,
                     options: dict[str, str]) -> tuple[Item, Change | None]:
    """The patch is in the file already: record it if a backup proves what the original was."""
    for backup in _backup_candidates(ctx, target):
        original = _read(backup)
        if original is None:
            continue
        try:
            original_text, _ = _text(backup, original)
            if original_text != text and patch.rewrite(original_text, options).source == text:
                change = replace(_change(ctx, patch, target, original, data, options, None, {}), old=data)
                return replace(item, state="recorded",
                               detail=f"already patched; recorded with {ctx.layout.display(backup)} as original"), change
        except (Refusal, Abort):
            continue
    return replace(item, state="already-applied",
                   detail="patched, but no backup of the original was found: revert cannot undo it"), None


def _backup_candidates(ctx: Context, target: Target) -> list[Path]:
    found = [Path(str(target.path) + ".backup")]
    folder = ctx.layout.state_dir / "backups"
    if folder.is_dir():
        found += sorted(folder.iterdir())
    return found


def _pre_legacy(patch: Patch, target: Target, text: str, encode: Callable[[str], bytes]) -> tuple[bytes, str]:
    """The file as it was before the legacy script: its .backup when consistent, else the legacy lines removed."""
    if patch.adopt_legacy is None:
        raise Abort(Code.REFUSED, f"{target.path}: patch {patch.id} cannot adopt legacy edits")
    try:
        cleaned = patch.adopt_legacy(text)
    except Refusal as exc:
        raise Abort(Code.REFUSED, f"{target.path}: cannot adopt the legacy edit ({exc.reason}); nothing written")
    sibling = Path(str(target.path) + ".backup")
    legacy_backup = _read(sibling)
    if legacy_backup is not None:
        try:
            backup_text, _ = _text(sibling, legacy_backup)
        except Abort:
            backup_text = None
        # The old script rewrote line endings; its .backup still has the original ones.
        if backup_text is not None and backup_text.replace("\r\n", "\n") == cleaned.replace("\r\n", "\n"):
            return legacy_backup, backup_text
    return encode(cleaned), cleaned


def _change(ctx: Context, patch: Patch, target: Target, before: bytes, after: bytes, options: dict[str, str],
            legacy: bytes | None, pending: dict[Path, bytes]) -> Change:
    """The write of ``after`` over the file, its backup, and the manifest entry it completes."""
    backup_base, backup_rel, create = _backup_place(ctx, target, before, pending)
    legacy_rel = f"backups/{sha256(legacy)}" if legacy is not None else None
    entry = mf.Entry(
        patch=patch.id, base=target.base, file=target.rel,
        before_sha256=sha256(before), after_sha256=sha256(after),
        backup_base=backup_base, backup=backup_rel, backup_sha256=sha256(before), backup_created=create,
        options=options, totopatch_version=__version__,
        toto_version=toto_version(ctx.layout.toto_parent) if target.base == "toto" else None,
        applied_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        legacy_sha256=sha256(legacy) if legacy is not None else None, legacy_backup=legacy_rel,
    )
    backup_path = ctx.layout.resolve(backup_base, backup_rel)
    aside = (ctx.layout.state_dir / legacy_rel, legacy) if legacy is not None and legacy_rel else None
    old = legacy if legacy is not None else before
    return Change(target.path, old, after, mf.JournalItem("add", entry, entry.after_sha256),
                  (backup_path, before) if create else None, aside=aside)


def _backup_place(ctx: Context, target: Target, before: bytes, pending: dict[Path, bytes]) -> tuple[str, str, bool]:
    """Where the original goes: ``<file>.backup`` unless that holds something else, then content-addressed."""
    sibling = Path(str(target.path) + ".backup")
    if not ctx.backups_in_state and target.path not in pending:
        existing = _read(sibling)
        if existing is None:
            return target.base, target.rel + ".backup", True
        if existing == before:
            return target.base, target.rel + ".backup", False
    rel = f"backups/{sha256(before)}"
    return "state", rel, _read(ctx.layout.state_dir / rel) != before


# ---------------------------------------------------------------- revert


def revert(ctx: Context, refs: list[PatchRef], *, dry_run: bool = False, force: bool = False) -> Report:
    report = Report("revert")
    return _locked(ctx, report, dry_run, lambda m: _revert(ctx, report, m, refs, dry_run, force))


def _revert(ctx: Context, report: Report, manifest: mf.Manifest, refs: list[PatchRef], dry_run: bool,
            force: bool) -> Report:
    ids = {r.id for r in refs}
    entries = [e for e in reversed(manifest.entries) if e.patch in ids]
    pending: dict[Path, bytes] = {}
    changes: list[Change] = []
    for entry in entries:
        item, change = _plan_revert(ctx, entry, pending, force)
        report.items.append(item)
        if change is not None:
            changes.append(change)
            pending[change.path] = change.new
    if not entries:
        report.notes.append("nothing to revert: no recorded change for " + ", ".join(sorted(ids)))
    return _finish(ctx, report, manifest, _drop_unneeded_backups(ctx, manifest, entries, changes), dry_run,
                   "would-revert")


def _plan_revert(ctx: Context, entry: mf.Entry, pending: dict[Path, bytes], force: bool) -> tuple[Item, Change | None]:
    path = ctx.layout.resolve(entry.base, entry.file)
    display = ctx.layout.display(path)
    item = Item(entry.patch, ctx.layout.key_for(entry.base, entry.file), display, "")
    data = pending[path] if path in pending else _read(path)
    if data is None:
        return replace(item, state="missing", detail="the patched file is gone; nothing to restore over"), None
    before = _verified_backup(ctx, entry)
    current = sha256(data)
    remove = mf.JournalItem("remove", entry, entry.before_sha256)
    if current == entry.after_sha256:
        return replace(item, state="reverted", diff=_diff(path, data, before, display)), Change(path, data, before, remove)
    if current == entry.before_sha256:
        return replace(item, state="reverted", detail="already the original; dropped from the manifest"), \
            Change(path, data, data, remove)
    merged = _merge_out(entry, path, data, before)
    if merged is not None:
        journal = mf.JournalItem("remove", entry, sha256(merged))
        return replace(item, state="reverted", detail="merged: your later edits were kept",
                       diff=_diff(path, data, merged, display)), Change(path, data, merged, journal)
    diff = _diff(path, _expected_after(entry, path, before) or before, data, display)
    if not force:
        return replace(item, state="conflict", detail="edited inside the patched region since apply; "
                       "revert --force restores the original and saves your version aside", diff=diff), None
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = ctx.layout.state_dir / "saved" / f"{Path(entry.file).name}.{stamp}.{current[:12]}"
    return replace(item, state="reverted", detail=f"forced: your version was saved to {ctx.layout.display(aside)}",
                   diff=diff), Change(path, data, before, remove, aside=(aside, data))


def _verified_backup(ctx: Context, entry: mf.Entry) -> bytes:
    path = ctx.layout.resolve(entry.backup_base, entry.backup)
    data = _read(path)
    if data is None:
        raise Abort(Code.STATE, f"{path}: backup is missing; cannot restore {entry.file}")
    if sha256(data) != entry.backup_sha256 or entry.backup_sha256 != entry.before_sha256:
        raise Abort(Code.STATE, f"{path}: backup does not match the manifest's sha256; "
                    "refusing to restore from an unverified backup")
    return data


def _expected_after(entry: mf.Entry, path: Path, before: bytes) -> bytes | None:
    """What the patch makes of the original, if that still hashes to what the manifest recorded."""
    ref = by_id(entry.patch)
    if ref is None:
        return None
    text, encode = _text(path, before)
    try:
        after = encode(ref.load().rewrite(text, entry.options).source)
    except Refusal:
        return None
    return after if sha256(after) == entry.after_sha256 else None


def _merge_out(entry: mf.Entry, path: Path, data: bytes, before: bytes) -> bytes | None:
    """The user's file with only the patch's change taken out, proven by re-applying the patch."""
    after = _expected_after(entry, path, before)
    ref = by_id(entry.patch)
    if after is None or ref is None:
        return None
    try:
        after_text, _ = _text(path, after)
        before_text, _ = _text(path, before)
        current_text, encode = _text(path, data)
    except Abort:
        return None
    merged = three_way(after_text, current_text, before_text)
    if merged is None:
        return None
    try:
        check_syntax(merged, str(path))
        if ref.load().rewrite(merged, entry.options).source != current_text:
            return None
    except (Refusal, SourceError):
        return None
    return encode(merged)


def _drop_unneeded_backups(ctx: Context, manifest: mf.Manifest, reverted: list[mf.Entry],
                           changes: list[Change]) -> list[Change]:
    """Delete the backups this tool created, once no remaining entry needs them."""
    remaining = [e for e in manifest.entries if e not in reverted]
    needed = {(e.backup_base, e.backup) for e in remaining}
    by_path = {c.path: c for c in changes}
    out = list(changes)
    for entry in reverted:
        if not entry.backup_created or (entry.backup_base, entry.backup) in needed:
            continue
        path = ctx.layout.resolve(entry.base, entry.file)
        change = by_path.get(path)
        if change is not None and change.remove_after is None:
            index = out.index(change)
            out[index] = replace(change, remove_after=ctx.layout.resolve(entry.backup_base, entry.backup))
            by_path[path] = out[index]
    return out


def _diff(path: Path, old: bytes, new: bytes, display: str) -> str:
    try:
        return unified(_text(path, old)[0], _text(path, new)[0], display)
    except Abort:
        return ""


# ---------------------------------------------------------------- verify


def verify(ctx: Context, refs: list[PatchRef]) -> Report:
    """Status plus proof: every applied file parses, re-applying changes nothing, hashes and backups match."""
    report = status(ctx, refs)
    report.command = "verify"
    if report.code:
        return report
    manifest, _ = _load_state(ctx)
    report.items = [_prove(ctx, manifest, i) if i.state == "applied" else i for i in report.items]
    if any(i.state not in GOOD_STATES for i in report.items):
        report.code = Code.NOT_DESIRED
    return report


def _prove(ctx: Context, manifest: mf.Manifest, item: Item) -> Item:
    target = ctx.layout.target(item.target)
    entry = manifest.find(item.patch, target.base, target.rel)
    ref = by_id(item.patch)
    if entry is None or ref is None:
        return replace(item, state="unproven", detail="no manifest entry to prove against")
    try:
        text, _ = _text(target.path, _read(target.path) or b"")
        check_syntax(text, str(target.path))
        if ref.load().rewrite(text, entry.options).source != text:
            return replace(item, state="unproven", detail="re-applying the patch would change the file")
        _verified_backup(ctx, entry)
    except (Abort, SourceError, Refusal) as exc:
        return replace(item, state="unproven", detail=str(exc))
    return replace(item, detail="proven: parses, re-apply is a no-op, hashes and backup match")


# ---------------------------------------------------------------- the locked transaction


def _locked(ctx: Context, report: Report, dry_run: bool, body: Callable[[mf.Manifest], Report]) -> Report:
    """Run ``body`` under the lock, after finishing whatever an interrupted run left."""
    try:
        if dry_run:
            manifest, journal = _load_state(ctx)
            return body(mf.replay(manifest, journal, _current_hashes(ctx, journal)))
        _preflight_state(ctx)
        with Lock(ctx.layout.state_dir / "lock") as lock:
            crash_point("after-lock")
            if lock.stale_pid is not None:
                report.notes.append(f"recovered a stale lock left by pid {lock.stale_pid}")
            manifest = _recover(ctx, report)
            return body(manifest)
    except LockedError as exc:
        return report.fail(Code.LOCKED, str(exc))
    except Abort as exc:
        return report.fail(exc.code, str(exc))


def _preflight_state(ctx: Context) -> None:
    state = ctx.layout.state_dir
    probe = state if state.exists() else state.parent
    if not _can_write(probe):
        raise Abort(Code.PERMISSION, f"{state}: state folder is not writable (permission denied); "
                    "nothing was changed; keep the state elsewhere with --state-dir DIR")


def _recover(ctx: Context, report: Report) -> mf.Manifest:
    manifest, journal = _load_state(ctx)
    for folder in {ctx.layout.resolve(i.entry.base, i.entry.file).parent for i in journal}:
        for temp in remove_stale_temps(folder):
            report.notes.append(f"removed {ctx.layout.display(temp)} left by an interrupted write")
    if not journal:
        return manifest
    recovered = mf.replay(manifest, journal, _current_hashes(ctx, journal))
    for path in _orphan_backups(ctx, recovered, journal):
        _io(lambda: path.unlink(missing_ok=True))
        report.notes.append(f"removed {ctx.layout.display(path)}, a backup made by an interrupted apply")
    _io(lambda: mf.save(ctx.manifest_path, recovered))
    _io(lambda: ctx.journal_path.unlink())
    report.notes.append("finished recording a run that was interrupted")
    return recovered


def _orphan_backups(ctx: Context, manifest: mf.Manifest, journal: list[mf.JournalItem]) -> list[Path]:
    """Backups an interrupted apply created for changes it never made."""
    kept = {(e.backup_base, e.backup) for e in manifest.entries}
    orphans = []
    for item in journal:
        entry = item.entry
        if item.op != "add" or not entry.backup_created or (entry.backup_base, entry.backup) in kept:
            continue
        path = ctx.layout.resolve(entry.backup_base, entry.backup)
        data = _read(path)
        if data is not None and sha256(data) == entry.backup_sha256:
            orphans.append(path)
    return orphans


def _commit(ctx: Context, report: Report, changes: list[Change], manifest: mf.Manifest) -> Report:
    """Write everything or nothing: journal, backups, files, manifest; roll back on any failure."""
    _preflight_writes(ctx, changes)
    journal = [c.journal for c in changes if c.journal is not None]
    linked = [c.path for c in changes if c.new != c.old and is_hardlinked(c.path)]
    undo: list[tuple[Path, bytes | None]] = []
    try:
        mf.save_journal(ctx.journal_path, journal)
        for change in changes:
            _write_change(change, undo)
        for item in journal:
            manifest = manifest.with_entry(item.entry) if item.op == "add" else manifest.without(item.entry)
        crash_point("before-manifest")
        mf.save(ctx.manifest_path, replace(manifest, toto_dir=str(ctx.layout.toto_parent)))
        ctx.journal_path.unlink()
    except BaseException as exc:
        _rollback(undo)
        ctx.journal_path.unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        return report.fail(*_io_failure(exc))
    for change in changes:
        clear_bytecode(change.path)
    for path in linked:
        report.notes.append(f"{ctx.layout.display(path)} was hard-linked: it now has its own copy, "
                            "and the other links keep the original bytes")
    return report


def _write_change(change: Change, undo: list[tuple[Path, bytes | None]]) -> None:
    for extra in (change.aside, change.backup):
        if extra is not None:
            path, data = extra
            path.parent.mkdir(parents=True, exist_ok=True)
            undo.append((path, _read(path)))
            atomic_write(path, data, 0o644)
    crash_point("after-backup")
    if change.new != change.old:
        undo.append((change.path, change.old))
        atomic_write(change.path, change.new)
    crash_point("after-write")
    if change.remove_after is not None:
        undo.append((change.remove_after, _read(change.remove_after)))
        change.remove_after.unlink(missing_ok=True)


def _rollback(undo: list[tuple[Path, bytes | None]]) -> None:
    for path, old in reversed(undo):
        if old is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, old)


def _io_failure(exc: BaseException) -> tuple[Code, str]:
    """A failure part-way through writing is always the I/O code: by now everything is rolled back."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return Code.IO, f"{where}write failed ({exc.strerror or exc}); every file was rolled back"
    return Code.IO, f"write failed ({exc.__class__.__name__}: {exc}); every file was rolled back"


def _preflight_writes(ctx: Context, changes: list[Change]) -> None:
    """Refuse before writing anything if a target or its folder is read-only."""
    for change in changes:
        if change.new == change.old:
            continue
        real = Path(os.path.realpath(change.path))
        for probe, what in ((real, "target file is read-only"), (real.parent, "its folder is not writable")):
            if not _can_write(probe):
                raise Abort(Code.PERMISSION, f"{change.path}: {what} (permission denied); nothing was changed; "
                            "patch a copy you own, or keep backups and manifest elsewhere with --state-dir DIR")


def _can_write(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return _can_write(path.parent) if path.parent != path else False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(path, os.W_OK)


def _io(action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as exc:
        raise Abort(*_io_failure(exc)) from None


# ---------------------------------------------------------------- smoke test


def attach_smoke(ctx: Context, report: Report, device: str = "auto", backend: str = "eager",
                 mode: str | None = None, timeout: float = 1800) -> Report:
    """Compile the patched Toto from this tree in a fresh process; a failed smoke test fails verify."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "totopatch.smoke", "--toto-parent", str(ctx.layout.toto_parent),
           "--device", device, "--backend", backend, "--json"] + (["--mode", mode] if mode else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        smoke = json.loads(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}")
    except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
        smoke = {"ok": False, "error": f"smoke test did not report ({exc.__class__.__name__})"}
    if not isinstance(smoke, dict) or "ok" not in smoke:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        smoke = {"ok": False, "error": f"smoke test failed: {last}"}
    report.smoke = smoke
    if not smoke.get("ok") and report.code == Code.OK:
        report.code = Code.NOT_DESIRED
    return report
