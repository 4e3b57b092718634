"""The state folder's life in one place: read, lock, begin, keep, record, finish, recover.

Like quilt's ``.pc`` or git's index, ``<state>/`` holds what totopatch knows::

    manifest.json     what is applied, with hashes (``manifest``)
    journal.json      a run under way: the entries it completes; once recorded, the backups it no longer needs
    lock              flock'ed by the run that writes
    backups/<sha256>  files kept by content: backups, and copies kept aside
    saved/<name>      the user's versions that ``revert --force`` replaced

A writing run goes ``begin`` (journal) -> ``keep`` (backups) -> the target writes (``transaction``) ->
``record`` (manifest) -> ``finish`` (clear what is no longer needed, drop the journal).  A run killed
anywhere in between is finished by the next one's ``recover``, and read in memory by ``load``, with one
replay rule for both.

The invariant this module holds: a backup or a copy kept aside is deleted only when its bytes are provably
held by another file (the target itself, a backup the manifest records, or ``<state>/backups/<sha256>``), or
are a recorded patch's output on bytes so held (a patch stacked on another has that one's output as its
backup: it is made again from the original, never an original itself).  Otherwise it is kept in
``<state>/backups/<sha256>`` and the run says where.  ``<state>/backups/`` and ``<state>/saved/`` keep
whatever no entry records.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping

from . import manifest as mf
from .fsio import TMP_PREFIX, Lock, atomic_write, crash_point, remove_stale_temps, sha256
from .layout import TARGETS
from .outcome import Abort, Code, Report
from .reading import read, text
from .spec import NeedsBase, Patch
from .state import Context, bind, check_owner


@dataclass(frozen=True)
class Loaded:
    """The manifest with the journal of an interrupted run replayed against the files as they are."""

    manifest: mf.Manifest
    journal: list[mf.JournalItem]  # the entries an interrupted run meant to record
    recorded: mf.Manifest  # the manifest as it is on disk
    pending: tuple[tuple[str, str], ...] = ()  # backups a recorded run had still to clear

    @property
    def interrupted(self) -> bool:
        return bool(self.journal or self.pending)


class StateFolder:
    """One project's (or one installed package's) ``<state>/`` folder."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.layout = ctx.layout
        self.path = ctx.layout.state_dir
        self.backups = self.path / "backups"
        self.saved = self.path / "saved"

    # ------------------------------------------------------------ reading

    def load(self) -> Loaded:
        """The manifest and journal, validated, with the journal replayed; raise Abort(STATE) if untrusted."""
        try:
            recorded, journal = mf.load(self.ctx.manifest_path), mf.load_journal(self.ctx.journal_path)
        except mf.StateError as exc:
            raise Abort(Code.STATE, str(exc)) from None
        check_owner(self.ctx, recorded)
        manifest = self.replay(recorded, journal.items) if journal.items else recorded
        return Loaded(manifest, list(journal.items), recorded, journal.discard)

    def replay(self, recorded: mf.Manifest, items: Iterable[mf.JournalItem]) -> mf.Manifest:
        """Record what an interrupted run did, decided from the files as they are now.

        Per file, in the order the run wrote it: the file holding what the k-th change left means the first
        k happened; holding what it held before the run, none.  A file edited since: an ``add`` happened
        unless the backup it writes first is missing or the patch's change is provably not in the file
        (``_unpatched``); a ``remove`` only on that proof.  So a change written and then edited stays
        recorded (status shows it, revert can act on it), and a record is dropped only on proof.  Changes that
        record a file without writing it are taken whole or not at all, each with its backups (``_whole``).
        """
        items = list(items)
        by_file: dict[Path, list[int]] = {}
        for index, item in enumerate(items):
            by_file.setdefault(self.layout.resolve(item.entry.base, item.entry.file), []).append(index)
        done: dict[int, bool] = {}
        for path, indexes in by_file.items():
            done.update(zip(indexes, self._happened(path, [items[i] for i in indexes])))
        manifest = recorded
        for index, item in enumerate(items):
            if done[index]:
                manifest = manifest.with_entry(item.entry) if item.op == "add" else manifest.without(item.entry)
        return manifest

    def _happened(self, path: Path, group: list[mf.JournalItem]) -> list[bool]:
        return self._whole(group, self._by_the_file(path, group))

    def _whole(self, group: list[mf.JournalItem], flags: list[bool]) -> list[bool]:
        """Items that record the file without writing it (a drifted stack recorded as it stands, a patch found in
        the file) happened together or not at all, and only with the backups they write first: the file's bytes
        prove none of them, and half of them would record half a stack.  A later item the file proves happened
        proves them too."""
        out, start = list(flags), 0
        while start < len(group):
            end = start
            while end < len(group) and group[end].result_sha256 == group[end].from_sha256:
                end += 1
            if end == start:
                start += 1
                continue
            run = group[start:end]
            done = all(out[start:end]) and all(i.op != "add" or not i.entry.backup_created
                                               or self._backed_up(i.entry) for i in run)
            out[start:end] = [done or any(out[end:])] * len(run)
            start = end
        return out

    def _by_the_file(self, path: Path, group: list[mf.JournalItem]) -> list[bool]:
        try:
            data, readable = read(path), True
        except Abort:
            data, readable = None, False
        current = None if data is None else sha256(data)
        if readable:
            for k in reversed(range(len(group))):
                if current == group[k].result_sha256:
                    return [i <= k for i in range(len(group))]
            first = group[0]
            before = first.from_sha256 or (first.entry.before_sha256 if first.op == "add" else None)
            if current is not None and current == before:
                return [False] * len(group)
        flags, below = [], True
        for item in group:
            if item.op == "add" and item.entry.backup_created and not self._backed_up(item.entry):
                below = False  # its backup is written before the file: without it, the file was not written
            unpatched = data is not None and self._unpatched(item.entry, path, data)
            flags.append(below and (not unpatched if item.op == "add" else unpatched))
            below = flags[-1]
        return flags

    def _backed_up(self, entry: mf.Entry) -> bool:
        data = _read_quietly(self.layout.resolve(entry.backup_base, entry.backup))
        return data is not None and sha256(data) == entry.backup_sha256

    def _unpatched(self, entry: mf.Entry, path: Path, data: bytes) -> bool:
        """Whether ``data`` provably lacks ``entry``'s change: every hunk the patch made is in its old form.

        The patch's change is recomputed from the verified backup and checked against the recorded hash;
        then each hunk's old lines must be in the file and none of its new lines, and the patch must still
        change the file.  Anything less (a partial edit, a missing backup, an unknown patch) is no proof.
        """
        from .patches import by_id

        ref = by_id(entry.patch)
        backup = _read_quietly(self.layout.resolve(entry.backup_base, entry.backup))
        if ref is None or backup is None or sha256(backup) != entry.before_sha256:
            return False
        options = {**ref.options, **{k: v for k, v in entry.options.items() if k in ref.options}}
        try:
            patch = ref.load()
            before, encode = text(path, backup)
            after = patch.rewrite(before, options).source
            current, _ = text(path, data)
            if sha256(encode(after)) != entry.after_sha256 or _still_in(patch, current, options):
                return False
        except Exception:  # a refusal, an undecodable file, anything the patch cannot read: no proof
            return False
        old, new, now = before.splitlines(True), after.splitlines(True), current.splitlines(True)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            if (i1 < i2 and not _holds(now, old[i1:i2])) or (j1 < j2 and _holds(now, new[j1:j2])):
                return False
        return True

    # ------------------------------------------------------------ the lock

    def probe(self) -> None:
        """Fail fast, creating nothing, if another run holds the lock (or the lock is not a file)."""
        self._check_shape()
        Lock.probe(self.ctx.lock_path)

    def lock(self) -> Lock:
        self._check_shape()
        return Lock(self.ctx.lock_path)

    def _check_shape(self) -> None:
        """The lock must be a file and backups/, saved/ folders, where they exist."""
        for path, want, ok in ((self.ctx.lock_path, "the lock file", os.path.isfile),
                               (self.backups, "a folder of backups", os.path.isdir),
                               (self.saved, "a folder of saved versions", os.path.isdir)):
            if os.path.lexists(path) and not ok(path):
                raise Abort(Code.STATE, f"{path}: expected {want}, found something else; move it aside")

    # ------------------------------------------------------------ a writing run

    def begin(self, items: list[mf.JournalItem], discard: Iterable[Path]) -> mf.Journal:
        """Write the journal: the entries this run completes and the backups it will no longer need."""
        journal = mf.Journal(tuple(items), tuple(self.name(p) for p in discard))
        mf.save_journal(self.ctx.journal_path, journal)
        return journal

    def keep(self, path: Path, data: bytes) -> None:
        """Write a backup, a copy kept aside or a saved version (atomically, mode 0644)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, 0o644, crash="mid-backup")

    def record(self, manifest: mf.Manifest) -> None:
        """Save the manifest: from here on the run has happened."""
        mf.save(self.ctx.manifest_path, bind(self.ctx, manifest))

    def abort(self) -> None:
        """Drop the journal of a run whose files were all rolled back."""
        self.ctx.journal_path.unlink(missing_ok=True)

    def finish(self, manifest: mf.Manifest, journal: mf.Journal, report: Report,
               earlier: Iterable[mf.Entry] = ()) -> None:
        """After ``record``: clear the backups the run no longer needs, then drop the journal.

        ``earlier`` are the entries the manifest held before the run: what their patches made is not an original.
        """
        crash_point("after-manifest")
        self._clear(manifest, journal.discard, report, "mid-cleanup", quiet=True,
                    owners=[*journal.items, *(mf.JournalItem("remove", e, None) for e in earlier)])

    # ------------------------------------------------------------ recovery

    def recover(self, report: Report) -> mf.Manifest:
        """Under the lock: record what an interrupted run wrote, and clear only what is held elsewhere."""
        folders = {self.path, self.backups, self.saved}
        loaded = self.load()
        for item in loaded.journal:
            path = self.layout.resolve(item.entry.base, item.entry.file)
            folders |= {path.parent, self.layout.resolve(item.entry.backup_base, item.entry.backup).parent}
        for folder in sorted(folders):
            with contextlib.suppress(OSError):
                for temp in remove_stale_temps(folder):
                    report.notes.append(f"removed {self.layout.display(temp)} left by an interrupted write")
        if not loaded.interrupted:
            return loaded.manifest
        orphans = tuple((i.entry.backup_base, i.entry.backup) for i in loaded.journal
                        if i.op == "add" and i.entry.backup_created)
        if loaded.journal:
            self._io(lambda: self.record(loaded.manifest))
            report.notes.append("finished recording a run that was interrupted")
            crash_point("recover-after-manifest")
        self._clear(loaded.manifest, tuple(dict.fromkeys(loaded.pending + orphans)), report,
                    "recover-mid-cleanup", quiet=False, owners=loaded.journal)
        return loaded.manifest

    # ------------------------------------------------------------ clearing backups

    def _clear(self, manifest: mf.Manifest, discard: tuple[tuple[str, str], ...], report: Report, point: str,
               *, quiet: bool, owners: Iterable[mf.JournalItem] = ()) -> None:
        """Retire each backup in ``discard``, then drop the journal; a failure here is a note, never a loss."""
        entries = list(manifest.entries) + [i.entry for i in owners]
        try:
            if discard:
                mf.save_journal(self.ctx.journal_path, mf.Journal((), discard))  # recorded: only clearing is left
            for index, (base, rel) in enumerate(discard):
                self._retire(base, rel, manifest, entries, report, quiet)
                if index == 0:
                    crash_point(point)
            self.ctx.journal_path.unlink(missing_ok=True)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            report.notes.append(f"{where}could not clear a backup no longer needed ({exc.strerror or exc}); "
                                f"{self.layout.display(self.ctx.journal_path)} keeps the list, the next run retries")

    def _retire(self, base: str, rel: str, manifest: mf.Manifest, entries: list[mf.Entry], report: Report,
                quiet: bool) -> None:
        """Delete one backup if another file holds its bytes, else keep it as ``<state>/backups/<sha256>``."""
        if not _is_backup_name(base, rel):
            return
        path = self.layout.resolve(base, rel)
        if path in self._recorded_backups(manifest):
            return
        data = _read_quietly(path)
        if data is None:
            return
        digest = sha256(data)
        whose = next((self.layout.display(self.layout.resolve(e.base, e.file)) for e in entries
                      if self.layout.resolve(e.backup_base, e.backup) == path), None)
        holder = self._holder(digest, path, manifest, entries)
        made = None if holder is not None else self._made_by(digest, path, manifest, entries, set())
        if holder is not None or made is not None:
            path.unlink()
            if not quiet:
                held = f"{self.layout.display(holder)} holds the same bytes" if holder is not None else \
                    f"they are what {made[0].patch} makes of {self.layout.display(made[1])}"  # type: ignore[index]
                report.notes.append(f"removed {self.layout.display(path)}, a backup made by an interrupted run; "
                                    f"{held}")
            return
        kept = self.backups / digest
        if kept != path:
            self.keep(kept, data)
            path.unlink()
        owner = next((e for e in entries if self.layout.resolve(e.backup_base, e.backup) == path), None)
        lower = next((e for e in entries if owner is not None and e.after_sha256 == owner.before_sha256
                      and e.before_sha256 != e.after_sha256), None)
        if owner is not None and lower is not None:
            report.notes.append(f"kept {whose} as {lower.patch} left it, which {owner.patch} was applied to, as "
                                f"{self.layout.display(kept)}: no other file holds those bytes, nor the original "
                                f"{lower.patch} made them from")
        elif whose:
            report.notes.append(f"kept the unpatched original of {whose} as {self.layout.display(kept)}: "
                                "the file has changed since, and no other file holds those bytes")
        elif kept != path:
            report.notes.append(f"kept {self.layout.display(path)} as {self.layout.display(kept)}: "
                                "no other file holds those bytes")
        else:
            report.notes.append(f"kept {self.layout.display(kept)}: no other file holds those bytes")

    def _made_by(self, digest: str, not_at: Path, manifest: mf.Manifest, entries: list[mf.Entry],
                 seen: set[str]) -> tuple[mf.Entry, Path] | None:
        """A recorded patch whose output hashes to ``digest``, and a file other than ``not_at`` holding what it
        was applied to (directly, or as the output of a recorded patch beneath it); None where there is none."""
        seen = seen | {digest}
        for entry in entries:
            if entry.after_sha256 != digest or entry.before_sha256 == entry.after_sha256 \
                    or entry.before_sha256 in seen:
                continue
            holder = self._holder(entry.before_sha256, not_at, manifest, entries)
            if holder is None and (beneath := self._made_by(entry.before_sha256, not_at, manifest, entries, seen)):
                holder = beneath[1]
            if holder is not None:
                return entry, holder
        return None

    def kept(self, manifest: mf.Manifest) -> list[Path]:
        """Files of ``<state>/backups/`` that no entry records: copies kept aside, for the user to take."""
        if not self.backups.is_dir():
            return []
        recorded = self._recorded_backups(manifest)
        return sorted(p for p in self.backups.iterdir() if p.is_file() and p not in recorded
                      and not p.name.startswith(TMP_PREFIX))

    def _recorded_backups(self, manifest: mf.Manifest) -> set[Path]:
        paths = {self.layout.resolve(e.backup_base, e.backup) for e in manifest.entries}
        return paths | {self.path / e.legacy_backup for e in manifest.entries if e.legacy_backup}

    def _holder(self, digest: str, not_at: Path, manifest: mf.Manifest, entries: list[mf.Entry]) -> Path | None:
        """A file other than ``not_at`` that holds bytes hashing to ``digest``: kept, recorded, or a target."""
        candidates = [self.backups / digest, *sorted(self._recorded_backups(manifest))]
        candidates += [self.layout.resolve(e.base, e.file) for e in entries]
        candidates += [self.layout.resolve(e.backup_base, e.backup) for e in entries]  # each read as it is now
        candidates += [self.layout.target(key).path for key in TARGETS]
        for path in dict.fromkeys(candidates):
            if path != not_at and (data := _read_quietly(path)) is not None and sha256(data) == digest:
                return path
        return None

    def name(self, path: Path) -> tuple[str, str]:
        """``(base, relative path)`` of a file in the state folder or the trees, the most specific base first."""
        names = []
        for base in mf.BASES:
            with contextlib.suppress(ValueError):
                names.append((base, path.relative_to(self.layout.base_dir(base)).as_posix()))
        if not names:
            raise ValueError(f"{path} lies outside the state folder and the trees")
        return min(names, key=lambda n: len(PurePosixPath(n[1]).parts))

    def _io(self, action: Callable[[], object]) -> None:
        try:
            action()
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise Abort(Code.IO, f"{where}could not finish an interrupted run ({exc.strerror or exc}); "
                        "nothing was lost, the next run retries") from None


def _still_in(patch: Patch, current: str, options: Mapping[str, str]) -> bool:
    """Whether applying ``patch`` to ``current`` would change nothing (its change may be there).

    A patch stacked on another whose edit is not in the file (``NeedsBase``) cannot be there either: after a
    revert of a stack killed past its writes, the file lacks every block of the stack.
    """
    try:
        return patch.rewrite(current, options).source == current
    except NeedsBase:
        return False


def _is_backup_name(base: str, rel: str) -> bool:
    """Only backups are ever cleared: ``<file>.backup`` beside a target, or ``<state>/backups/<name>``."""
    parts = PurePosixPath(rel).parts
    if base == "state":
        return len(parts) == 2 and parts[0] == "backups"
    return rel.endswith(".backup")


def _holds(lines: list[str], block: list[str]) -> bool:
    """Whether ``block`` occurs in ``lines`` as consecutive lines."""
    n = len(block)
    return any(lines[i:i + n] == block for i in range(len(lines) - n + 1))


def _read_quietly(path: Path) -> bytes | None:
    """A regular file's bytes, or None where it is absent or cannot be read."""
    try:
        return read(path)
    except Abort:
        return None
