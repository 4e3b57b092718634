"""What revert makes of one recorded file: the one decision that status, verify, apply and revert share.

``status`` reports ``drifted`` exactly where ``take_out`` merges (revert keeps the user's edits) and
``conflict`` exactly where it does not; ``revert`` writes what ``take_out`` returns; ``apply`` re-records a
drifted file with the merged result as its original.  A merge is accepted only when re-applying the patch
to it gives the user's file back, byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import manifest as mf
from .fsio import sha256
from .layout import installed_as, toto_version
from .merge import three_way
from .outcome import Abort, Code
from .patches import by_id, code_sha256
from .reading import read, text
from .spec import Refusal
from .state import Context
from .textio import SourceError, check_syntax


class How(str, Enum):
    RESTORE = "restore"  # the file is as patched: the verified original goes back
    ORIGINAL = "original"  # the file is the original already (or was recorded as found): nothing to write
    MERGED = "merged"  # edited since apply: the patch's change taken out, the edits kept, proven
    CONFLICT = "conflict"  # edited where the patch changed it: only --force restores the original
    FORGET = "forget"  # deleted, or replaced by another install: the record goes, the file is not written


@dataclass(frozen=True)
class Undo:
    """What revert (without --force) does to one recorded file."""

    how: How
    result: bytes | None = None  # the file's bytes after revert (RESTORE, ORIGINAL, MERGED)
    detail: str = ""
    before: bytes | None = None  # the verified original, where it was read
    outdated: bool = False  # CONFLICT: written by an earlier totopatch, whose output no file holds to merge against


OUTDATED_EDITED = ("applied by an earlier totopatch and edited since; this totopatch cannot take that version's "
                   "change out and keep your edits: `totopatch revert --force` restores the original (your version "
                   "is saved aside), then `totopatch apply`")


def take_out(ctx: Context, manifest: mf.Manifest, entry: mf.Entry, data: bytes | None) -> Undo:
    """What revert does to ``entry``'s file holding ``data``; raise Abort(STATE) where its backup is unverified."""
    if data is None:
        return Undo(How.FORGET, detail="the file is gone")
    current = sha256(data)
    if current != entry.after_sha256 and (why := replaced(ctx, entry, current, manifest)) \
            and current != entry.before_sha256:
        return Undo(How.FORGET, detail=why)  # never one version's bytes into another
    if current == entry.before_sha256:  # needs no backup: it may have gone with a reinstall
        found = entry.before_sha256 == entry.after_sha256
        return Undo(How.ORIGINAL, data, "recorded as found: nothing to undo" if found else "already the original")
    before = verified_backup(ctx, entry)
    if current == entry.after_sha256:
        return Undo(How.RESTORE, before, before=before)
    after = expected_after(ctx, entry, before)
    merged = merge_out(ctx, entry, data, before, after)
    if merged is None and after is None and (ref := by_id(entry.patch)) is not None \
            and entry.code_sha256 != code_sha256(ref):
        return Undo(How.CONFLICT, detail=OUTDATED_EDITED, before=before, outdated=True)
    if merged is None:
        return Undo(How.CONFLICT, detail="edited inside the patched region since apply", before=before)
    return Undo(How.MERGED, merged, "your later edits are kept", before=before)


def take_out_stack(ctx: Context, manifest: mf.Manifest, entry: mf.Entry, data: bytes | None) -> Undo:
    """``take_out`` of ``entry`` once the patches stacked on it are taken out, top first, as a full revert does."""
    for upper in reversed(manifest.above(entry)):
        undo = take_out(ctx, manifest, upper, data)
        if undo.result is not None:
            data = undo.result
    return take_out(ctx, manifest, entry, data)


