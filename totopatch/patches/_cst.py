"""What every patch module does first: parse, or refuse with Python's own line for the error."""
from __future__ import annotations

import ast
from typing import Callable

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


def marked_span(body: list[cst.BaseStatement], line: Callable[[int], int], begin: str, end: str,
                patch_id: str) -> range:
    """Indices of a marked block's statements (``begin`` comment above the first, ``end`` after the last)."""
    begins = [i for i, s in enumerate(body) if any(ln.comment and ln.comment.value.startswith(begin)
                                                   for ln in s.leading_lines)]
    ends = [i for i, s in enumerate(body) if isinstance(s, cst.SimpleStatementLine)
            and s.trailing_whitespace.comment and s.trailing_whitespace.comment.value.startswith(end)]
    if not begins and not ends:
        return range(0)
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise Refusal(f"damaged {patch_id} block: its begin/end markers do not pair up", tuple(map(line, begins + ends)))
    return range(begins[0], ends[0] + 1)
