"""The kv-cache patch as pure functions: before/after pairs, no-ops, refusals and legacy files."""
from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

import pytest

from conftest import installed_toto_package
from totopatch.patches import kv_cache
from totopatch.spec import LegacyPatched, Refusal

FIXTURES = Path(__file__).parent / "fixtures" / "kv"
TEMPLATE = resources.files("totopatch.patches").joinpath("kv_cache_template.py.txt").read_text(encoding="utf-8")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode()


def upstream_util() -> str:
    return (installed_toto_package() / "model" / "util.py").read_bytes().decode()


def lines_of(text: str) -> list[str]:
    return re.split(r"(?<=\n)", text)


def with_block_after(before: str, cls: str, base: str | None = None) -> str:
    """What the patch must make of ``before``: the template block right after class ``cls``, nothing else."""
    nl = "\r\n" if "\r\n" in before else "\n"
    end = next(n.end_lineno for n in ast.parse(before).body if isinstance(n, ast.ClassDef) and n.name == cls)
    lines = lines_of(before)
    head, tail = "".join(lines[:end]), "".join(lines[end:])
    block = nl + nl + TEMPLATE.replace("__KVCACHE_BASE__", base or cls).replace("\n", nl)
    if not head.endswith("\n"):
        return head + nl + block[: -len(nl)]
    return head + block + tail


LOOKALIKE = '''

class History:
    """Not a KV cache: it has append, __getitem__ and reset, but none of the cache's fields."""

    def __init__(self):
        self.items = []

    def append(self, item):
        self.items.append(item)

    def __getitem__(self, idx):
        return self.items[idx]

    def reset(self):
        self.items.clear()
'''


def _crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def _no_final_newline(text: str) -> str:
    return text.rstrip("\n")


FIXES = [
    pytest.param(upstream_util, "KVCache", None, id="upstream-util"),
    pytest.param(lambda: fixture("fork_tensor_item.py"), "KVCache", None, id="fork-tensor-item"),
    pytest.param(lambda: fixture("fork_list_graph_break.py"), "KVCache", None, id="fork-list-graph-break"),
    pytest.param(lambda: fixture("fork_renamed_alias.py"), "KVCacheOptimized", None, id="fork-renamed-alias"),
    pytest.param(lambda: _crlf(upstream_util()), "KVCache", None, id="upstream-crlf"),
    pytest.param(lambda: _crlf(fixture("fork_renamed_alias.py")), "KVCacheOptimized", None, id="fork-crlf"),
    pytest.param(lambda: _no_final_newline(upstream_util()), "KVCache", None, id="no-final-newline"),
    pytest.param(lambda: fixture("fork_list_graph_break.py") + LOOKALIKE, "KVCache", None, id="lookalike-after"),
    pytest.param(lambda: LOOKALIKE.lstrip() + "\n\n" + fixture("fork_tensor_item.py"), "KVCache", None,
                 id="lookalike-before"),
]


@pytest.mark.parametrize(("before", "cls", "base"), FIXES)
def test_kv_cache_fixes(before, cls, base) -> None:
    source = before()
    result = kv_cache.rewrite(source, {})
    assert result.source == with_block_after(source, cls, base)
    assert result.notes == ()


@pytest.mark.parametrize(("before", "cls", "base"), FIXES)
def test_kv_cache_noop(before, cls, base) -> None:
    patched = kv_cache.rewrite(before(), {}).source
    assert kv_cache.rewrite(patched, {}).source == patched


def test_patched_module_rebinds_every_name_of_the_cache() -> None:
    namespace: dict[str, object] = {}
    source = fixture("fork_renamed_alias.py")
    exec(compile(kv_cache.rewrite(source, {}).source, "fork_renamed_alias.py", "exec"), namespace)
    assert namespace["KVCache"] is namespace["KVCacheOptimized"] is namespace["KVCacheCompileFriendly"]
    assert namespace["KVCacheCompileFriendly"].__mro__[1].__name__ == "KVCacheOptimized"


