"""What a command found or did: per-file items, and a report whose exit code is computed in one place."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum


class Code(IntEnum):
    OK = 0
    NOT_DESIRED = 1  # status --check / verify found something not applied and intact
    USAGE = 2
    REFUSED = 3  # conflict or unexpected shape; nothing written
    IO = 4  # a write failed; everything was rolled back
    PERMISSION = 5  # a target or the state folder is not writable; nothing written
    LOCKED = 6  # another run holds the lock
    STATE = 7  # the manifest, journal or a backup cannot be trusted
    INTERNAL = 70  # a bug in totopatch (sysexits' EX_SOFTWARE); the error names the exception and where
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class State(str, Enum):
    """Where one patch stands on one file (status, verify) or what a command did to it (apply, revert)."""

    NOT_APPLIED = "not-applied"
    APPLIED = "applied"
    OUTDATED = "outdated"  # applied by an earlier totopatch: the file holds another version of the patch
    DRIFTED = "drifted"
    CONFLICT = "conflict"
    LEGACY = "legacy"
    APPLIED_UNRECORDED = "applied-unrecorded"
    REPLACED = "replaced"
    MISSING = "missing"
    NOT_PRESENT = "not-present"
    REFUSED = "refused"
    UNPROVEN = "unproven"
    ALREADY_APPLIED = "already-applied"
    RECORDED = "recorded"
    UPDATED = "updated"  # an outdated file rebuilt from its original with this totopatch's patches
    REVERTED = "reverted"
    FORGOTTEN = "forgotten"
    SKIPPED = "skipped"
    WOULD_APPLY = "would-apply"
    WOULD_UPDATE = "would-update"
    WOULD_REVERT = "would-revert"
    WOULD_FORGET = "would-forget"

    __str__ = str.__str__
    __format__ = str.__format__


GOOD_STATES = (State.APPLIED, State.NOT_PRESENT)
REFUSING_STATES = (State.CONFLICT, State.LEGACY, State.MISSING, State.REFUSED)
WRITING_STATES = (State.APPLIED, State.RECORDED, State.UPDATED, State.REVERTED, State.FORGOTTEN)
DRY_STATES = {State.APPLIED: State.WOULD_APPLY, State.RECORDED: State.WOULD_APPLY, State.UPDATED: State.WOULD_UPDATE,
              State.REVERTED: State.WOULD_REVERT, State.FORGOTTEN: State.WOULD_FORGET}


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
    error: str | None = None
    error_code: Code | None = None
    check: bool = False  # a state other than GOOD_STATES, or a failed smoke test, fails the command
    smoke: dict[str, object] | None = None
    environment: dict[str, object] | None = None  # status and verify: what the run-time environment overrides

    def fail(self, code: Code, error: str) -> "Report":
        self.error_code, self.error = code, error
        return self

    @property
    def return_code(self) -> Code:
        if self.error_code is not None:
            return self.error_code
        if self.check and any(i.state not in GOOD_STATES for i in self.items):
            return Code.NOT_DESIRED
        if self.check and self.smoke is not None and not self.smoke.get("ok"):
            return Code.NOT_DESIRED
        return Code.OK

    code = return_code


class Abort(Exception):
    """Stop the command with this exit code and one-line message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
