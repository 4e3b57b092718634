from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from conftest import SAMPLE_BACKTEST
from realistic_backtest import realistic_script
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
        pytest.param(
            'import os; x = 1\r@staticmethod\rdef load(): mode = os.getenv("TOTO_COMPILE_MODE") or "max-autotune"',
            "default",
            'import os; x = 1\r@staticmethod\rdef load(): mode = os.getenv("TOTO_COMPILE_MODE") or "default"',
            id="cr-endings-decorator-shared-line",
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
            "import os\nBACKEND = os.getenv('TOTO_COMPILE_BACKEND') or 'inductor'\n", "no Toto loader", (),
            id="backend-chain-alone-is-not-a-loader",
        ),
        pytest.param(
            dedent('''\
                import os
                MODE = os.getenv("TOTO_COMPILE_MODE") or "reduce-overhead"
                def load():
                    mode = os.getenv("REAL_TOTO_COMPILE_MODE") or "max-autotune"
            '''),
            "ambiguous", (2, 4), id="module-level-and-function",
        ),
        pytest.param(
            dedent('''\
                import os
                class Runner:
                    def __init__(self):
                        if True:
                            mode = os.getenv("TOTO_COMPILE_MODE") or "inductor"
            '''),
            "not a known compile mode", (5,), id="mode-chain-ending-in-a-backend",
        ),
        pytest.param('import os\ndef load(): return os.getenv("TOTO_COMPILE_MODE") or "max-autotune"\n',
                     "no Toto loader", (), id="returned-chain-is-not-a-loader"),
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


FIXTURES = Path(__file__).parent / "fixtures" / "backtest"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def changed_lines(before: str, after: str) -> list[tuple[int, str, str]]:
    """(line number, before, after) of every changed line; the line count must not change."""
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new)
    return [(n, a, b) for n, (a, b) in enumerate(zip(old, new), 1) if a != b]


MODE_LINE = '        or "max-autotune"'
FALLBACK = '    compile_mode = (compile_mode_env or "").strip() or "{}"'


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        pytest.param("backend_chain_multiline.py", "reduce-overhead", [
            (8, MODE_LINE, '        or "reduce-overhead"'),
            (10, FALLBACK.format("max-autotune"), FALLBACK.format("reduce-overhead")),
        ], id="backend-chain-multiline"),
        pytest.param("backend_chain_one_line.py", "reduce-overhead", [
            (8, MODE_LINE, '        or "reduce-overhead"'),
            (10, FALLBACK.format("max-autotune"), FALLBACK.format("reduce-overhead")),
        ], id="backend-chain-one-line"),
        pytest.param("backend_chain_one_line.py", "max-autotune-no-cudagraphs", [
            (8, MODE_LINE, '        or "max-autotune-no-cudagraphs"'),
            (10, FALLBACK.format("max-autotune"), FALLBACK.format("max-autotune-no-cudagraphs")),
        ], id="backend-chain-other-mode"),
        pytest.param("half_fixed_comment.py", "reduce-overhead", [
            (10, FALLBACK.format("max-autotune"), FALLBACK.format("reduce-overhead")),
        ], id="trailing-comment-half-fixed"),
        pytest.param("half_fixed_comment.py", "default", [
            (8, '        or "reduce-overhead"  # Changed from max-autotune to avoid recompilations',
             '        or "default"  # Changed from max-autotune to avoid recompilations'),
            (10, FALLBACK.format("max-autotune"), FALLBACK.format("default")),
        ], id="trailing-comment-kept"),
        pytest.param("early_module_level.py", "default", [
            (10, '        compile_mode = os.getenv("REAL_TOTO_COMPILE_MODE") or os.getenv("TOTO_COMPILE_MODE") '
                 'or "reduce-overhead"',
             '        compile_mode = os.getenv("REAL_TOTO_COMPILE_MODE") or os.getenv("TOTO_COMPILE_MODE") or "default"'),
        ], id="early-module-level-default"),
        pytest.param("early_method.py", "max-autotune", [
            (12, '                compile_mode = os.getenv("REAL_TOTO_COMPILE_MODE") or os.getenv("TOTO_COMPILE_MODE") '
                 'or "reduce-overhead"',
             '                compile_mode = os.getenv("REAL_TOTO_COMPILE_MODE") or os.getenv("TOTO_COMPILE_MODE") '
                 'or "max-autotune"'),
        ], id="early-method-max-autotune"),
        pytest.param("all_shapes.py", "reduce-overhead", [
            (24, '            compile_mode = (compile_mode_env or "").strip() or "max-autotune"',
             '            compile_mode = (compile_mode_env or "").strip() or "reduce-overhead"'),
        ], id="all-shapes-in-one-loader"),
        pytest.param("all_shapes.py", "default", [
            (22, '                or "reduce-overhead"  # Changed from max-autotune to avoid recompilations',
             '                or "default"  # Changed from max-autotune to avoid recompilations'),
            (24, '            compile_mode = (compile_mode_env or "").strip() or "max-autotune"',
             '            compile_mode = (compile_mode_env or "").strip() or "default"'),
        ], id="all-shapes-in-one-loader-default"),
    ],
)
def test_compile_mode_fixes_real_shapes(name: str, mode: str, expected: list[tuple[int, str, str]]) -> None:
    source = fixture(name)
    out = compile_mode.rewrite(source, {"compile_mode": mode}).source
    assert changed_lines(source, out) == expected
    assert compile_mode.rewrite(out, {"compile_mode": mode}).source == out


