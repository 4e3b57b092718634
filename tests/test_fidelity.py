"""Bytes the patch does not mean to change survive apply and revert: CRLF, BOM, cookie, final newline."""
from __future__ import annotations

import codecs

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SAMPLE_BACKTEST
from totopatch.patches import compile_mode
from totopatch.textio import decode

CM = "compile-mode"
TEXT = SAMPLE_BACKTEST.decode()


def variant(crlf: bool, bom: bool, final_newline: bool, cookie: bool) -> bytes:
    text = TEXT if final_newline else TEXT.rstrip("\n")
    if cookie:
        text = "# -*- coding: latin-1 -*-\n# caf\xe9\n" + text
    if crlf:
        text = text.replace("\n", "\r\n")
    data = text.encode("latin-1" if cookie else "utf-8")
    return codecs.BOM_UTF8 + data if bom and not cookie else data


def expected_after(data: bytes) -> bytes:
    source = decode(data)
    return source.encode(compile_mode.rewrite(source.text, {}).source)


def check_round_trip(project, cli, data: bytes) -> None:
    target = project / "backtest_test3_inline.py"
    target.write_bytes(data)
    assert cli(project, "apply", CM).exit_code == 0
    patched = target.read_bytes()
    assert patched == expected_after(data)
    old_lines, new_lines = data.split(b"\n"), patched.split(b"\n")
    assert len(old_lines) == len(new_lines) and patched[:3] == data[:3]
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(changed) == 2 and all(a.replace(b"max-autotune", b"reduce-overhead") == b for a, b in changed)
    assert cli(project, "revert", CM).exit_code == 0
    assert target.read_bytes() == data


def test_crlf_bom_and_no_final_newline(project, cli) -> None:
    check_round_trip(project, cli, variant(crlf=True, bom=True, final_newline=False, cookie=False))


def test_latin1_cookie(project, cli) -> None:
    check_round_trip(project, cli, variant(crlf=False, bom=False, final_newline=True, cookie=True))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans(), cookie=st.booleans())
def test_every_variant_round_trips(project, cli, crlf, bom, final_newline, cookie) -> None:
    (project / ".totopatch").mkdir(exist_ok=True)
    check_round_trip(project, cli, variant(crlf, bom, final_newline, cookie))
