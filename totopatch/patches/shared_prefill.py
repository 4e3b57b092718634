"""Prefill the context once per forecast: a marked subclass block right after Toto's forecaster class.

Upstream's ``generate_samples`` repeats the context ``samples_per_batch`` times and runs the whole
prefill once per sampling batch, although only the draws differ.  The block of
``shared_prefill_template.py.txt`` beside this module subclasses the forecaster, prefills once at
the input's own batch size, samples the first step from that distribution repeated to upstream's
sampling shape (the same call on the same shape, so the same random numbers for a seed), and copies
the prefill's KV cache into each sampling batch's cache for the later steps.  The original name is
then rebound to the subclass, so ``from toto.inference.forecaster import TotoForecaster`` gets it.

The ``sampling`` option is the block's default sampling: ``exact`` (upstream's random numbers, the same
samples for a seed) or ``same-law`` (only the kept steps drawn: upstream's distribution, other random
numbers).  The block reads ``TOTOPATCH_SAMPLING`` on every forecast, and a value set there wins.

The class is found by structure (the methods ``forecast``, ``generate_samples`` and
``create_affine_transformed``), not by name.  Because the block replaces what ``generate_samples``
does, that method must be one this patch knows: its parameters and its code, compared token by
token (comments, formatting and its docstring do not count), must be those of a supported toto-ts
release.  Anything else is refused.
"""
from __future__ import annotations

import functools
import hashlib
import io
import tokenize
from typing import Callable, Iterable

import libcst as cst

from totopatch.patches._cst import (Lines, lines_of, marked_span, parse, replace_body, template_code,
                                    template_text, uses_name)
from totopatch.patches import SAMPLING_MODES, by_id
from totopatch.spec import Options, Patch, Refusal, Rewrite, refuses_deep_trees

DEFAULT_SAMPLING = by_id("shared-prefill").options["sampling"]  # declared once, in the registry
NEW_CLASS = "TotoForecasterSharedPrefill"
BEGIN, END = "# totopatch shared-prefill: begin", "# totopatch shared-prefill: end"
_BASE = "__FORECASTER_BASE__"
_SAMPLING = "__SAMPLING__"
_METHODS = frozenset({"forecast", "generate_samples", "create_affine_transformed"})
_PARAMS_013 = ("self", "inputs", "prediction_length", "num_samples", "timestamp_seconds", "time_interval_seconds",
               "input_padding_mask", "id_mask", "sampling_batch_size", "use_kv_cache")
_PARAMS_020 = _PARAMS_013 + ("future_exogenous_variables", "num_exogenous_variables")
# sha256 of generate_samples' tokens (docstring, comments and layout left out), per known release.
KNOWN_BODIES = {
    "f8e16fe43108c146f441c190c468bdf52097d546e71a7d103bf3c22e0df90834": "toto-ts 0.1.3, 0.1.4",
    "297c983f669014742145395cf2bccd5c61c1510944d9d92ad5e33faa9646e5ab": "toto-ts 0.2.0",
}
_NEEDED_IMPORTS = ("torch", "replace_extreme_values")
def _is_ours(name: str) -> bool:
    return name == NEW_CLASS or name.startswith("_totopatch_")


def _is_candidate(node: cst.BaseStatement) -> bool:
    return isinstance(node, cst.ClassDef) and _METHODS <= {
        s.name.value for s in node.body.body if isinstance(s, cst.FunctionDef)}


def _method(node: cst.ClassDef, name: str) -> cst.FunctionDef:
    return next(s for s in node.body.body if isinstance(s, cst.FunctionDef) and s.name.value == name)


def _is_docstring(stmt: cst.BaseStatement) -> bool:
    return (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Expr)
            and isinstance(stmt.body[0].value, cst.SimpleString))


@functools.lru_cache(maxsize=16)
def fingerprint(function: cst.FunctionDef) -> str:
    """sha256 of the function's tokens, without its docstring, comments or layout.

    (Kept per node, as ``parse_exact`` keeps the trees of the last 16 texts: a LibCST node is equal only to
    itself, so a text checked again in one process, as status does after apply, is not written out again.)
    """
    body = list(function.body.body)
    if body and _is_docstring(body[0]):
        body = body[1:]
    return _token_hash(cst.Module(body=[function.with_changes(body=function.body.with_changes(body=body))]).code)


@functools.lru_cache(maxsize=4)
def _token_hash(code: str) -> str:
    """(Cached: the stability pass after a rewrite fingerprints the same method again.)"""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()


def _check_forecaster(node: cst.ClassDef, where: Callable[[], tuple[int, ...]]) -> None:
    method = _method(node, "generate_samples")
    params = tuple(p.name.value for p in method.params.params)
    if params not in (_PARAMS_013, _PARAMS_020):
        raise Refusal(f"{node.name.value}.generate_samples has parameters this patch does not know: "
                      f"({', '.join(params)})", where())
    if fingerprint(method) not in KNOWN_BODIES:
        raise Refusal(f"{node.name.value}.generate_samples is not the code of a supported toto-ts release "
                      f"({'; '.join(sorted(set(KNOWN_BODIES.values())))})", where())


