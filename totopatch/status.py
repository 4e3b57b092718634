"""Where each patch stands on each file: one decision tree (``classify``) for status, verify and apply."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Mapping

from . import manifest as mf
from .fsio import sha256
from .layout import TARGETS, Target, installed_toto
from .outcome import Abort, Code, Item, Report, State
from .patches import PATCHES, by_id
from .reading import read, text
from .spec import LegacyPatched, NeedsBase, PatchRef, Refusal, Rewrite
from .state import Context, load
from .textio import SourceError, check_syntax
from .undo import How, replaced, take_out_stack, verified_backup
from .update import Rebuilt, check as check_update


@dataclass(frozen=True)
class Finding:
    """The state of one patch on one file, with what was read to decide it."""

    state: State
    detail: str = ""
    data: bytes | None = None
    entry: mf.Entry | None = None
    rewritten: Rewrite | None = None  # the patch's output, where it ran without refusing
    refusal: Refusal | None = None
    rebuilt: Rebuilt | None = None  # the file's stack rebuilt from its original, where a fingerprint was not current
    outdated: bool = False  # a conflict: edited since an earlier totopatch applied it


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
    """Decide the state; only a file that does not match its manifest entry loads the patch (and LibCST).

    A recorded file edited since apply is ``drifted`` exactly where revert merges the patch out keeping the
    edits (``undo.take_out``), else ``conflict``: status and revert decide from the same merge.  A recorded
    file as recorded is ``applied``, or ``outdated`` where its stack was written by an earlier totopatch and
    this one writes other bytes (``update.check``; runs the patches only where a fingerprint is not current).
    """
    entry = None if ignore_entry else manifest.find(ref.id, target.base, target.rel)
    if data is None:
        if entry is not None:
            return Finding(State.MISSING, "recorded as patched, but the file is gone; "
                           "`totopatch forget` (or revert) drops the record", entry=entry)
        if target.optional:
            return Finding(State.NOT_PRESENT, "optional target absent")
        return Finding(State.MISSING, "required target file is missing")
    current = sha256(data)
    if entry is not None and current in (entry.after_sha256, manifest.top_sha256(entry)):
        if current == entry.after_sha256:
            found = "recorded as found: revert leaves it as it is" if entry.before_sha256 == entry.after_sha256 else ""
        else:  # with later patches stacked on it
            found = "under " + ", ".join(e.patch for e in manifest.above(entry))
        rebuilt = check_update(ctx, manifest, entry, current)
        if rebuilt is not None and rebuilt.outdated:
            return Finding(State.OUTDATED, rebuilt.detail(entry), data, entry, rebuilt=rebuilt)
        return Finding(State.APPLIED, ", ".join(filter(None, (options_text(entry.options), found))), data, entry,
                       rebuilt=rebuilt)
    if entry is not None and (why := replaced(ctx, entry, current, manifest)):
        return Finding(State.REPLACED, why, data, entry)
    if entry is not None:
        return _edited(ctx, manifest, ref, target, entry, options, data)
    source, _ = text(target.path, data)
    try:
        rewritten = ref.load().rewrite(source, options)
    except LegacyPatched as exc:
        return Finding(State.LEGACY, f"patched by the legacy script ({exc.reason})", data, entry, refusal=exc)
    except NeedsBase as exc:  # the patch beneath it is not applied yet: this one is not, either
        return Finding(State.NOT_APPLIED, exc.reason, data, None, refusal=exc)
    except Refusal as exc:
        return Finding(State.CONFLICT, refusal_detail(exc, ctx.layout.display(target.path)), data, entry,
                       refusal=exc)
    if rewritten.source == source:
        return Finding(State.APPLIED_UNRECORDED, "the patch is in the file but not in the manifest; "
                       "`apply` records it", data, None, rewritten)
    return Finding(State.NOT_APPLIED, "; ".join(rewritten.notes), data, None, rewritten)


def _edited(ctx: Context, manifest: mf.Manifest, ref: PatchRef, target: Target, entry: mf.Entry,
            options: Mapping[str, str], data: bytes) -> Finding:
    """A recorded file edited since apply: ``drifted`` where revert keeps the edits, else ``conflict``."""
    try:
        undo = take_out_stack(ctx, manifest, entry, data)
    except Abort as exc:
        if exc.code != Code.STATE:
            raise
        return Finding(State.CONFLICT, f"edited since apply, and revert cannot take the patch out: {exc}",
                       data, entry)
    if undo.how in (How.MERGED, How.RESTORE):
        return Finding(State.DRIFTED, "applied, with later edits that revert keeps", data, entry)
    if undo.how in (How.ORIGINAL, How.FORGET):  # reached only through the patches stacked on it
        return Finding(State.REPLACED, undo.detail, data, entry)
    if undo.outdated:  # no record of what the earlier version wrote: nothing to merge the edits against
        return Finding(State.CONFLICT, undo.detail, data, entry, outdated=True)
    source, _ = text(target.path, data)
    try:
        ref.load().rewrite(source, options)
    except Refusal as exc:
        return Finding(State.CONFLICT, "edited inside the patched region: "
                       + refusal_detail(exc, ctx.layout.display(target.path)), data, entry, refusal=exc)
    return Finding(State.CONFLICT, "edited inside the patched region since apply", data, entry)


def refusal_detail(exc: Refusal, display: str) -> str:
    places = ", ".join(f"{display}:{n}" for n in exc.lines)
    where = (" at " if exc.at else "; candidates: ") + places if exc.lines else ""
    return f"{exc.reason}{where}" + (f"; {exc.hint}" if exc.hint else "")


def options_text(options: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


# ---------------------------------------------------------------- status and verify


def selected(refs: list[PatchRef] | None, manifest: mf.Manifest) -> list[PatchRef]:
    """``refs``; where none were named, the default patches and every patch the manifest records, in order."""
    if refs is not None:
        return refs
    recorded = {e.patch for e in manifest.entries}
    return [p for p in PATCHES if p.default or p.id in recorded]


def status(ctx: Context, refs: list[PatchRef] | None = None, *, check: bool = False) -> Report:
    """Each file's state for ``refs`` (None: the default patches and every recorded one); never writes."""
    report = Report("status", check=check)
    try:
        loaded = load(ctx)
        refs = selected(refs, loaded.manifest)
        if loaded.journal:
            report.notes.append(f"an interrupted run left {ctx.layout.display(ctx.journal_path)}; "
                                "the next apply or revert finishes it")
        for ref in refs:
            for target in targets(ctx, ref):
                report.items.append(_status_item(ctx, loaded.manifest, ref, target))
        report.notes.extend(unknown_notes(ctx, loaded.manifest))
        report.notes.extend(import_notes(ctx, loaded.manifest, report.items))
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


