"""``Exact`` writes each top-level node's code once and builds the module's code from it: LibCST's own, byte for byte.

``Exact.code`` decides what ``prove`` accepts, and ``line_of`` where ``replace_body`` splices, so both must be
what LibCST writes itself (``Module.code``, ``Module.code_for_node``) for any text it parses: the patches'
sources with the whitespace and line-ending variants of the fidelity tests, and small modules made of the
odd cases (nothing at all, only comments, no final newline, comments after the last statement).
"""
from __future__ import annotations

import functools

import libcst as cst
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from totopatch.patches import PATCHES
from totopatch.patches._cst import Exact, parse_exact
from totopatch.spec import Refusal
from whitespace_variants import ENDINGS, WHOLE, Case, build, cases, every_kind_at, whole_file


def _check(exact: Exact) -> None:
    module = exact.module
    assert exact.code == module.code
    codes = [module.code_for_node(node) for node in (*module.header, *module.body)]  # LibCST's, each written once
    assert [exact.statement_code(i) for i in range(len(module.body))] == codes[len(module.header):]
    for index in range(len(module.body) + 1):
        assert exact.line_of(index) == sum(code.count("\n") for code in codes[:len(module.header) + index])
    if exact.code == "".join(exact.clean):  # proven: each statement's code is its lines of the text
        for index in range(len(module.body)):
            lines = "".join(exact.clean[exact.line_of(index):exact.line_of(index + 1)])
            code = exact.statement_code(index)
            if index == len(module.body) - 1 and not module.footer and not module.has_trailing_newline:
                assert code.startswith(lines) and code[len(lines):] in ENDINGS  # the line ending LibCST drops
            else:
                assert code == lines


def _fresh(text: str) -> Exact:
    """``text`` parsed again, its code not yet made (``parse_exact`` keeps the Exacts it made)."""
    kept = parse_exact(text)
    return Exact(kept.lines, kept.clean, kept.module, kept.first_line)


@functools.cache
def _sources() -> tuple[Case, ...]:
    return tuple(case for ref in PATCHES for case in cases(ref.id))


@settings(max_examples=40, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_code_of_every_variant_of_the_patches_sources_is_libcsts(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(_sources()), label="source")
    kind = data.draw(st.sampled_from(WHOLE), label="whole file")
    step = data.draw(st.integers(0, 20), label="step")
    lines = data.draw(st.lists(st.integers(0, len(case.lines) - 1), max_size=6), label="lines")
    plan = whole_file(case, kind, every_kind_at(case, sorted(set(lines) | set(case.near[:4])), step),
                      lambda i: ENDINGS[(i + step) % len(ENDINGS)])
    text = build(case, plan, kind).text
    try:
        exact = _fresh(text)
    except Refusal:
        assume(False)
    _check(exact)


UNITS = ("x = 1", "# note", "", "  \t", "\f", "  # indented note", "if x:\n    y = 2\n    # inside",
         "class A:\n  pass", "@d\ndef f(): return 1", "z = (1,\n     2)", '"""doc\nstring"""', "a; b",
         "x = \\\n  1", "\f# after a form feed")


@settings(max_examples=300, deadline=None, print_blob=True)
@given(units=st.lists(st.tuples(st.sampled_from(UNITS), st.sampled_from(ENDINGS)), max_size=8), final=st.booleans())
def test_the_code_of_any_small_module_is_libcsts(units: list[tuple[str, str]], final: bool) -> None:
    text = "".join(unit.replace("\n", ending) + ending for unit, ending in units)
    if not final:
        text = text.rstrip("\r\n")
    try:
        exact = _fresh(text)
    except Refusal:
        assume(False)
    _check(exact)


def test_the_code_of_an_empty_module_is_libcsts() -> None:
    for text in ("", "\n", "\r\n", "# only a comment", "# only a comment\n", "\n\n# a footer"):
        exact = _fresh(text)
        _check(exact)


class _Silent(cst.EmptyLine):
    """A node that writes no token at all (each of LibCST's own writes at least its line ending)."""

    def _codegen_impl(self, state: object, **kwargs: object) -> None:
        pass


def test_a_module_built_by_hand_whose_nodes_write_nothing_gets_libcsts_code() -> None:
    """Where the last node writes no text, its tokens are not known from the text: LibCST writes the module itself."""
    for last in (cst.EmptyLine(indent=False, newline=cst.Newline("")), _Silent()):
        for body in ((), (cst.parse_statement("x = 1\n"),)):
            for final in (True, False):
                module = cst.Module(body=body, footer=[last], has_trailing_newline=final)
                assert Exact((), (), module).code == module.code