def _find_forecaster(body: list[cst.BaseStatement], lines: Lines, skip: range) -> int:
    found = [i for i, s in enumerate(body) if i not in skip and _is_candidate(s)]
    if not found:
        raise Refusal("no forecaster class: expected a class with forecast, generate_samples and "
                      "create_affine_transformed methods")
    if len(found) > 1:
        names = ", ".join(body[i].name.value for i in found)  # type: ignore[attr-defined]
        raise Refusal(f"ambiguous: {len(found)} forecaster classes ({names})", lines(found))
    _check_forecaster(body[found[0]], lambda: lines(found))  # type: ignore[arg-type]
    return found[0]


def _imported_names(body: list[cst.BaseStatement]) -> set[str]:
    """The plain names the module's top-level imports bind."""
    names: set[str] = set()
    for stmt in body:
        for node in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else ():
            if isinstance(node, (cst.Import, cst.ImportFrom)) and not isinstance(node.names, cst.ImportStar):
                bound = [alias.asname.name if alias.asname else alias.name for alias in node.names]
                names.update(b.value for b in bound if isinstance(b, cst.Name))
    return names


def _mentions(text: str) -> int:
    return text.count(NEW_CLASS) + text.count("_totopatch_")


def _check_names(source: str, block_code: list[str], body: list[cst.BaseStatement], lines: Lines,
                 skip: range | set[int]) -> None:
    if missing := [n for n in _NEEDED_IMPORTS if n not in _imported_names(body)]:
        raise Refusal(f"the module does not import {', '.join(missing)} at top level, which the shared prefill needs")
    if _mentions(source) == sum(map(_mentions, block_code)):
        return  # not even in the text outside the block: spares a walk of the whole module
    clash = [i for i, s in enumerate(body) if i not in skip and uses_name(s, _is_ours)]
    if clash:
        raise Refusal(f"the module already uses the name {NEW_CLASS} or a _totopatch_ name outside a "
                      "shared-prefill block", lines(clash))


def _stacked(body: list[cst.BaseStatement], lines: Lines) -> range:
    """The cuda-graphs block stacked on this one, whose ``_totopatch_`` names are its own."""
    from totopatch.patches import cuda_graphs  # it imports this module

    return marked_span(body, lines, cuda_graphs.BEGIN, cuda_graphs.END, "cuda-graphs")


def _template() -> str:
    return template_text("shared_prefill_template.py.txt")


def _filled(base: str, sampling: str) -> str:
    return _template().replace(_BASE, base).replace(_SAMPLING, sampling)


def _block_code(base: str, sampling: str, module: cst.Module) -> list[str]:
    """The template's code for a class named ``base``, sampling ``sampling`` by default, as ``module`` writes it.

    (Built once per newline and indent.)
    """
    return list(template_code(_filled(base, sampling), module))


def _sampling(options: Options) -> str:
    sampling = options.get("sampling", DEFAULT_SAMPLING)
    if sampling not in SAMPLING_MODES:
        raise Refusal(f"sampling option {sampling!r} is not a sampling mode ({', '.join(SAMPLING_MODES)})")
    return sampling


@refuses_deep_trees
def rewrite(source: str, options: Options) -> Rewrite:
    sampling = _sampling(options)
    exact = parse(source)
    module = exact.module
    body = list(module.body)

    def lines(indices: Iterable[int]) -> tuple[int, ...]:
        return lines_of(module, [body[i] for i in indices])

    span = marked_span(body, lines, BEGIN, END, "shared-prefill")
    index = _find_forecaster(body, lines, span)
    current = [exact.statement_code(i) for i in span]  # reused by the proof, if the block is replaced
    _check_names(source, current, body, lines, set(span) | set(_stacked(body, lines)))
    if span and span.start != index + 1:
        raise Refusal(f"the shared-prefill block is not right after class {body[index].name.value}",  # type: ignore
                      lines((index, span.start)))
    base = body[index].name.value  # type: ignore[attr-defined]
    if current == _block_code(base, sampling, module):
        return Rewrite(source)
    notes = (_replaced(current, base, sampling, module),) if span else ()
    # the block goes right after the class; only its lines change
    return Rewrite(replace_body(exact, index + 1, index + 1 + len(span), _block_code(base, sampling, module)), notes)


def _replaced(current: list[str], base: str, sampling: str, module: cst.Module) -> str:
    """What replacing the block ``current`` changes: its default sampling, or the code of another version."""
    was = next((m for m in SAMPLING_MODES if m != sampling and current == _block_code(base, m, module)), None)
    if was is not None:
        return f"switched the default sampling from {was} to {sampling}"
    return "replaced a shared-prefill block written by another totopatch version"


PATCH = Patch(
    id="shared-prefill",
    description="Run the context prefill once per forecast in forecaster.py, shared by every sampling batch",
    targets=("forecaster",),
    rewrite=rewrite,
)
