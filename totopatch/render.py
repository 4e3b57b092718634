"""Turn reports into text for people and JSON for CI."""
from __future__ import annotations

import json
from dataclasses import asdict

from .outcome import Report

JSON_SCHEMA = 1


def as_json(report: Report) -> str:
    data = {
        "schema": JSON_SCHEMA,
        "command": report.command,
        "ok": report.code == 0,
        "exit_code": int(report.code),
        "error": report.error,
        "items": [asdict(i) for i in report.items],
        "notes": report.notes,
        "smoke": report.smoke,
        "environment": report.environment,
    }
    return json.dumps(data, indent=2)


def as_text(report: Report, show_diff: bool = False, color: bool = False) -> str:
    width = max((len(i.state) for i in report.items), default=0)
    pwidth = max((len(i.patch) for i in report.items), default=0)
    out = []
    for item in report.items:
        detail = f"  ({item.detail})" if item.detail else ""
        out.append(f"{item.state:<{width}}  {item.patch:<{pwidth}}  {item.file}{detail}")
    out += [f"note: {n}" for n in report.notes]
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
