"""What every patch module shares: parse or refuse with Python's own line, and node line numbers."""
from __future__ import annotations

from typing import Iterable

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from totopatch.spec import Refusal
from totopatch.textio import syntax_error


def parse(source: str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        error = syntax_error(source)  # Python's own line for the error (LibCST reports where it gave up)
        line = error[0] if error is not None and error[0] else exc.raw_line
        raise Refusal(f"not valid Python: {exc.message}", (line,)) from None


def lines_of(module: cst.Module, nodes: Iterable[cst.CSTNode]) -> tuple[int, ...]:
    """1-based start lines of ``nodes`` (metadata is costly: call it only for refusals and notes)."""
    positions = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    return tuple(positions[node].start.line for node in nodes)
