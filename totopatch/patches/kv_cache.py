"""Make Toto's KV cache compile-friendly: a marked subclass block right after the cache class.

The cache class is found by structure (a ``@dataclass`` with Toto's fields and methods), not by
name, so forks that rename it (``KVCacheOptimized``) or rewrote its bodies still match.  After
it goes the block of ``kv_cache_template.py.txt`` beside it: ``KVCacheCompileFriendly``
subclasses it and keeps the write heads and the layer map as host-side ints, so dynamo traces
every cache read and write (no ``.item()``, no graph break) and a buffer of another length is a
dynamic size, not a recompile; ``reset`` runs eagerly.  The original name is then rebound to
it, so ``from ..model.util import KVCache`` gets the new class.  Everything outside the block
stays byte for byte.  A marked block that differs from the template is replaced (a note says so).
Files edited by the old text-based script raise ``LegacyPatched``; ``adopt_legacy`` removes
exactly its lines.

Pair it with ``sdpa-causal``: with upstream's SymBool ``is_causal`` every decode step still
breaks the graph in each layer, and the per-layer frames that follow recompile per layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import libcst as cst

from totopatch.patches._cst import (Lines, lines_of, marked_span, parse, replace_body, template_code,
                                    template_text, uses_name)
from totopatch.spec import LegacyPatched, Options, Patch, Refusal, Rewrite, refuses_deep_trees
from totopatch.textio import syntax_error

NEW_CLASS = "KVCacheCompileFriendly"
BEGIN, END = "# totopatch kv-cache: begin", "# totopatch kv-cache: end"
_BASE = "__KVCACHE_BASE__"
FIELDS = frozenset({"batch_size", "num_variates", "transformer_layers", "num_layers", "embed_dim", "num_heads",
                    "max_seq_len", "device", "dtype", "use_memory_efficient_attention",
                    "_keys", "_values", "_current_idx", "_layer_cache_map"})
METHODS = {"__post_init__": 1, "__getitem__": 2, "current_len": 2, "seq_len": 2, "append": 3, "reset": 1}


def _is_dataclass_decorator(decorator: cst.Decorator) -> bool:
    """``@dataclass``, ``@dataclasses.dataclass``, either called with arguments or not."""
    node = decorator.decorator
    if isinstance(node, cst.Call):
        node = node.func
    return ((isinstance(node, cst.Name) and node.value == "dataclass")
            or (isinstance(node, cst.Attribute) and node.attr.value == "dataclass"))


def _is_import_torch(stmt: cst.BaseStatement) -> bool:
    """A top-level ``import torch`` (possibly among other names), not ``import torch as t``."""
    return isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Import) \
        and any(isinstance(a.name, cst.Name) and a.name.value == "torch" and a.asname is None
                for a in stmt.body[0].names)


def _is_field(stmt: cst.BaseStatement) -> bool:
    return (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1
            and isinstance(stmt.body[0], cst.AnnAssign) and isinstance(stmt.body[0].target, cst.Name))


def _is_docstring_or_pass(stmt: cst.BaseStatement) -> bool:
    if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
        return False
    only = stmt.body[0]
    return isinstance(only, cst.Pass) or (isinstance(only, cst.Expr) and isinstance(only.value, cst.SimpleString))


@dataclass(frozen=True)
class Shape:
    """What a top-level class declares: its fields, methods (with arity) and anything else."""

    node: cst.ClassDef
    index: int
    fields: frozenset[str]
    methods: dict[str, int]
    others: int

    @property
    def is_candidate(self) -> bool:
        return len(self.methods.keys() & METHODS.keys() - {"__post_init__"}) >= 3 or {"_keys", "_values"} <= self.fields

    def mismatch(self) -> str | None:
        """Why this class is not Toto's cache, or None when it is."""
        name = self.node.name.value
        if not any(_is_dataclass_decorator(d) for d in self.node.decorators):
            return f"class {name} is not a @dataclass"
        if missing := sorted(FIELDS - self.fields) + sorted(METHODS.keys() - self.methods.keys()):
            return f"class {name} lacks {', '.join(missing)}"
        if extra := sorted(self.fields - FIELDS) + sorted(self.methods.keys() - METHODS.keys()):
            return f"class {name} has members this patch does not know: {', '.join(extra)}"
        if bad := sorted(k for k, n in METHODS.items() if self.methods[k] != n):
            return f"class {name}: unexpected parameters in {', '.join(bad)}"
        return f"class {name} has statements other than fields and methods" if self.others else None


