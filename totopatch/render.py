"""Turn outcomes into text for people, JSON for CI and one-line errors: every line the CLI prints is made here."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from .outcome import Code, Report

JSON_SCHEMA = 1
SEVERITIES = ("error", "warning", "note")
_SEVERITY = re.compile(r"\s*(?:totopatch\s*:\s*)?(error|warning|note)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Output:
    """What the CLI prints for one outcome: ``text`` for people or ``json`` (one object) on stdout, ``error``
    (one line) on stderr, and the exit code."""

    code: int
    text: str
    json: str
    error: str | None = None


def one_line(message: str) -> str:
    """``message`` on one line: each line break, with the blanks around it, becomes one space."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def severity(message: str) -> tuple[str | None, str]:
    """The severity word ``message`` opens with (error, warning or note), and the rest after every such word.

    ``"warning: warning: x"`` is ``("warning", "x")``; of several words the gravest holds: ``"note: warning: x"``
    is ``("warning", "x")``.
    """
    level: str | None = None
    while found := _SEVERITY.match(message):
        word, message = found.group(1).lower(), message[found.end():]
        level = word if level is None else min(level, word, key=SEVERITIES.index)
    return level, message


def error_text(message: str) -> str:
    """An error message as stderr and JSON give it: one line, with no severity word of its own."""
    return severity(one_line(message))[1]


def error_line(message: str) -> str:
    return f"totopatch: error: {error_text(message)}"


def note_text(note: str) -> str:
    """A note as JSON gives it: one line, and a severity word only where it is not a plain note."""
    level, text = severity(one_line(note))
    return text if level in (None, "note") else f"{level}: {text}"


def note_line(note: str, label: str = "note") -> str:
    """``note: <text>``, or ``warning: <text>`` for a note that opens with that word; never two such words."""
    level, text = severity(one_line(note))
    return f"{label if level in (None, 'note') else level}: {text}"


def envelope(command: str | None, code: int, error: str | None) -> dict[str, Any]:
    """The keys every JSON object of the CLI opens with, whatever the command and its exit code."""
    return {"schema": JSON_SCHEMA, "command": command, "ok": code == 0, "exit_code": int(code),
            "error": None if error is None else error_text(error)}


def as_json(report: Report) -> str:
    data = {
        **envelope(report.command or None, report.code, report.error),
        "items": [asdict(i) for i in report.items],
        "notes": [note_text(n) for n in report.notes],
        "smoke": report.smoke,
        "environment": report.environment,
    }
    return json.dumps(data, indent=2)


def report_output(report: Report, show_diff: bool = False, color: bool = False) -> Output:
    return Output(int(report.code), as_text(report, show_diff, color), as_json(report), report.error)


def error_output(command: str | None, code: Code, message: str) -> Output:
    """A command that could not run (or none named): the report of no item, failed with ``message``."""
    return report_output(Report(command or "").fail(code, message))


def text_output(command: str | None, code: int, text: str, **data: Any) -> Output:
    """Plain text (a listing, a help page, what a command printed): as it is, or as the JSON key ``output``."""
    return Output(code, text, json.dumps({**envelope(command, code, None), **(data or {"output": text})}, indent=2))


def as_text(report: Report, show_diff: bool = False, color: bool = False) -> str:
    width = max((len(i.state) for i in report.items), default=0)
    pwidth = max((len(i.patch) for i in report.items), default=0)
    out = []
    for item in report.items:
        detail = f"  ({item.detail})" if item.detail else ""
        out.append(f"{item.state:<{width}}  {item.patch:<{pwidth}}  {item.file}{detail}")
    out += [note_line(n) for n in report.notes]
    if report.smoke is not None:
        out.append(smoke_line(report.smoke))
    if show_diff:
        out += [(color_diff if color else str)(i.diff.rstrip("\n")) for i in report.items if i.diff]
    return "\n".join(out)


def smoke_line(smoke: dict[str, object]) -> str:
    keys = ("device", "graph_breaks", "recompiles_after_warmup", "outputs_match", "max_abs_diff")
    fields = ", ".join(f"{k}={smoke.get(k)}" for k in keys if k in smoke)
    verdict = "ok" if smoke.get("ok") else "FAILED"
    extra = f": {smoke['error']}" if smoke.get("error") else ""
    return f"smoke test {verdict} ({fields}){extra}"


_BOLD, _CYAN, _GREEN, _RED, _RESET = "\x1b[1m", "\x1b[36m", "\x1b[32m", "\x1b[31m", "\x1b[0m"


def color_diff(diff: str) -> str:
    """A unified diff with ANSI colours: file headers bold, hunk headers cyan, additions green, removals red."""
    return "\n".join(_color_line(line) for line in diff.split("\n"))


def _color_line(line: str) -> str:
    if line.startswith(("--- ", "+++ ")):
        return f"{_BOLD}{line}{_RESET}"
    if line.startswith("@@"):
        return f"{_CYAN}{line}{_RESET}"
    if line.startswith("+"):
        return f"{_GREEN}{line}{_RESET}"
    if line.startswith("-"):
        return f"{_RED}{line}{_RESET}"
    return line