def test_outdated_block_is_replaced_with_a_note() -> None:
    patched = kv_cache.rewrite(upstream_util(), {}).source
    stale = patched.replace("return self.current_len(self._host_layer_cache_map[layer_idx])", "return 0")
    assert stale != patched
    result = kv_cache.rewrite(stale, {})
    assert result.source == patched
    assert result.notes == ("replaced a kv-cache block written by another totopatch version",)


def test_real_util_copied_to_tmp_round_trips_bytes(tmp_path) -> None:
    target = tmp_path / "util.py"
    target.write_bytes((installed_toto_package() / "model" / "util.py").read_bytes())
    original = target.read_bytes()
    target.write_bytes(kv_cache.rewrite(original.decode(), {}).source.encode())
    patched = target.read_bytes()
    assert patched.startswith(original) and patched[len(original):].startswith(b"\n\n# totopatch kv-cache: begin")
    compile(patched, str(target), "exec")


def _cache_class(name: str = "KVCache", extra: str = "", drop: str = "", decorator: str = "@dataclass") -> str:
    """A minimal cache class of Toto's shape, with a member added or one dropped."""
    members = ["batch_size: int", "num_variates: int", "transformer_layers: list", "num_layers: int",
               "embed_dim: int", "num_heads: int", "max_seq_len: int", "device: torch.device = None",
               "dtype: torch.dtype = None", "use_memory_efficient_attention: bool = True",
               "_keys: torch.Tensor = field(init=False)", "_values: torch.Tensor = field(init=False)",
               "_current_idx: list = field(init=False)", "_layer_cache_map: list = field(init=False)",
               "def __post_init__(self): pass", "def __getitem__(self, layer_idx): pass",
               "def current_len(self, cache_idx): pass", "def seq_len(self, layer_idx): pass",
               "def append(self, layer_idx, kv): pass", "def reset(self): pass"]
    body = [x for x in members if not x.startswith((f"{drop}:", f"def {drop}("))] if drop else members
    body += [extra] if extra else []
    return f"{decorator}\nclass {name}:\n" + "".join(f"    {x}\n" for x in body)


HEAD = "from dataclasses import dataclass, field\n\nimport torch\n\n\n"

REFUSALS = [
    pytest.param("import torch\n\nx = 1\n", "no KV cache class: expected", (), id="no-cache-class"),
    pytest.param(HEAD + LOOKALIKE.lstrip(), "no KV cache class of the known shape: class History is not a @dataclass",
                 (6,), id="lookalike-only"),
    pytest.param(HEAD + _cache_class(decorator=""), "class KVCache is not a @dataclass", (7,), id="not-a-dataclass"),
    pytest.param(HEAD + _cache_class(drop="max_seq_len"), "class KVCache lacks max_seq_len", (7,), id="missing-field"),
    pytest.param(HEAD + _cache_class(drop="reset"), "class KVCache lacks reset", (7,), id="missing-method"),
    pytest.param(HEAD + _cache_class(extra="def truncate(self, n): pass"), "does not know: truncate", (7,),
                 id="unknown-method"),
    pytest.param(HEAD + _cache_class(extra="window: int = 0"), "does not know: window", (7,), id="unknown-field"),
    pytest.param(HEAD + _cache_class(extra="SLOTS = 4"), "statements other than fields and methods", (7,),
                 id="unknown-statement"),
    pytest.param(HEAD + _cache_class().replace("append(self, layer_idx, kv)", "append(self, layer_idx, k, v)"),
                 "unexpected parameters in append", (7,), id="changed-signature"),
    pytest.param(HEAD + _cache_class() + "\n\n" + _cache_class("KVCacheOptimized"),
                 "ambiguous: 2 KV cache classes (KVCache, KVCacheOptimized)", (7, 31), id="two-caches"),
    pytest.param(HEAD.replace("import torch", "import numpy") + _cache_class(), "no top-level `import torch`", (),
                 id="no-torch-import"),
    pytest.param(HEAD + _cache_class() + "\n\nclass KVCacheCompileFriendly:\n    pass\n",
                 "already uses the name KVCacheCompileFriendly", (30,), id="name-taken"),
    pytest.param(HEAD + _cache_class("KVCacheCompileFriendly"), "already uses the name KVCacheCompileFriendly", (7,),
                 id="cache-named-like-the-new-class"),
    pytest.param("import torch\n\nclass KVCache(:\n    pass\n", "not valid Python", (3,), id="syntax-error"),
]


