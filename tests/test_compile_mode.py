from __future__ import annotations

from textwrap import dedent

import pytest

from conftest import SAMPLE_BACKTEST
from totopatch.patches import compile_mode
from totopatch.spec import Refusal

LOADER = '''\
import os


def load_toto_pipeline():
    compile_mode_env = (
        os.getenv("REAL_TOTO_COMPILE_MODE")
        or os.getenv("TOTO_COMPILE_MODE")
        or {first}
    )
    compile_mode = (compile_mode_env or "").strip() or {second}
    return compile_mode
'''


def loader(first: str = '"max-autotune"', second: str = '"max-autotune"') -> str:
    return LOADER.format(first=first, second=second)


@pytest.mark.parametrize(
    ("source", "mode", "expected"),
    [
        pytest.param(loader(), "reduce-overhead", loader('"reduce-overhead"', '"reduce-overhead"'), id="both-literals"),
        pytest.param(loader("'max-autotune'", "'max-autotune'"), "reduce-overhead",
                     loader("'reduce-overhead'", "'reduce-overhead'"), id="single-quotes-kept"),
        pytest.param(loader(), "max-autotune-no-cudagraphs",
                     loader('"max-autotune-no-cudagraphs"', '"max-autotune-no-cudagraphs"'), id="chosen-mode"),
        pytest.param(loader('"reduce-overhead"'), "reduce-overhead",
                     loader('"reduce-overhead"', '"reduce-overhead"'), id="half-switched-finished"),
        pytest.param(loader().replace("\n", "\r\n"), "default",
                     loader('"default"', '"default"').replace("\n", "\r\n"), id="crlf"),
        pytest.param(
            dedent('''\
                import os
                def load():
                    mode = os.environ.get("TOTO_COMPILE_MODE") or "max-autotune"  # keep me
                    return mode
            '''),
            "reduce-overhead",
            dedent('''\
                import os
                def load():
                    mode = os.environ.get("TOTO_COMPILE_MODE") or "reduce-overhead"  # keep me
                    return mode
            '''),
            id="environ-get-single-line",
        ),
    ],
)
def test_compile_mode_fixes(source: str, mode: str, expected: str) -> None:
    assert compile_mode.rewrite(source, {"compile_mode": mode}).source == expected


def test_compile_mode_reports_half_switched_file() -> None:
    notes = compile_mode.rewrite(loader('"reduce-overhead"'), {}).notes
    assert len(notes) == 1 and "half-switched" in notes[0] and "line 10" in notes[0]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(loader('"reduce-overhead"', '"reduce-overhead"'), id="already-applied"),
        pytest.param(dedent('''\
            import os
            def load_toto():
                mode = os.getenv("TOTO_COMPILE_MODE") or "reduce-overhead"
                kronos = os.getenv("KRONOS_COMPILE_MODE", "max-autotune")
                chronos = os.getenv("CHRONOS_COMPILE_MODE") or "max-autotune"
                os.environ.setdefault("TOTO_COMPILE_MODE", "max-autotune")
                log("falling back to 'max-autotune'")
                """Docstring: "max-autotune" was the default."""
                return mode
        '''), id="lookalikes-untouched"),
    ],
)
def test_compile_mode_noop(source: str) -> None:
    assert compile_mode.rewrite(source, {"compile_mode": "reduce-overhead"}).source == source


def test_compile_mode_sample_changes_exactly_two_lines() -> None:
    source = SAMPLE_BACKTEST.decode()
    out = compile_mode.rewrite(source, {}).source
    changed = [(a, b) for a, b in zip(source.splitlines(), out.splitlines()) if a != b]
    assert len(source.splitlines()) == len(out.splitlines())
    assert changed == [
        ('        or "max-autotune"  # fastest kernels, slow first call',
         '        or "reduce-overhead"  # fastest kernels, slow first call'),
        ("    compile_mode = (compile_mode_env or \"\").strip() or 'max-autotune'",
         "    compile_mode = (compile_mode_env or \"\").strip() or 'reduce-overhead'"),
    ]


@pytest.mark.parametrize(
    ("source", "reason", "lines"),
    [
        pytest.param("import os\nMODE = 'max-autotune'\n", "no Toto loader", (), id="absent"),
        pytest.param(
            "import os\nMODE = os.getenv('TOTO_COMPILE_MODE') or 'max-autotune'\n", "no Toto loader", (),
            id="module-level-is-not-a-loader",
        ),
        pytest.param(
            dedent('''\
                import os
                def a():
                    m = os.getenv("TOTO_COMPILE_MODE") or "max-autotune"
                def b():
                    m = os.getenv("REAL_TOTO_COMPILE_MODE") or "max-autotune"
            '''),
            "ambiguous", (3, 5), id="two-loaders",
        ),
        pytest.param(loader('"turbo"'), "not a known compile mode", (8,), id="unknown-literal"),
        pytest.param("def broken(:\n", "not valid Python", (1,), id="syntax-error"),
    ],
)
def test_compile_mode_refuses(source: str, reason: str, lines: tuple[int, ...]) -> None:
    with pytest.raises(Refusal) as exc:
        compile_mode.rewrite(source, {})
    assert reason in exc.value.reason
    assert exc.value.lines == lines
