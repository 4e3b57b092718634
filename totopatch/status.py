"""Where each patch stands on each file: one decision tree (``classify``) for status, verify and apply."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping

from . import manifest as mf
from .fsio import sha256
from .layout import Target, installed_toto, toto_version
from .outcome import Abort, Code, Item, Report, State
from .patches import by_id
from .reading import read, text
from .spec import LegacyPatched, PatchRef, Refusal, Rewrite
from .state import Context, load
from .textio import SourceError, check_syntax


@dataclass(frozen=True)
class Finding:
    """The state of one patch on one file, with what was read to decide it."""

    state: State
    detail: str = ""
    data: bytes | None = None
    entry: mf.Entry | None = None
    rewritten: Rewrite | None = None  # the patch's output, where it ran without refusing
    refusal: Refusal | None = None


def targets(ctx: Context, ref: PatchRef) -> Iterator[Target]:
    for key in ref.targets:
        yield ctx.layout.target(key)


def effective_options(ref: PatchRef, entry: mf.Entry | None, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """The patch's declared defaults, then what the manifest recorded, then what was asked for now."""
    options = dict(ref.options)
    options.update((k, v) for k, v in (entry.options if entry else {}).items() if k in options)
    options.update((k, v) for k, v in (given or {}).items() if k in options)
    return options


def classify(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target, options: Mapping[str, str],
             data: bytes | None, *, ignore_entry: bool = False) -> Finding:
    """Decide the state; only a file that does not match its manifest entry loads the patch (and LibCST)."""
    entry = None if ignore_entry else manifest.find(ref.id, target.base, target.rel)
    if data is None:
        if entry is not None:
            return Finding(State.MISSING, "recorded as patched, but the file is gone; "
                           "`totopatch forget` (or revert) drops the record", entry=entry)
        if target.optional:
            return Finding(State.NOT_PRESENT, "optional target absent")
        return Finding(State.MISSING, "required target file is missing")
    current = sha256(data)
    if entry is not None and current == entry.after_sha256:
        return Finding(State.APPLIED, options_text(entry.options), data, entry)
    if entry is not None and current == manifest.top_sha256(entry):  # with later patches stacked on it
        under = "under " + ", ".join(e.patch for e in manifest.above(entry))
        return Finding(State.APPLIED, ", ".join(filter(None, (options_text(entry.options), under))), data, entry)
    if entry is not None and (why := replaced(ctx, entry, current, manifest)):
        return Finding(State.REPLACED, why, data, entry)
    source, _ = text(target.path, data)
    try:
        rewritten = ref.load().rewrite(source, options)
    except LegacyPatched as exc:
        return Finding(State.LEGACY, f"patched by the legacy script ({exc.reason})", data, entry, refusal=exc)
    except Refusal as exc:
        inside = "edited inside the patched region: " if entry else ""
        return Finding(State.CONFLICT, inside + refusal_detail(exc, ctx.layout.display(target.path)), data, entry,
                       refusal=exc)
    unchanged = rewritten.source == source
    if entry is not None:
        if unchanged:
            return Finding(State.DRIFTED, "applied, with later edits outside the patched region", data, entry, rewritten)
        return Finding(State.CONFLICT, "edited inside the patched region since apply", data, entry, rewritten)
    if unchanged:
        return Finding(State.APPLIED_UNRECORDED, "the patch is in the file but not in the manifest; "
                       "`apply` records it if a backup is found", data, None, rewritten)
    return Finding(State.NOT_APPLIED, "; ".join(rewritten.notes), data, None, rewritten)


def replaced(ctx: Context, entry: mf.Entry, current: str, manifest: mf.Manifest | None = None) -> str:
    """Why a recorded file is no longer the file that was patched, or '' where it still is."""
    now = toto_version(ctx.layout.toto_parent) if entry.base == "toto" else None
    if entry.base == "toto" and entry.toto_version and now and now != entry.toto_version:
        return f"target replaced: patched toto-ts {entry.toto_version}, now {now}"
    if current == (manifest.original_sha256(entry) if manifest is not None else entry.before_sha256):
        return "target replaced: the file is the unpatched original again (reinstalled?)"
    return ""


def refusal_detail(exc: Refusal, display: str) -> str:
    places = ", ".join(f"{display}:{n}" for n in exc.lines)
    where = (" at " if exc.at else "; candidates: ") + places if exc.lines else ""
    return f"{exc.reason}{where}" + (f"; {exc.hint}" if exc.hint else "")