def unstack(ctx: Context, manifest: mf.Manifest, entry: mf.Entry, data: bytes) -> list[tuple[mf.Entry, bytes, Undo]]:
    """Each entry of ``entry``'s stack, top first, with the bytes revert finds it in and what it makes of them."""
    chain = list(reversed(manifest.above(entry))) + [entry] + list(manifest.below(entry))
    out: list[tuple[mf.Entry, bytes, Undo]] = []
    for each in chain:
        undo = take_out(ctx, manifest, each, data)
        out.append((each, data, undo))
        if undo.result is None:
            break
        data = undo.result
    return out


def replaced(ctx: Context, entry: mf.Entry, current: str, manifest: mf.Manifest | None = None) -> str:
    """Why a recorded file is no longer the file that was patched, or '' where it still is; decided by content.

    Replaced: the package's files are another toto-ts release's (whatever dist-info folders pip left), the
    file holds exactly the bytes some release installed, or it is the unpatched original (or what this
    patch was applied to) again.
    """
    original = manifest.original_sha256(entry) if manifest is not None else entry.before_sha256
    if entry.base == "toto":
        parent = ctx.layout.toto_parent
        now = toto_version(parent)
        if entry.toto_version and now and now != entry.toto_version:
            return f"target replaced: patched toto-ts {entry.toto_version}, now {now}"
        fresh = installed_as(parent, entry.file, current)
        if fresh and current != original:
            return f"target replaced: the file is toto-ts {fresh}'s, as installed"
    if current == original:
        return "target replaced: the file is the unpatched original again (reinstalled?)"
    if current == entry.before_sha256:  # a patch stacked on another, taken out by hand
        return "target replaced: the file is as it was before this patch again"
    return ""


def backup_path(ctx: Context, entry: mf.Entry) -> Path:
    return ctx.layout.resolve(entry.backup_base, entry.backup)


def verified_backup(ctx: Context, entry: mf.Entry) -> bytes:
    """The recorded original's bytes; raise Abort(STATE) where the backup is missing or its hash changed."""
    path = backup_path(ctx, entry)
    data = read(path)
    if data is None:
        raise Abort(Code.STATE, f"{path}: backup is missing; cannot restore {entry.file}")
    if sha256(data) != entry.backup_sha256 or entry.backup_sha256 != entry.before_sha256:
        raise Abort(Code.STATE, f"{path}: backup does not match the manifest's sha256; "
                    "refusing to restore from an unverified backup")
    return data


def options(entry: mf.Entry) -> dict[str, str]:
    """The options the entry was applied with, over the patch's declared defaults."""
    ref = by_id(entry.patch)
    if ref is None:
        return dict(entry.options)
    merged = dict(ref.options)
    merged.update((k, v) for k, v in entry.options.items() if k in merged)
    return merged


def expected_after(ctx: Context, entry: mf.Entry, before: bytes) -> bytes | None:
    """What the patch makes of the original, if that still hashes to what the manifest recorded."""
    ref = by_id(entry.patch)
    if ref is None:
        return None
    path = ctx.layout.resolve(entry.base, entry.file)
    try:
        source, encode = text(path, before)
        after = encode(ref.load().rewrite(source, options(entry)).source)
    except (Refusal, Abort):
        return None
    return after if sha256(after) == entry.after_sha256 else None


def merge_out(ctx: Context, entry: mf.Entry, data: bytes, before: bytes, after: bytes | None) -> bytes | None:
    """The user's file with only the patch's change taken out, proven by re-applying the patch; else None.

    ``after`` is ``expected_after(ctx, entry, before)``.
    """
    ref = by_id(entry.patch)
    if after is None or ref is None:
        return None
    path = ctx.layout.resolve(entry.base, entry.file)
    try:
        after_text, _ = text(path, after)
        before_text, _ = text(path, before)
        current_text, encode = text(path, data)
    except Abort:
        return None
    merged = three_way(after_text, current_text, before_text)
    if merged is None:
        return None
    try:
        check_syntax(merged, str(path))
        if ref.load().rewrite(merged, options(entry)).source != current_text:
            return None
    except (Refusal, SourceError):
        return None
    return encode(merged)
