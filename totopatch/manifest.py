"""The manifest: what totopatch changed, with hashes, so status, verify and revert can prove it.

Schema (version 1), stored as ``<state>/manifest.json``::

    {"schema": 1, "toto_dir": "/abs/dir/holding/the/toto/package" | null,
     "root": "/abs/root" | null, "backtest": "/abs/backtest/script.py" | null,   # the tree it belongs to
     "entries": [Entry, ...]}          # in order of application

Paths in entries are relative to their base: "toto" (the folder that holds the ``toto``
package), "root" (``--root``) or "state" (the state folder).  Absolute paths and ``..``
are rejected, so a manifest can never make totopatch touch a file outside those folders.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .fsio import atomic_write

SCHEMA = 1
BASES = ("toto", "root", "state")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class StateError(Exception):
    """The manifest, the journal or a backup cannot be trusted."""


@dataclass(frozen=True)
class Entry:
    patch: str
    base: str
    file: str
    before_sha256: str
    after_sha256: str
    backup_base: str
    backup: str
    backup_sha256: str
    backup_created: bool
    options: dict[str, str] = field(default_factory=dict)
    totopatch_version: str = ""
    toto_version: str | None = None
    applied_at: str = ""
    legacy_sha256: str | None = None
    legacy_backup: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.patch, self.base, self.file)


@dataclass(frozen=True)
class Manifest:
    toto_dir: str | None = None
    entries: tuple[Entry, ...] = ()
    root: str | None = None
    backtest: str | None = None

    def find(self, patch: str, base: str, file: str) -> Entry | None:
        return next((e for e in self.entries if e.key == (patch, base, file)), None)

    def with_entry(self, entry: Entry) -> "Manifest":
        kept = tuple(e for e in self.entries if e.key != entry.key)
        return replace(self, entries=kept + (entry,))

    def without(self, entry: Entry) -> "Manifest":
        return replace(self, entries=tuple(e for e in self.entries if e.key != entry.key))

    def above(self, entry: Entry) -> tuple[Entry, ...]:
        """The entries of patches applied on top of ``entry``'s in the same file, lowest first.

        Two patches stack like quilt's: the later one's ``before`` is the earlier one's ``after``.
        """
        return self._chain(entry, lambda e, at: e.before_sha256 == at.after_sha256)

    def below(self, entry: Entry) -> tuple[Entry, ...]:
        """The entries ``entry``'s patch was applied on top of in the same file, nearest first."""
        return self._chain(entry, lambda e, at: e.after_sha256 == at.before_sha256)

    def top_sha256(self, entry: Entry) -> str:
        """The file's hash with ``entry``'s patch and every patch stacked on it applied."""
        above = self.above(entry)
        return (above[-1] if above else entry).after_sha256

    def original_sha256(self, entry: Entry) -> str:
        """The file's hash before any of the patches stacked with ``entry``'s."""
        below = self.below(entry)
        return (below[-1] if below else entry).before_sha256

    def _chain(self, entry: Entry, links: Callable[[Entry, Entry], bool]) -> tuple[Entry, ...]:
        chain: list[Entry] = []
        at = entry
        while nxt := next((e for e in self.entries if (e.base, e.file) == (entry.base, entry.file)
                           and e is not entry and e not in chain and links(e, at)), None):
            chain.append(nxt)
            at = nxt
        return tuple(chain)


