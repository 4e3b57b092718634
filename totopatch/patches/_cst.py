"""What every patch module does first: parse, or refuse with Python's own line for the error."""
from __future__ import annotations

import ast

import libcst as cst

from totopatch.spec import Refusal


def parse(source: str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise Refusal(f"not valid Python: {exc.message}", (_syntax_error_line(source, exc.raw_line),)) from None


def _syntax_error_line(source: str, fallback: int) -> int:
    """Python's own line for the error (LibCST reports where it gave up)."""
    try:
        compile(source, "<patch target>", "exec", dont_inherit=True, flags=ast.PyCF_ONLY_AST)
    except SyntaxError as exc:
        return exc.lineno or fallback
    return fallback
