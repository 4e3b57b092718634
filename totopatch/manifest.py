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
import os
import re
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .fsio import atomic_write

SCHEMA = 1
MAX_STATE_BYTES = 4 * 1024 * 1024  # a manifest of every patch on every target is a few KiB
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
    # sha256 of the code of the patch that wrote after_sha256 (``patches.code_sha256``); None in manifests
    # written before this field: status then runs the patch to tell whether the file is outdated
    code_sha256: str | None = None

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

    def stack(self, entry: Entry) -> tuple[Entry, ...]:
        """``entry``'s stack in its file, bottom first: the patches beneath it, it, and those on top of it."""
        return tuple(reversed(self.below(entry))) + (entry,) + self.above(entry)

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
    raw = read_state_file(path, "manifest")
    return Manifest() if raw is None else parse(raw, str(path))


def read_state_file(path: Path, what: str) -> bytes | None:
    """The bytes of a manifest or journal; None if absent.

    Only a regular file of at most ``MAX_STATE_BYTES`` is read, so a FIFO cannot hang a run and a
    link to ``/dev/zero`` or a 1 GB file cannot fill memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the {what} ({exc.strerror}); expected a readable file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path}: the {what} is not a regular file; expected a totopatch {what} file")
        if info.st_size > MAX_STATE_BYTES:
            raise StateError(f"{path}: the {what} is {info.st_size} bytes, more than any totopatch {what} "
                             f"({MAX_STATE_BYTES} at most); refusing to read it")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_STATE_BYTES + 1)
    except OSError as exc:
        raise StateError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    finally:
        os.close(fd)


def strict_json(raw: bytes, where: str, what: str) -> object:
    """Decode UTF-8 JSON as totopatch writes it: no NaN or Infinity, no duplicate keys, no deep nesting."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        reason = "nested too deeply"
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 at byte {exc.start}"
    except ValueError as exc:  # JSONDecodeError, the hooks below, and ints past Python's digit limit
        reason = str(exc)
    raise StateError(f"{where}: {what} is corrupt ({reason}); expected totopatch {what} JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _schema_ok(data: object) -> bool:
    return isinstance(data, dict) and type(data.get("schema")) is int and data.get("schema") == SCHEMA


def parse(raw: bytes, where: str) -> Manifest:
    data = strict_json(raw, where, "manifest")
    if not isinstance(data, dict) or not _schema_ok(data) or not isinstance(data.get("entries"), list):
        raise StateError(f"{where}: not a totopatch manifest of schema {SCHEMA}")
    for name in ("toto_dir", "root", "backtest"):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not _path_text(value)):
            raise StateError(f"{where}: {name} must be a path string")
    manifest = Manifest(data.get("toto_dir"), tuple(_entry(e, where) for e in data["entries"]), data.get("root"),
                        data.get("backtest"))
    check_consistent(manifest.entries, where)
    return manifest


def check_consistent(entries: tuple[Entry, ...], where: str) -> None:
    """Refuse entries whose recorded hashes contradict each other, naming the entry and the contradiction.

    One entry: its backup is its original (``backup_sha256 == before_sha256``).  ``after == before`` is a
    file recorded as found (the patch was already in it, with no earlier original): revert leaves it, so it
    is no link of a stack.  One file: each patch is recorded once, and the entries that changed the file
    stack in chains that neither fork (two patches on top of one, or one on top of two) nor loop.  Two
    chains may share an original: a record left by a file since reinstalled, and the patch applied to it again.
    """
    seen: set[tuple[str, str, str]] = set()
    for e in entries:
        name = f"entry {e.patch}:{e.file}"
        if e.key in seen:
            raise StateError(f"{where}: {name} is recorded twice; refusing to trust this manifest")
        seen.add(e.key)
        if e.backup_sha256 != e.before_sha256:
            raise StateError(f"{where}: {name} has backup_sha256 {e.backup_sha256[:12]} but before_sha256 "
                             f"{e.before_sha256[:12]}; the backup must be the original; refusing to trust this manifest")
        if (e.legacy_sha256 is None) != (e.legacy_backup is None):
            raise StateError(f"{where}: {name} has one of legacy_sha256 and legacy_backup without the other")
    by_file: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        if e.after_sha256 != e.before_sha256:  # a record as found changed nothing: no link of a stack
            by_file.setdefault((e.base, e.file), []).append(e)
    for (_, file), group in by_file.items():
        on: dict[str, list[Entry]] = {}  # before_sha256 -> the entries applied to a file with that hash
        under: dict[str, list[Entry]] = {}  # after_sha256 -> the entries that left it
        for e in group:
            on.setdefault(e.before_sha256, []).append(e)
            under.setdefault(e.after_sha256, []).append(e)
        for e in group:
            for found, where_ in ((on.get(e.after_sha256, []), f"on top of {e.patch}"),
                                  (under.get(e.before_sha256, []), f"under {e.patch}")):
                if len(found) > 1:
                    raise StateError(f"{where}: {file}: patches {', '.join(o.patch for o in found)} are each "
                                     f"recorded {where_}; a stack of patches cannot fork; "
                                     "refusing to trust this manifest")
        done: set[int] = set()
        for start in group:
            seen: set[int] = set()
            at: Entry | None = start
            while at is not None and id(at) not in done:
                if id(at) in seen:
                    names = [e.patch for e in group if id(e) in seen]
                    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                    raise StateError(f"{where}: {file}: the stack of patches {shown} loops back on itself "
                                     f"(each recorded on top of the next); refusing to trust this manifest")
                seen.add(id(at))
                at = next(iter(on.get(at.after_sha256, [])), None)
            done |= seen


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
    atomic_write(path, dump(manifest), 0o644, crash="mid-manifest")


