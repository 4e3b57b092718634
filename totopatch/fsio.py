"""File handling that never leaves a half-written file: hashes, atomic writes, the lock."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = ".totopatch-tmp-"


class LockedError(Exception):
    """Another totopatch run holds the lock."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CRASH_POINTS = (
    "after-lock",  # the lock is taken, nothing else done
    "mid-journal",  # half-way through the temp file of the journal
    "mid-backup",  # half-way through the temp file of a backup (or a copy kept aside, or the user's saved version)
    "after-backup",  # a file's backups are written, the file is not
    "mid-write",  # half-way through the temp file of a target
    "after-write",  # a target is written, its manifest entry is not
    "before-manifest",  # every target is written, the manifest is not
    "mid-manifest",  # half-way through the temp file of the manifest
    "after-manifest",  # the manifest is saved; backups no longer needed are not yet cleared, the journal remains
    "mid-cleanup",  # one backup no longer needed is cleared (deleted, or kept aside), the others not
    "recover-after-manifest",  # recovery saved the replayed manifest; the journal is still the interrupted run's
    "recover-mid-cleanup",  # recovery cleared one backup the interrupted run no longer needs, the others not
)


def crash_point(name: str) -> None:
    """Test hook at a named step (``CRASH_POINTS``): TOTOPATCH_TEST_CRASH_AT=name dies with SIGKILL there,
    TOTOPATCH_TEST_PAUSE_AT=name:seconds sleeps there (to make two runs overlap)."""
    if os.environ.get("TOTOPATCH_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause, _, seconds = os.environ.get("TOTOPATCH_TEST_PAUSE_AT", "").partition(":")
    if pause == name:
        time.sleep(float(seconds or 1))


def atomic_write(path: Path, data: bytes, mode: int | None = None, *, crash: str = "mid-write") -> None:
    """Write via a temp file in the same folder, fsync, then os.replace; keep the file mode.

    A symlink is written through: the file it points to changes and the link stays a link.
    ``crash`` names the test crash point half-way through the temp file (see ``crash_point``).
    """
    real = Path(os.path.realpath(path))
    if mode is None:
        try:
            mode = stat.S_IMODE(real.stat().st_mode)
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if os.environ.get("TOTOPATCH_TEST_CRASH_AT") == crash:
                fh.write(data[: len(data) // 2])
                fh.flush()
                crash_point(crash)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(real.parent)


def file_on_path(path: Path) -> Path | None:
    """The first existing non-folder on ``path`` or above it (so ``path`` cannot be a folder), if any."""
    for at in reversed((path, *path.parents)):
        try:
            if not at.is_dir() and at.exists():
                return at
        except OSError:
            return None
    return None


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files that a killed run left in ``folder``."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                entry.unlink()
                removed.append(entry)
    return removed


def clear_bytecode(path: Path) -> None:
    """Drop cached bytecode of ``path`` so the next import compiles the current source."""
    real = Path(os.path.realpath(path))
    cache = real.parent / "__pycache__"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for pyc in cache.glob(f"{real.stem}.*.pyc"):
            with contextlib.suppress(FileNotFoundError):
                pyc.unlink()


def is_hardlinked(path: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).stat().st_nlink > 1
    except FileNotFoundError:
        return False


@dataclass
class Lock:
    """An exclusive flock on ``<state>/lock``; the kernel frees it when the holder dies."""

    path: Path
    fd: int = -1
    stale_pid: int | None = None

    def acquire(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_or_raise(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        previous = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
        self.stale_pid = int(previous) if previous.isdigit() else None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    @staticmethod
    def probe(path: Path) -> None:
        """Fail fast, without creating the lock file, if another run holds it now."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            _flock_or_raise(fd, path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock_or_raise(fd: int, path: Path, patience: float = 1.0) -> None:
    """Take the flock, or raise LockedError naming the holder's pid.

    The holder writes its pid just after taking the lock and clears it just before letting go,
    so an empty file means one of those moments: try again briefly rather than say "unknown".
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if holder or time.monotonic() > deadline:
            who = f"pid {holder}" if holder else "a run that has not written its pid"
            raise LockedError(f"{path}: locked by another totopatch run ({who})")
        time.sleep(0.01)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
