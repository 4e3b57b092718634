"""Decode Python source bytes to text and back without changing a single byte."""
from __future__ import annotations

import ast
import codecs
import functools
import io
import tokenize
from dataclasses import dataclass

_BOM = codecs.BOM_UTF8


class SourceError(Exception):
    """The file is not Python source totopatch can read."""


@dataclass(frozen=True)
class Source:
    """Text as the patches see it, plus what is needed to turn it back into the same bytes."""

    text: str
    encoding: str
    bom: bool

    def encode(self, text: str) -> bytes:
        data = text.encode(self.encoding)
        return _BOM + data if self.bom else data


def decode(data: bytes) -> Source:
    """Split off a UTF-8 BOM and decode by the PEP 263 cookie; line endings stay as they are."""
    bom = data.startswith(_BOM)
    body = data[len(_BOM):] if bom else data
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(body).readline)
        if encoding == "utf-8-sig":
            encoding = "utf-8"
        text = body.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot decode as Python source ({exc.__class__.__name__}: {exc})") from None
    source = Source(text, encoding, bom)
    if source.encode(text) != data:
        raise SourceError(f"does not round-trip through {encoding}")
    return source


@functools.lru_cache(maxsize=8)
def parse_ast(text: str) -> ast.Module:
    """Python's own parse of ``text``, kept for the few texts a run checks and rewrites (never mutate it).

    A patched file is parsed to check it, then again by the patch's own stability pass; on a 4,300-line
    script each parse costs about 0.1 s.
    """
    return compile(text, "<source>", "exec", dont_inherit=True, flags=ast.PyCF_ONLY_AST)


_PROVED: dict[str, None] = {}  # texts proved to parse without a parse of their own, newest last


def vouch(text: str) -> None:
    """Record that ``text`` parses, as proved from a parse of the text it was spliced from (``patches._cst.spliced``)."""
    _PROVED[text] = None
    while len(_PROVED) > 8:
        del _PROVED[next(iter(_PROVED))]


def syntax_error(text: str) -> tuple[int | None, str] | None:
    """Python's own (line, message) for the first syntax error in ``text``; None when it parses.

    A null byte raises ValueError, which has neither a line nor ``msg``.
    """
    if text in _PROVED:
        return None
    try:
        parse_ast(text)
    except SyntaxError as exc:
        return exc.lineno, str(exc.msg)
    except ValueError as exc:
        return None, str(exc)
    return None


def check_syntax(text: str, filename: str) -> None:
    """Raise SourceError if ``text`` is not valid Python."""
    error = syntax_error(text)
    if error is not None:
        line, message = error
        where = f" at line {line}" if line else ""
        raise SourceError(f"is not valid Python{where}: {message}")
