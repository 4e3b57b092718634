from __future__ import annotations

import pytest

from conftest import installed_toto_package
from totopatch.patches import spacewise_mask
from totopatch.spec import Refusal

GET_MASK = '''\
def _get_mask(self, num_heads, id_mask):
    mask = make_batched_block_mask(id_mask.transpose(-1, -2))
    # Rearrange for space-wise attention
    mask = {call}  # keep
    return mask.expand(-1, num_heads, -1, -1).contiguous()
'''
UPSTREAM = 'rearrange(mask, {q}batch seq_len variate1 variate2 -> (batch seq_len) 1 variate1 variate2{q})'
PATCHED = 'rearrange(mask, {q}batch seq_len variate1 variate2 -> (batch seq_len) variate1 variate2{q}).unsqueeze(1)'


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(GET_MASK.format(call=UPSTREAM.format(q='"')), GET_MASK.format(call=PATCHED.format(q='"')),
                     id="double-quotes"),
        pytest.param(GET_MASK.format(call=UPSTREAM.format(q="'")), GET_MASK.format(call=PATCHED.format(q="'")),
                     id="single-quotes-kept"),
        pytest.param(GET_MASK.format(call=UPSTREAM.format(q='"')).replace("\n", "\r\n"),
                     GET_MASK.format(call=PATCHED.format(q='"')).replace("\n", "\r\n"), id="crlf"),
    ],
)
def test_spacewise_mask_fixes(source: str, expected: str) -> None:
    assert spacewise_mask.rewrite(source, {}).source == expected


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(GET_MASK.format(call=PATCHED.format(q='"')), id="already-applied"),
        pytest.param(GET_MASK.format(call=PATCHED.format(q='"'))
                     + "\nx = rearrange(t, 'batch seq_len d -> (batch seq_len) 1 d')\n", id="other-rearrange-untouched"),
    ],
)
def test_spacewise_mask_noop(source: str) -> None:
    assert spacewise_mask.rewrite(source, {}).source == source


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("x = 1\n", id="absent"),
        pytest.param(GET_MASK.format(call=UPSTREAM.format(q='"')) * 2, id="twice"),
        pytest.param("def broken(:\n", id="syntax-error"),
    ],
)
def test_spacewise_mask_refuses(source: str) -> None:
    with pytest.raises(Refusal):
        spacewise_mask.rewrite(source, {})


def test_spacewise_mask_on_the_installed_transformer_changes_one_line() -> None:
    source = (installed_toto_package() / "model" / "transformer.py").read_text()
    out = spacewise_mask.rewrite(source, {}).source
    changed = [(a, b) for a, b in zip(source.splitlines(), out.splitlines()) if a != b]
    assert len(changed) == 1 and len(source.splitlines()) == len(out.splitlines())
    assert changed[0][1].endswith('-> (batch seq_len) variate1 variate2").unsqueeze(1)')


def test_eager_mask_is_bit_identical() -> None:
    torch = pytest.importorskip("torch")
    from einops import rearrange

    mask = torch.randn(2, 5, 3, 3)
    old = rearrange(mask, "batch seq_len variate1 variate2 -> (batch seq_len) 1 variate1 variate2")
    new = rearrange(mask, "batch seq_len variate1 variate2 -> (batch seq_len) variate1 variate2").unsqueeze(1)
    assert old.shape == new.shape and torch.equal(old.expand(-1, 4, -1, -1), new.expand(-1, 4, -1, -1))
