from __future__ import annotations

from textwrap import dedent

import pytest

from conftest import installed_toto_package
from totopatch.patches import sdpa_causal
from totopatch.spec import Refusal

CALL = '''\
def run_attention(self, attention_mask, q, k, v, seq_pos_offset, dropout):
    return scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal={causal},  # keep
    )
'''
SYMBOLIC = "(attention_mask is None and seq_pos_offset == 0)"
PLAIN = "(True if (attention_mask is None and seq_pos_offset == 0) else False)"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(CALL.format(causal=SYMBOLIC), CALL.format(causal=PLAIN), id="parenthesised"),
        pytest.param(CALL.format(causal=SYMBOLIC.strip("()")),
                     CALL.format(causal="True if (attention_mask is None and seq_pos_offset == 0) else False"),
                     id="bare"),
        pytest.param(CALL.format(causal=SYMBOLIC).replace("\n", "\r\n"),
                     CALL.format(causal=PLAIN).replace("\n", "\r\n"), id="crlf"),
    ],
)
def test_sdpa_causal_fixes(source: str, expected: str) -> None:
    assert sdpa_causal.rewrite(source, {}).source == expected


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(CALL.format(causal=PLAIN), id="already-applied"),
        pytest.param(CALL.format(causal=PLAIN) + "\n\n" + dedent('''\
            def space(q, k, v, mask):
                return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        '''), id="constant-is-causal-elsewhere"),
    ],
)
def test_sdpa_causal_noop(source: str) -> None:
    assert sdpa_causal.rewrite(source, {}).source == source


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        pytest.param("x = 1\n", "found 0", id="absent"),
        pytest.param(CALL.format(causal="is_causal_flag"), "does not know", id="unknown-expression"),
        pytest.param(CALL.format(causal=SYMBOLIC) + CALL.format(causal=SYMBOLIC), "found 2", id="two-calls"),
    ],
)
def test_sdpa_causal_refuses(source: str, reason: str) -> None:
    with pytest.raises(Refusal) as exc:
        sdpa_causal.rewrite(source, {})
    assert reason in exc.value.reason


def test_sdpa_causal_on_the_installed_attention_changes_one_line() -> None:
    source = (installed_toto_package() / "model" / "attention.py").read_text()
    out = sdpa_causal.rewrite(source, {}).source
    changed = [(a, b) for a, b in zip(source.splitlines(), out.splitlines()) if a != b]
    assert len(source.splitlines()) == len(out.splitlines())
    assert changed == [(f"                is_causal={SYMBOLIC},", f"                is_causal={PLAIN},")]


# Only the statements holding an SDPA call are parsed with LibCST; these shapes check the cut and
# the splice (indentation kept, a statement not alone on its lines parsed with its whole top level).
_SHAPES = [
    pytest.param("class A:\n\tdef f(self):\n\t\treturn scaled_dot_product_attention(q, k, v, is_causal={c})\n",
                 id="tab-indented"),
    pytest.param("def f():\n    if ok: return scaled_dot_product_attention(q, k, v, is_causal={c})\n", id="if-suite"),
    pytest.param("def f():\n    x = 1; y = scaled_dot_product_attention(q, k, v, is_causal={c})\n",
                 id="semicolon"),
    pytest.param("def f():\n    y = \\\n  scaled_dot_product_attention(q, k, v, is_causal={c})  # é\n    return y\n",
                 id="backslash-and-comment"),
    pytest.param("def f():\n    s = 'é'; return scaled_dot_product_attention(q, is_causal={c})\n", id="non-ascii-before"),
    pytest.param("@decorate(scaled_dot_product_attention(q, is_causal=False))\ndef f():\n"
                 "    return scaled_dot_product_attention(q, is_causal={c})\n", id="in-a-decorator-too"),
    pytest.param("def f():\r\n    return scaled_dot_product_attention(\r\nq, is_causal={c})\r\n", id="crlf"),
]


@pytest.mark.parametrize("shape", _SHAPES)
def test_sdpa_causal_splices_only_its_statement(shape: str) -> None:
    assert sdpa_causal.rewrite(shape.format(c=SYMBOLIC), {}).source == shape.format(c=PLAIN)
    assert sdpa_causal.rewrite(shape.format(c=PLAIN), {}).source == shape.format(c=PLAIN)


def test_sdpa_causal_refusal_names_the_file_line() -> None:
    source = "import torch\n\n\nclass A:\n    def f(self):\n        return scaled_dot_product_attention(\n" \
             "            q,\n            is_causal=flag,\n        )\n"
    with pytest.raises(Refusal) as exc:
        sdpa_causal.rewrite(source, {})
    assert exc.value.lines == (8,)