def options_text(options: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


# ---------------------------------------------------------------- status and verify


def status(ctx: Context, refs: list[PatchRef], *, check: bool = False) -> Report:
    report = Report("status", check=check)
    try:
        loaded = load(ctx)
        if loaded.journal:
            report.notes.append(f"an interrupted run left {ctx.layout.display(ctx.journal_path)}; "
                                "the next apply or revert finishes it")
        for ref in refs:
            for target in targets(ctx, ref):
                report.items.append(_status_item(ctx, loaded.manifest, ref, target))
        report.notes.extend(unknown_notes(ctx, loaded.manifest))
        report.notes.extend(import_notes(ctx, loaded.manifest))
    except Abort as exc:
        return report.fail(exc.code, str(exc))
    refused = [i for i in report.items if i.state == State.REFUSED]
    if refused:
        report.fail(Code.REFUSED, "; ".join(i.detail for i in refused))
    return report


def _status_item(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target) -> Item:
    item = Item(ref.id, target.key, ctx.layout.display(target.path), "")
    try:
        data = read(target.path)
        entry = manifest.find(ref.id, target.base, target.rel)
        found = classify(ctx, manifest, ref, target, effective_options(ref, entry), data)
    except Abort as exc:
        if exc.code != Code.REFUSED:
            raise
        return replace(item, state=State.REFUSED, detail=str(exc))
    detail = found.detail
    if found.state == State.LEGACY:
        detail += "; `totopatch apply --adopt-legacy` takes it over"
    return replace(item, state=found.state, detail=detail)


def unknown_notes(ctx: Context, manifest: mf.Manifest) -> list[str]:
    return [f"the manifest records patch {e.patch} on {ctx.layout.display(ctx.layout.resolve(e.base, e.file))}, "
            "which this totopatch does not know; `totopatch revert` restores that file from its backup"
            for e in manifest.entries if by_id(e.patch) is None]


def import_notes(ctx: Context, manifest: mf.Manifest) -> list[str]:
    if not any(e.base == "toto" for e in manifest.entries):
        return []
    resolved = installed_toto()
    patched = ctx.layout.toto_parent
    if resolved is None:
        return [f"`import toto` does not resolve in this Python; the patched copy is {patched / 'toto'}"]
    if not (resolved / "toto" / "__init__.py").is_file():
        return [f"`import toto` finds only leftovers in {resolved / 'toto'} (no __init__.py): "
                "toto-ts is not installed there"]
    if resolved != patched.resolve():
        return [f"warning: `import toto` resolves to {resolved / 'toto'}, not the patched copy {patched / 'toto'}"]
    return [f"`import toto` resolves to the patched copy {patched / 'toto'}"]


def verify(ctx: Context, refs: list[PatchRef]) -> Report:
    """Status plus proof: every applied file parses, re-applying changes nothing, hashes and backups match."""
    report = status(ctx, refs, check=True)
    report.command = "verify"
    if report.error_code is not None:
        return report
    try:
        manifest = load(ctx).manifest
    except Abort as exc:
        return report.fail(exc.code, str(exc))
    report.items = [_prove(ctx, manifest, i) if i.state == State.APPLIED else i for i in report.items]
    return report


def _prove(ctx: Context, manifest: mf.Manifest, item: Item) -> Item:
    target = ctx.layout.target(item.target)
    entry = manifest.find(item.patch, target.base, target.rel)
    ref = by_id(item.patch)
    if entry is None or ref is None:
        return replace(item, state=State.UNPROVEN, detail="no manifest entry to prove against")
    try:
        source, _ = text(target.path, read(target.path) or b"")
        check_syntax(source, str(target.path))
        if ref.load().rewrite(source, effective_options(ref, entry)).source != source:
            return replace(item, state=State.UNPROVEN, detail="re-applying the patch would change the file")
        verified_backup(ctx, entry)
    except (Abort, SourceError, Refusal) as exc:
        return replace(item, state=State.UNPROVEN, detail=str(exc))
    return replace(item, detail="proven: parses, re-apply is a no-op, hashes and backup match")


def verified_backup(ctx: Context, entry: mf.Entry) -> bytes:
    path = ctx.layout.resolve(entry.backup_base, entry.backup)
    data = read(path)
    if data is None:
        raise Abort(Code.STATE, f"{path}: backup is missing; cannot restore {entry.file}")
    if sha256(data) != entry.backup_sha256 or entry.backup_sha256 != entry.before_sha256:
        raise Abort(Code.STATE, f"{path}: backup does not match the manifest's sha256; "
                    "refusing to restore from an unverified backup")
    return data


def backup_path(ctx: Context, entry: mf.Entry) -> Path:
    return ctx.layout.resolve(entry.backup_base, entry.backup)