@pytest.mark.parametrize(("source", "reason", "lines"), REFUSALS)
def test_kv_cache_refuses(source, reason, lines) -> None:
    with pytest.raises(Refusal) as info:
        kv_cache.rewrite(source, {})
    assert not isinstance(info.value, LegacyPatched)
    assert reason in info.value.reason and "\n" not in info.value.reason
    assert info.value.lines == lines


def _patched_minimal() -> str:
    return kv_cache.rewrite(HEAD + _cache_class() + "\n\ndef after():\n    pass\n", {}).source


DAMAGED = [
    pytest.param(lambda s: s.replace("  # totopatch kv-cache: end", ""), "damaged kv-cache block", id="end-marker-lost"),
    pytest.param(lambda s: s.replace("# totopatch kv-cache: begin", "# begin"), "damaged kv-cache block",
                 id="begin-marker-lost"),
    pytest.param(lambda s: s.replace("\n\ndef after():\n    pass\n", "").replace(
        "\n\n\n# totopatch kv-cache: begin", "\n\n\ndef after():\n    pass\n\n\n# totopatch kv-cache: begin"),
        "not right after class KVCache", id="block-moved"),
]


@pytest.mark.parametrize(("damage", "reason"), DAMAGED)
def test_kv_cache_refuses_a_damaged_block(damage, reason) -> None:
    damaged = damage(_patched_minimal())
    assert damaged != _patched_minimal()
    with pytest.raises(Refusal, match=reason) as info:
        kv_cache.rewrite(damaged, {})
    assert info.value.lines


# ---------------------------------------------------------------- legacy files

SCRIPT_IMPORT = ("\n# PATCH: Import compile-friendly KVCache\ntry:\n"
                 "    from .util_compile_friendly import KVCacheCompileFriendly as _KVCacheCompileFriendly\n"
                 "    _COMPILE_FRIENDLY_AVAILABLE = True\nexcept ImportError:\n    _COMPILE_FRIENDLY_AVAILABLE = False\n")
SCRIPT_ALIAS = ("\n# PATCH: Use compile-friendly KVCache when available\nif _COMPILE_FRIENDLY_AVAILABLE:\n"
                "    KVCache = _KVCacheCompileFriendly\n")


def import_index(text: str) -> int:
    """Where the old script put its import block: after the last line that starts with from/import."""
    lines = text.split("\n")
    return max((i + 1 for i, line in enumerate(lines) if line.startswith(("from", "import"))), default=0)


def legacy_script(text: str, index: int | None = None) -> str:
    """The old script's edit, as it behaved: one list element inserted, one appended, joined with LF."""
    lines = text.replace("\r\n", "\n").split("\n")  # read_text() turned CRLF into LF
    lines.insert(import_index(text) if index is None else index, SCRIPT_IMPORT)
    lines.append(SCRIPT_ALIAS)
    return "\n".join(lines)


def bare_legacy(text: str) -> str:
    """The same edit as a formatter leaves it: no comments, a blank line inside the try block."""
    anchor = "from ..model.attention import TimeWiseMultiheadAttention\n"
    block = SCRIPT_IMPORT.replace("# PATCH: Import compile-friendly KVCache\n", "").replace(
        "_KVCacheCompileFriendly\n", "_KVCacheCompileFriendly\n\n", 1)
    return text.replace(anchor, anchor + block, 1) + "\n\nif _COMPILE_FRIENDLY_AVAILABLE:\n    KVCache = _KVCacheCompileFriendly\n"


def in_class_body(text: str) -> int:
    """A line index inside the cache class body, as util.py's import index can land in util_optimized.py."""
    return text.split("\n").index("    def reset(self):")