def _shape(node: cst.ClassDef, index: int) -> Shape:
    fields: set[str] = set()
    methods: dict[str, int] = {}
    others = 0
    for stmt in node.body.body:
        if isinstance(stmt, cst.FunctionDef):
            methods[stmt.name.value] = len(stmt.params.params)
        elif _is_field(stmt):
            fields.add(stmt.body[0].target.value)
        elif not _is_docstring_or_pass(stmt):
            others += 1
    return Shape(node, index, frozenset(fields), methods, others)


def _block_span(body: list[cst.BaseStatement], lines: Lines) -> range:
    """Indices of the marked block's statements (empty when the module has none)."""
    return marked_span(body, lines, BEGIN, END, "kv-cache")


def _find_cache(body: list[cst.BaseStatement], lines: Lines, skip: range) -> Shape:
    """The one KV cache class of the module, or a Refusal naming the candidates."""
    shapes = [_shape(s, i) for i, s in enumerate(body) if isinstance(s, cst.ClassDef) and i not in skip]
    candidates = [s for s in shapes if s.is_candidate]
    found = [s for s in candidates if s.mismatch() is None]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(s.node.name.value for s in found)
        raise Refusal(f"ambiguous: {len(found)} KV cache classes ({names})", lines(s.index for s in found))
    if candidates:
        raise Refusal(f"no KV cache class of the known shape: {candidates[0].mismatch()}",
                      lines(s.index for s in candidates))
    raise Refusal("no KV cache class: expected a @dataclass with Toto's KVCache fields and methods")


def _template() -> str:
    return template_text("kv_cache_template.py.txt")


def _block_code(base: str, module: cst.Module) -> list[str]:
    """The code of the template's statements for a class named ``base`` as ``module`` writes it (built once per newline and indent)."""
    return list(template_code(_template().replace(_BASE, base), module))


def _check_names(source: str, block_code: list[str], body: list[cst.BaseStatement], lines: Lines,
                 skip: range) -> None:
    if not any(_is_import_torch(s) for s in body):
        raise Refusal("the module has no top-level `import torch`, which the compile-friendly cache needs")
    if source.count(NEW_CLASS) == sum(code.count(NEW_CLASS) for code in block_code):
        return  # not even in the text outside the block: spares a walk of the whole module
    clash = [i for i, s in enumerate(body) if i not in skip and uses_name(s, NEW_CLASS.__eq__)]
    if clash:
        raise Refusal(f"the module already uses the name {NEW_CLASS} outside a kv-cache block",
                      lines(clash))


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    _refuse_legacy(source)
    exact = parse(source)
    module = exact.module
    body = list(module.body)

    def lines(indices: Iterable[int]) -> tuple[int, ...]:
        return lines_of(module, [body[i] for i in indices])

    span = _block_span(body, lines)
    cache = _find_cache(body, lines, span)
    current = [exact.statement_code(i) for i in span]  # reused by the proof, if the block is replaced
    _check_names(source, current, body, lines, span)
    if span and span.start != cache.index + 1:
        raise Refusal(f"the kv-cache block is not right after class {cache.node.name.value}",
                      lines((cache.index, span.start)))
    if current == _block_code(cache.node.name.value, module):
        return Rewrite(source)
    notes = ("replaced a kv-cache block written by another totopatch version",) if span else ()
    start = cache.index + 1  # the block goes right after the class; only its lines change
    return Rewrite(replace_body(exact, start, start + len(span), _block_code(cache.node.name.value, module)), notes)