@pytest.mark.parametrize(
    "name", ["early_module_level.py", "early_method.py", "lookalikes_only.py"],
)
def test_compile_mode_real_shapes_noop(name: str) -> None:
    source = fixture(name) if name != "lookalikes_only.py" else LOOKALIKES
    assert compile_mode.rewrite(source, {"compile_mode": "reduce-overhead"}).source == source


LOOKALIKES = dedent('''\
    """The TOTO loader used "max-autotune"; this file only has lookalikes."""
    import os
    def fast():
        os.environ.setdefault("TOTO_COMPILE_MODE", "reduce-overhead")
    def load_kronos():
        return os.getenv("KRONOS_COMPILE_MODE", "max-autotune")
    def load_chronos():
        return os.getenv("CHRONOS_COMPILE_BACKEND") or "inductor"
    def load_toto():
        mode = os.getenv("TOTO_COMPILE_MODE") or "reduce-overhead"
        backend = os.getenv("TOTO_COMPILE_BACKEND") or "inductor"
        model_id = os.getenv("TOTO_MODEL_ID") or "Datadog/Toto-Open-Base-1.0"
        modes_file = os.getenv("TOTO_MODES_FILE") or "modes.json"
        print("Toto mode 'max-autotune' is slow to compile")
        return mode, backend
''')


def test_compile_mode_reports_finishing_the_half_fixed_fallback() -> None:
    notes = compile_mode.rewrite(fixture("all_shapes.py"), {}).notes
    assert notes == ("finished a half-switched loader: only line 24 still had the old default",)


def test_compile_mode_refuses_an_unknown_mode_literal_beside_a_backend_chain() -> None:
    source = fixture("backend_chain_multiline.py").replace('or "max-autotune"\n    )', 'or "turbo"\n    )')
    with pytest.raises(Refusal) as exc:
        compile_mode.rewrite(source, {})
    assert exc.value.reason == 'loader default "turbo" is not a known compile mode' and exc.value.lines == (8,)


def test_compile_mode_realistic_large_script_changes_exactly_two_lines() -> None:
    source = realistic_script(4300)
    assert source.count("\n") >= 4300
    out = compile_mode.rewrite(source, {}).source
    loader = source.splitlines().index('def load_toto_pipeline(device: str = "cuda") -> Any:') + 1
    assert changed_lines(source, out) == [
        (loader + 13, '        or "max-autotune"  # fastest kernels after a slow first call',
         '        or "reduce-overhead"  # fastest kernels after a slow first call'),
        (loader + 15, '    compile_mode = (compile_mode_env or "").strip() or "max-autotune"',
         '    compile_mode = (compile_mode_env or "").strip() or "reduce-overhead"'),
    ]


@pytest.mark.parametrize("name", ["backend_chain_multiline.py", "early_module_level.py", "early_method.py",
                                  "all_shapes.py", "realistic"])
@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_compile_mode_output_is_proved_without_reparsing_and_the_proof_matches_a_parse(name: str, ending: str) -> None:
    """The rewrite splices whole top-level statements; what it derives must be what Python finds."""
    import ast

    from totopatch import textio
    from totopatch.patches import _cst

    source = (realistic_script(1200) if name == "realistic" else fixture(name)).replace("\n", ending)
    out = compile_mode.rewrite(source, {"compile_mode": "default"}).source
    assert out != source and out in _cst._DERIVED and textio.syntax_error(out) is None
    parsed = [(start, end) for start, end, _ in _cst._statement_groups(ast.parse(out))]
    assert _cst._DERIVED[out] == parsed
    assert compile_mode.rewrite(out, {"compile_mode": "default"}).source == out


def test_spliced_code_that_does_not_parse_on_its_own_is_left_to_a_full_parse() -> None:
    from totopatch import textio
    from totopatch.patches import _cst

    source = "import os\n\nTOTO = 1\nx = 2\n"
    lines, segments = _cst.parse_segments(source, lambda text: "TOTO" in text)
    out = _cst.spliced(source, lines, [(segments[0], "TOTO = (\n")])
    assert out == "import os\n\nTOTO = (\nx = 2\n"
    assert out not in _cst._DERIVED and textio.syntax_error(out) is not None