def import_notes(ctx: Context, manifest: mf.Manifest, items: list[Item]) -> list[str]:
    """Where ``import toto`` leads, worded from the rows: a copy is called patched only while a patch is in it."""
    if not any(e.base == "toto" for e in manifest.entries):
        return []
    resolved = installed_toto()
    tree = ctx.layout.toto_parent
    if _holds_a_patch(ctx, manifest, items):
        copy = f"the patched copy {tree / 'toto'}"
    else:
        copy = f"{tree / 'toto'}, where totopatch recorded patches that are no longer in the files (see the rows)"
    if resolved is None:
        return [f"`import toto` does not resolve in this Python; totopatch's copy is {copy}"]
    if not (resolved / "toto" / "__init__.py").is_file():
        return [f"`import toto` finds only leftovers in {resolved / 'toto'} (no __init__.py): "
                "toto-ts is not installed there"]
    if resolved != tree.resolve():
        return [f"warning: `import toto` resolves to {resolved / 'toto'}, not {copy}"]
    return [f"`import toto` resolves to {copy}"]


def _holds_a_patch(ctx: Context, manifest: mf.Manifest, items: list[Item]) -> bool:
    """Whether a recorded patch is in the Toto tree now: from the rows shown, else from the files' hashes."""
    shown = [i for i in items if i.target in TARGETS and TARGETS[i.target].base == "toto"]
    if shown:
        return any(i.state in (State.APPLIED, State.OUTDATED, State.DRIFTED) for i in shown)
    for entry in manifest.entries:
        data = read(ctx.layout.resolve(entry.base, entry.file)) if entry.base == "toto" else None
        if data is not None and sha256(data) in (entry.after_sha256, manifest.top_sha256(entry)):
            return True
    return False


def verify(ctx: Context, refs: list[PatchRef] | None = None) -> Report:
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