def load(path: Path) -> Manifest:
    """Read and validate the manifest; a missing file is an empty manifest."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Manifest()
    except OSError as exc:
        raise StateError(f"{path}: cannot read manifest ({exc.strerror})") from None
    return parse(raw, str(path))


def parse(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{where}: manifest is corrupt ({exc}); expected totopatch manifest JSON") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), list):
        raise StateError(f"{where}: not a totopatch manifest of schema {SCHEMA}")
    for name in ("toto_dir", "root", "backtest"):
        if data.get(name) is not None and not isinstance(data.get(name), str):
            raise StateError(f"{where}: {name} must be a string")
    return Manifest(data.get("toto_dir"), tuple(_entry(e, where) for e in data["entries"]), data.get("root"),
                    data.get("backtest"))


def dump(manifest: Manifest) -> bytes:
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "toto_dir": manifest.toto_dir,
        "root": manifest.root,
        "backtest": manifest.backtest,
        "entries": [asdict(e) for e in manifest.entries],
    }
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def save(path: Path, manifest: Manifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dump(manifest), 0o644)


def safe_relpath(value: object, where: str) -> str:
    """Reject anything that could point outside its base folder."""
    if not isinstance(value, str) or not value:
        raise StateError(f"{where}: path must be a non-empty string")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value:
        raise StateError(f"{where}: path {value!r} escapes its base folder; refusing to use this manifest")
    return value


def _entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise StateError(f"{where}: each entry must be an object")
    try:
        entry = Entry(**raw)
    except TypeError as exc:
        raise StateError(f"{where}: bad entry ({exc})") from None
    for name in ("before_sha256", "after_sha256", "backup_sha256"):
        if not isinstance(getattr(entry, name), str) or not _SHA.match(getattr(entry, name)):
            raise StateError(f"{where}: entry {entry.patch}:{entry.file} has a bad {name}")
    if entry.base not in BASES or entry.backup_base not in BASES:
        raise StateError(f"{where}: entry {entry.patch}:{entry.file} has an unknown base")
    if not isinstance(entry.options, dict):
        raise StateError(f"{where}: entry {entry.patch}:{entry.file} has bad options")
    safe_relpath(entry.file, where)
    safe_relpath(entry.backup, where)
    if entry.legacy_backup is not None:
        safe_relpath(entry.legacy_backup, where)
    return entry


@dataclass(frozen=True)
class JournalItem:
    """One intended change: once the file hashes to ``result_sha256``, ``op`` the entry."""

    op: str  # "add" or "remove"
    entry: Entry
    result_sha256: str | None  # None: the file is absent (a forgotten file)


def save_journal(path: Path, items: list[JournalItem]) -> None:
    data = {"schema": SCHEMA, "items": [{"op": i.op, "result_sha256": i.result_sha256, "entry": asdict(i.entry)} for i in items]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), 0o644)


def load_journal(path: Path) -> list[JournalItem]:
    """The changes a killed run meant to make; empty where no run was interrupted."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StateError(f"{path}: cannot read the journal of an interrupted run ({exc.strerror}); "
                         "make it a readable file, or move it aside to drop that run's record") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        data = None
    items = data.get("items") if isinstance(data, dict) and data.get("schema") == SCHEMA else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        found = "an empty file" if not raw.strip() else f"{type(data).__name__ if data is not None else 'not JSON'}"
        raise StateError(f"{path}: not a totopatch journal (expected an object with schema {SCHEMA} and items, "
                         f"found {found}); move it aside, then `totopatch status` shows each file's state") from None
    try:
        out = [JournalItem(i["op"], _entry(i["entry"], str(path)), i["result_sha256"]) for i in items]
    except (KeyError, TypeError) as exc:
        raise StateError(f"{path}: journal of an interrupted run is corrupt (missing {exc}); "
                         "move it aside, then `totopatch status` shows each file's state") from None
    if any(i.op not in ("add", "remove") for i in out):
        raise StateError(f"{path}: journal has an unknown operation")
    if any(i.result_sha256 is not None and not (isinstance(i.result_sha256, str) and _SHA.match(i.result_sha256))
           for i in out):
        raise StateError(f"{path}: journal has a bad result_sha256")
    return out


def replay(manifest: Manifest, items: list[JournalItem], current: dict[tuple[str, str], str | None]) -> Manifest:
    """Bring the manifest in line with what an interrupted run actually wrote."""
    for item in items:
        if current.get((item.entry.base, item.entry.file)) != item.result_sha256:
            continue
        manifest = manifest.with_entry(item.entry) if item.op == "add" else manifest.without(item.entry)
    return manifest