def safe_relpath(value: object, where: str) -> str:
    """Reject anything that could point outside its base folder, or that no file system can name."""
    if not isinstance(value, str) or not value:
        raise StateError(f"{where}: path must be a non-empty string")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value or not pure.parts or not _path_text(value):
        raise StateError(f"{where}: path {value!r} escapes its base folder; refusing to use this manifest")
    return value


def _path_text(value: str) -> bool:
    """Whether ``value`` can name a file: no NUL, encodable for the file system."""
    try:
        return "\x00" not in value and bool(os.fsencode(value))
    except UnicodeError:
        return False


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "patch": (str,), "base": (str,), "file": (str,), "before_sha256": (str,), "after_sha256": (str,),
    "backup_base": (str,), "backup": (str,), "backup_sha256": (str,), "backup_created": (bool,),
    "options": (dict,), "totopatch_version": (str,), "toto_version": (str, type(None)), "applied_at": (str,),
    "legacy_sha256": (str, type(None)), "legacy_backup": (str, type(None)), "code_sha256": (str, type(None)),
}


def _entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise StateError(f"{where}: each entry must be an object")
    try:
        entry = Entry(**raw)
    except TypeError as exc:
        raise StateError(f"{where}: bad entry ({exc})") from None
    name = f"entry {entry.patch}:{entry.file}" if isinstance(entry.patch, str) and isinstance(entry.file, str) \
        else "an entry"
    for field_name, types in _FIELD_TYPES.items():
        if not isinstance(getattr(entry, field_name), types):
            raise StateError(f"{where}: {name} has a bad {field_name} (expected "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)})")
    for field_name in ("before_sha256", "after_sha256", "backup_sha256", "legacy_sha256", "code_sha256"):
        value = getattr(entry, field_name)
        if value is not None and not _SHA.match(value):
            raise StateError(f"{where}: {name} has a bad {field_name}")
    if entry.base not in BASES or entry.backup_base not in BASES:
        raise StateError(f"{where}: {name} has an unknown base")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.options.items()):
        raise StateError(f"{where}: {name} has bad options (expected strings)")
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
    from_sha256: str | None = None  # what the file held before the run wrote it; None: absent, or not known


@dataclass(frozen=True)
class Journal:
    """What a run under way means to do: ``items`` until its manifest is saved, then only ``discard``.

    ``discard`` names the state files (backups) the run no longer needs, as ``(base, path)``; each is deleted
    only once its bytes are provably held elsewhere, and kept aside in ``<state>/backups/`` otherwise.
    """

    items: tuple[JournalItem, ...] = ()
    discard: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items or self.discard)


def save_journal(path: Path, journal: Journal) -> None:
    data = {"schema": SCHEMA,
            "items": [{"op": i.op, "result_sha256": i.result_sha256, "from_sha256": i.from_sha256,
                       "entry": asdict(i.entry)} for i in journal.items],
            "discard": [{"base": base, "path": rel} for base, rel in journal.discard]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), 0o644, crash="mid-journal")


def load_journal(path: Path) -> Journal:
    """The changes a killed run meant to make; empty where no run was interrupted."""
    try:
        raw = read_state_file(path, "journal")
    except StateError as exc:
        raise StateError(f"{exc}; make it a readable file, or move it aside to drop that run's record") from None
    if raw is None:
        return Journal()
    try:
        data: object = strict_json(raw, str(path), "journal")
    except StateError:
        data = None
    items = data.get("items") if isinstance(data, dict) and _schema_ok(data) else None
    discard = data.get("discard", []) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items) or not isinstance(discard, list):
        found = "an empty file" if not raw.strip() else \
            f"{type(data).__name__ if data is not None else 'not JSON, or JSON totopatch does not write'}"
        raise StateError(f"{path}: not a totopatch journal (expected an object with schema {SCHEMA} and items, "
                         f"found {found}); move it aside, then `totopatch status` shows each file's state") from None
    try:
        out = tuple(JournalItem(i["op"], _entry(i["entry"], str(path)), i["result_sha256"], i.get("from_sha256"))
                    for i in items)
        dropped = tuple((d["base"], safe_relpath(d["path"], str(path))) for d in discard)
    except (KeyError, TypeError) as exc:
        raise StateError(f"{path}: journal of an interrupted run is corrupt (missing {exc}); "
                         "move it aside, then `totopatch status` shows each file's state") from None
    if any(i.op not in ("add", "remove") for i in out):
        raise StateError(f"{path}: journal has an unknown operation")
    if any(h is not None and not (isinstance(h, str) and _SHA.match(h))
           for i in out for h in (i.result_sha256, i.from_sha256)):
        raise StateError(f"{path}: journal has a bad result_sha256 or from_sha256")
    # An add's file hashes to its result once done: the entry's after, or, where the run records the entry without
    # writing the file (a drifted stack recorded as it stands), what the file already held: the top of the stack.
    if any(i.op == "add" and i.result_sha256 not in (i.entry.after_sha256, i.from_sha256) for i in out):
        raise StateError(f"{path}: journal adds an entry whose result is not its after_sha256; "
                         "move it aside, then `totopatch status` shows each file's state")
    if any(base not in BASES for base, _ in dropped):
        raise StateError(f"{path}: journal names a file of an unknown base")
    check_consistent(tuple(i.entry for i in out if i.op == "add"), str(path))
    return Journal(out, dropped)
