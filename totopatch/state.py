"""The state folder: the manifest and the journal of an interrupted run, always read together."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import manifest as mf
from .fsio import sha256
from .layout import Layout
from .outcome import Abort, Code
from .reading import read


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

    @property
    def lock_path(self) -> Path:
        return self.layout.state_dir / "lock"


@dataclass(frozen=True)
class Loaded:
    """The manifest with the journal of an interrupted run replayed against the files' actual hashes."""

    manifest: mf.Manifest
    journal: list[mf.JournalItem]
    recorded: mf.Manifest  # the manifest as it is on disk


def load(ctx: Context) -> Loaded:
    try:
        recorded, journal = mf.load(ctx.manifest_path), mf.load_journal(ctx.journal_path)
    except mf.StateError as exc:
        raise Abort(Code.STATE, str(exc)) from None
    manifest = mf.replay(recorded, journal, current_hashes(ctx, journal)) if journal else recorded
    return Loaded(manifest, journal, recorded)


def current_hashes(ctx: Context, items: list[mf.JournalItem]) -> dict[tuple[str, str], str | None]:
    hashes: dict[tuple[str, str], str | None] = {}
    for item in items:
        data = read(ctx.layout.resolve(item.entry.base, item.entry.file))
        hashes[(item.entry.base, item.entry.file)] = None if data is None else sha256(data)
    return hashes


def bind(ctx: Context, manifest: mf.Manifest) -> mf.Manifest:
    """The manifest as saved: it names the tree it belongs to."""
    from dataclasses import replace

    return replace(manifest, toto_dir=str(ctx.layout.toto_parent))