# ---------------------------------------------------------------- the old text-based script

_LEGACY_MARK = re.compile(r"^[ \t]*(?:from[ \t]+[.\w]*util_compile_friendly[ \t]+import\b"
                          r"|if[ \t]+_COMPILE_FRIENDLY_AVAILABLE[ \t]*:)", re.MULTILINE)
# The script inserted, after the last import: a blank line, (its "# PATCH: ..." comment,) the
# try/except block; with the comment it also left a blank line after the block (a list element
# ending in a newline, then "\n".join).  At the end it appended a blank line, (a comment,) the alias.
_LEGACY_IMPORT = re.compile(
    r"(?:(?<=\n)|\A)(?P<nl>\r?\n)(?P<header>#[^\r\n]*(?P=nl))?try:(?P=nl)"
    r"[ \t]+from[ \t]+[.\w]*util_compile_friendly[ \t]+import[ \t]+KVCacheCompileFriendly[ \t]+as[ \t]+"
    r"_KVCacheCompileFriendly[ \t]*(?P=nl)(?:(?P=nl))?"
    r"[ \t]+_COMPILE_FRIENDLY_AVAILABLE[ \t]*=[ \t]*True[ \t]*(?P=nl)"
    r"except[ \t]+ImportError[ \t]*:(?P=nl)[ \t]+_COMPILE_FRIENDLY_AVAILABLE[ \t]*=[ \t]*False[ \t]*(?P=nl)")
_LEGACY_ALIAS = re.compile(
    r"(?P<nl>\r?\n)(?P=nl)(?:#[^\r\n]*(?P=nl))?if[ \t]+_COMPILE_FRIENDLY_AVAILABLE[ \t]*:(?P=nl)"
    r"[ \t]+KVCache[ \t]*=[ \t]*_KVCacheCompileFriendly[ \t]*(?P=nl)\Z")


def _legacy_lines(source: str) -> tuple[int, ...]:
    return tuple(source.count("\n", 0, hit.start()) + 1 for hit in _LEGACY_MARK.finditer(source))


def _refuse_legacy(source: str) -> None:
    if lines := _legacy_lines(source):
        raise LegacyPatched("util_compile_friendly import or `if _COMPILE_FRIENDLY_AVAILABLE:` alias "
                            f"at line {', '.join(map(str, lines))}", lines)


def adopt_legacy(source: str) -> str:
    """The file as it was before the old script: its import block and its alias removed, or a Refusal."""
    alias = _LEGACY_ALIAS.search(source)
    if alias is None:
        raise Refusal("the `if _COMPILE_FRIENDLY_AVAILABLE:` alias is not the file's last statement "
                      "in the form the old script appended", _legacy_lines(source))
    text = source[:alias.start()]
    blocks = list(_LEGACY_IMPORT.finditer(text))
    if len(blocks) != 1:
        raise Refusal(f"expected one legacy import block in the old script's form, found {len(blocks)}",
                      _legacy_lines(text))
    start, end = blocks[0].span()
    if blocks[0]["header"]:
        if text.startswith(blocks[0]["nl"], end):
            end += len(blocks[0]["nl"])
        elif end == len(text) and text.endswith(blocks[0]["nl"], 0, start):
            start -= len(blocks[0]["nl"])
        else:
            raise Refusal("the legacy import block lost the blank line the old script left after it",
                          _legacy_lines(text))
    cleaned = text[:start] + text[end:]
    if _legacy_lines(cleaned):
        raise Refusal("more legacy lines than the old script wrote", _legacy_lines(cleaned))
    error = syntax_error(cleaned)
    if error is not None:
        line, message = error
        raise Refusal(f"removing the legacy lines leaves invalid Python ({message})", (line,) if line else ()) from None
    return cleaned


PATCH = Patch(
    id="kv-cache",
    description="Make Toto's KVCache traceable: host-side ints (no .item() syncs), pooled static buffers",
    targets=("util", "util_optimized"),
    rewrite=rewrite,
    adopt_legacy=adopt_legacy,
)
