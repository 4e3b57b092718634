"""Decode Python source bytes to text and back without changing a single byte."""
from __future__ import annotations

import ast
import codecs
import functools
import re
import sys
import tokenize
from dataclasses import dataclass
from typing import NamedTuple

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
    lines = iter(body.splitlines(keepends=True))  # CR, LF and CRLF end a line, as in Python's tokenizer
    try:
        encoding, _ = tokenize.detect_encoding(lambda: next(lines, b""))
        if encoding == "utf-8-sig":
            encoding = "utf-8"
        text = body.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot decode as Python source ({exc.__class__.__name__}: {exc})") from None
    source = Source(text, encoding, bom)
    if source.encode(text) != data:
        raise SourceError(f"does not round-trip through {encoding}")
    return source


RUNNING = f"Python {sys.version_info.major}.{sys.version_info.minor}"


class TooDeep(SyntaxError):
    """Python's own parser gave up on the nesting (a RecursionError or MemoryError inside ``compile``).

    A SyntaxError without a line, so that every caller that handles syntax errors handles it; its message
    says what happened (Python cannot compile the file either, so the script would not run).
    """


def parse_ast(text: str) -> ast.Module:
    """Python's own parse of ``text``, kept for the few texts a run checks and rewrites (never mutate it).

    A patched file is parsed to check it, then again by the patch's own stability pass; on a 4,300-line
    script each parse costs about 0.1 s.  Raises SyntaxError (``TooDeep`` for nesting beyond the parser's
    limits) or ValueError (a null byte); failures are kept too, since a 200,000-term sum takes 0.6 s to fail.
    """
    result = _parse(text)
    if isinstance(result, Exception):
        raise result
    return result


@functools.lru_cache(maxsize=8)
def _parse(text: str) -> ast.Module | SyntaxError | ValueError:
    try:
        return compile(text, "<source>", "exec", dont_inherit=True, flags=ast.PyCF_ONLY_AST)
    except (SyntaxError, ValueError) as exc:
        return exc
    except (RecursionError, MemoryError) as exc:
        return TooDeep(f"nested too deeply for {RUNNING}'s parser ({exc.__class__.__name__}: {exc})")


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


class Problem(NamedTuple):
    """Why Python cannot parse a text: its line (None where there is none), what is wrong, and what to do."""

    line: int | None
    phrase: str
    hint: str = ""


def parse_problem(text: str) -> Problem | None:
    """Why Python cannot parse ``text``; None when it parses.

    A syntax error is told apart from nesting beyond Python's parser and from syntax of a newer Python
    than the one running (which ``newer_syntax`` names), so that a refusal says what to do.
    """
    if text in _PROVED:
        return None
    try:
        parse_ast(text)
    except TooDeep as exc:
        return Problem(None, str(exc.msg), "Python cannot compile the file either")
    except SyntaxError as exc:
        newer = newer_syntax(text, exc.lineno, str(exc.msg))
        if newer is None:
            return Problem(exc.lineno, f"not valid Python: {exc.msg}")
        feature, version = newer
        needs = "may need" if feature.startswith("this f-string") else "needs"
        return Problem(exc.lineno, f"{RUNNING}'s grammar cannot parse {feature}, which {needs} Python {version} or "
                       f"later ({exc.msg})", f"run totopatch with the Python {version}+ that runs this code")
    except ValueError as exc:
        return Problem(None, f"not valid Python: {exc}")
    return None


_NEWER = (  # the error line's syntax, what it is, the first Python whose grammar has it
    (re.compile(r"\s*type\s+\w+\s*\[[^\]]*="), "a type parameter default (PEP 696)", (3, 13)),
    (re.compile(r"\s*(?:async\s+)?(?:def|class)\s+\w+\s*\[[^\]]*="), "a type parameter default (PEP 696)", (3, 13)),
    (re.compile(r"\s*type\s+\w+\s*[\[=]"), "a `type` statement (PEP 695)", (3, 12)),
    (re.compile(r"\s*(?:async\s+)?(?:def|class)\s+\w+\s*\["), "a type parameter list (PEP 695)", (3, 12)),
    (re.compile(r".*(?<![\w.'\"])[tT][rR]?['\"]"), "a template string (PEP 750)", (3, 14)),
)


def newer_syntax(text: str, line: int | None, message: str) -> tuple[str, str] | None:
    """(the feature, the Python version it needs) where Python's syntax error at ``line`` is syntax of a newer Python.

    Python's parser says only "invalid syntax" or "expected '('"; the error line's first tokens tell
    the newer statements apart, and Python 3.11 starts every f-string error with "f-string".
    """
    lines = split_python_lines(text) if line else []
    source_line = lines[line - 1] if line and line <= len(lines) else ""
    for pattern, feature, version in _NEWER:
        if sys.version_info[:2] < version and pattern.match(source_line):
            return feature, f"{version[0]}.{version[1]}"
    if message.startswith("f-string") and sys.version_info[:2] < (3, 12):  # maybe only broken: "may" below
        return "this f-string (quotes, backslashes or comments inside its braces, PEP 701)", "3.12"
    return None


_BREAKS = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def split_python_lines(text: str) -> list[str]:
    """Lines with their endings, broken where Python breaks them (``\\n``, ``\\r\\n``, ``\\r``)."""
    return _BREAKS.findall(text)


def check_syntax(text: str, filename: str) -> None:
    """Raise SourceError if Python cannot parse ``text`` (a syntax error, too deep, newer syntax)."""
    problem = parse_problem(text)
    if problem is not None:
        where = f" at line {problem.line}" if problem.line else ""
        raise SourceError(f"{problem.phrase}{where}" + (f"; {problem.hint}" if problem.hint else ""))