ADOPTABLE = [
    pytest.param(upstream_util, legacy_script, id="util-script"),
    pytest.param(upstream_util, bare_legacy, id="util-formatted"),
    pytest.param(lambda: _no_final_newline(upstream_util()), legacy_script, id="util-no-final-newline"),
    pytest.param(lambda: fixture("fork_tensor_item.py"), lambda t: legacy_script(t, 3), id="optimized-in-docstring"),
    pytest.param(lambda: fixture("fork_list_graph_break.py"), lambda t: legacy_script(t, in_class_body(t)),
                 id="optimized-in-class-body"),
    pytest.param(lambda: fixture("fork_renamed_alias.py"), lambda t: legacy_script(t, 10_000), id="optimized-past-end"),
    pytest.param(lambda: fixture("fork_renamed_alias.py"), lambda t: legacy_script(t, 0), id="optimized-at-start"),
    pytest.param(lambda: _crlf(upstream_util()), lambda t: _crlf(legacy_script(t)), id="util-crlf-windows"),
]


@pytest.mark.parametrize(("original", "edit"), ADOPTABLE)
def test_legacy_file_is_recognised_and_adopted(original, edit) -> None:
    before = original()
    legacy = edit(before)
    with pytest.raises(LegacyPatched) as info:
        kv_cache.rewrite(legacy, {})
    assert len(info.value.lines) == 2
    assert kv_cache.adopt_legacy(legacy) == before


def test_legacy_crlf_file_edited_on_linux_comes_back_as_lf() -> None:
    """read_text() had already turned CRLF into LF: the LF text is the best the file itself tells."""
    assert kv_cache.adopt_legacy(legacy_script(_crlf(upstream_util()))) == upstream_util()


NOT_ADOPTABLE = [
    pytest.param(lambda t: legacy_script(t) + "x = 1\n", "alias is not the file's last statement", id="code-after-alias"),
    pytest.param(lambda t: legacy_script(t).replace(SCRIPT_IMPORT.replace("\n", "", 1), ""), "found 0",
                 id="import-block-removed"),
    pytest.param(lambda t: legacy_script(legacy_script(t)[: -len(SCRIPT_ALIAS) - 1]), "found 2",
                 id="script-run-twice"),
    pytest.param(lambda t: legacy_script(t, in_class_body(t)).replace("AVAILABLE = False\n\n", "AVAILABLE = False\n"),
                 "lost the blank line", id="blank-line-lost"),
    pytest.param(lambda t: legacy_script(t).replace("_COMPILE_FRIENDLY_AVAILABLE = False\n",
                                                    "_COMPILE_FRIENDLY_AVAILABLE = None\n", 1), "found 0",
                 id="edited-block"),
    pytest.param(lambda t: legacy_script(t.replace("import warnings\n", "import warnings\nif _COMPILE_FRIENDLY_AVAILABLE:\n    pass\n")),
                 "more legacy lines", id="extra-legacy-lines"),
]


@pytest.mark.parametrize(("edit", "reason"), NOT_ADOPTABLE)
def test_legacy_file_that_cannot_be_adopted_safely_is_refused(edit, reason) -> None:
    legacy = edit(upstream_util())
    with pytest.raises(LegacyPatched):
        kv_cache.rewrite(legacy, {})
    with pytest.raises(Refusal, match=re.escape(reason)):
        kv_cache.adopt_legacy(legacy)


def test_legacy_file_that_no_longer_parses_is_still_recognised() -> None:
    text = fixture("fork_list_graph_break.py")
    legacy = legacy_script(text, text.split("\n").index("        seq_dim = 2 if self.use_memory_efficient_attention else 3"))
    with pytest.raises(SyntaxError):
        compile(legacy, "util_optimized.py", "exec")
    with pytest.raises(LegacyPatched):
        kv_cache.rewrite(legacy, {})
    assert kv_cache.adopt_legacy(legacy) == text


def test_patch_contract() -> None:
    patch = kv_cache.PATCH
    assert (patch.id, patch.targets, patch.default) == ("kv-cache", ("util", "util_optimized"), True)
    assert patch.rewrite is kv_cache.rewrite and patch.adopt_legacy is kv_cache.adopt_legacy


def test_the_shared_syntax_check_handles_null_bytes() -> None:
    """compile() raises ValueError without .msg or a line for a null byte; the check still answers."""
    from totopatch.textio import syntax_error

    assert syntax_error("x = 1\n") is None
    assert syntax_error("def f(:\n") == (1, "invalid syntax")
    line, message = syntax_error("x = 1\0\n")
    assert line is None and "null" in message
