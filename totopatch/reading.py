"""Reading targets and backups: regular files only, decoded without losing a byte."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from .merge import unified
from .outcome import Abort, Code
from .textio import SourceError, decode

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read(path: Path) -> bytes | None:
    """The file's bytes; None if absent.  Anything but a regular file (or a link to one) is refused
    before a byte is read, so a FIFO cannot hang us and /dev/zero cannot fill memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise Abort(Code.PERMISSION, f"{path}: cannot read (permission denied)") from None
    except OSError as exc:
        raise Abort(Code.REFUSED, f"{path}: cannot read ({exc.strerror}); expected a Python file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise Abort(Code.REFUSED, f"{path}: expected a Python file (a regular file or a link to one), "
                        f"found {kind}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise Abort(Code.IO, f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)


def text(path: Path, data: bytes) -> tuple[str, Callable[[str], bytes]]:
    """The source as text, and the function that turns text back into the file's encoding."""
    try:
        source = decode(data)
    except SourceError as exc:
        raise Abort(Code.REFUSED, f"{path}: {exc}") from None
    return source.text, source.encode


def diff(path: Path, old: bytes, new: bytes, display: str) -> str:
    try:
        return unified(text(path, old)[0], text(path, new)[0], display)
    except Abort:
        return ""
