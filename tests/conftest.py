from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import prefork
import pytest
from click.testing import CliRunner

from totopatch import textio
from totopatch.cli import main
from totopatch.layout import TARGETS, installed_toto
from totopatch.patches import _cst

SAMPLE_BACKTEST = resources.files("totopatch").joinpath("data/sample_backtest.py.txt").read_bytes()


def installed_toto_package() -> Path:
    """The installed toto package (tests patch copies of it, never the venv itself)."""
    parent = installed_toto()
    assert parent is not None, "toto-ts must be installed: pip install --no-deps toto-ts"
    return parent / "toto"


def project_file(key: str) -> str:
    """Where target ``key`` lies in the ``project`` fixture, relative to its root (the layout's own paths)."""
    spec = TARGETS[key]
    return f"toto/{spec.path}" if spec.base == "toto" else spec.path


def upstream_bytes(key: str) -> bytes:
    """Target ``key`` as the ``project`` fixture starts with it: the installed toto-ts file, or the sample backtest."""
    spec = TARGETS[key]
    return SAMPLE_BACKTEST if spec.base == "root" else (installed_toto_package().parent / spec.path).read_bytes()


EARLIER_FINGERPRINT = "0" * 64  # the code_sha256 of no totopatch's patch
EARLIER_NOTE = b"# written by an earlier totopatch"


def make_outdated(root: Path, key: str) -> bool:
    """Make target ``key`` of the project at ``root`` look patched by an earlier totopatch: its top patch wrote
    one comment line more at the end, recorded under another fingerprint.  False (and nothing changed) where
    the file is not recorded as it stands, or a run was interrupted."""
    from dataclasses import replace

    from totopatch.fsio import sha256
    from totopatch.state import open_context
    from totopatch.state_folder import StateFolder

    folder = StateFolder(open_context(root))
    loaded = folder.load()
    target = folder.layout.target(key)
    if loaded.interrupted or not target.path.is_file():
        return False
    data = target.path.read_bytes()
    manifest = loaded.manifest
    top = next((e for e in manifest.entries if (e.base, e.file) == (target.base, target.rel)
                and e.after_sha256 == sha256(data) and e.before_sha256 != e.after_sha256 and not manifest.above(e)),
               None)
    if top is None:
        return False
    eol = b"\r\n" if b"\r\n" in data else b"\r" if b"\r" in data and b"\n" not in data else b"\n"
    new = data + (b"" if not data or data.endswith((b"\n", b"\r")) else eol) + EARLIER_NOTE + eol
    target.path.write_bytes(new)
    earlier = replace(top, after_sha256=sha256(new), code_sha256=EARLIER_FINGERPRINT)
    folder.record(replace(manifest, entries=tuple(earlier if e.key == top.key else e for e in manifest.entries)))
    return True


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user project: a nested Toto checkout copied from site-packages plus the sample backtest."""
    root = tmp_path / "project"
    shutil.copytree(installed_toto_package(), root / "toto" / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
    return root


@pytest.fixture
def patched_toto(tmp_path: Path) -> Path:
    """The folder holding a copy of the installed toto package whose util.py has the kv-cache patch."""
    from totopatch.patches import kv_cache

    parent = tmp_path / "patched"
    shutil.copytree(installed_toto_package(), parent / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    util = parent / "toto" / "model" / "util.py"
    util.write_bytes(kv_cache.rewrite(util.read_bytes().decode(), {}).source.encode())
    return parent


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root with its bytes, mode and mtime (state folder and bytecode excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".totopatch" not in path.parts and "__pycache__" not in path.parts:
            st = path.stat()
            out[str(path.relative_to(root))] = (path.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out



def run_script(script: Path, *args: str) -> dict:
    """Run a fixture script in a fresh Python (so its ``--toto-parent`` is the ``toto`` it imports); its last line's JSON."""
    run = subprocess.run([prefork.python(), str(script), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])

@pytest.fixture
def cli():
    def run(root: Path, *args: str) -> Ran:
        result = CliRunner().invoke(main, ["--root", str(root), *args], catch_exceptions=False)
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


# The test files, longest first: the sum of their tests' durations in seconds on the 2-core machine (2026-12-01,
# inductor's cache empty): 85 (the inductor smoke test alone 50), 40, 38, 32, 23, 16, 13, 13, 10, 9, 9, 9, 7, 7,
# 6, 6; the others under 6. xdist hands out whole files (setup.cfg: --dist loadfile, so that a file's
# module-scoped fixtures, forecast servers and patched trees, are built once) in the order of their first test
# (--no-loadscope-reorder; xdist would order them by their count of tests). Longest first spreads the long files
# over the workers and leaves the short ones to fill in at the end, where the run waits for its last worker.
LONGEST_FIRST = (
    "test_toto_tree.py", "test_upstream_outcomes.py", "test_fidelity.py", "test_shared_prefill.py",
    "test_cuda_graphs.py", "test_layer_region.py", "test_backtest_bench.py", "test_same_law.py", "test_outdated.py",
    "test_reliability.py", "test_state_folder.py", "test_state_machine.py", "test_prefork.py", "test_hazards.py",
    "test_agreement.py", "test_rope_cache.py",
)
# ... and in test_toto_tree.py, the inductor smoke test first (its worker has the longest way to go)
FIRST_IN_ITS_FILE = "test_verify_smoke_with_inductor_matches_eager"


def pytest_configure(config: pytest.Config) -> None:
    """Compile inductor's kernels in the test's own process: the xdist workers already keep every core busy.

    A pool of compile workers, each importing torch, cost about 30 s more CPU in the inductor smoke test than
    the compiled code it produces; the code is the same either way. Set by the controller, before the
    workers and the smoke tests' processes start, so they inherit it; a value you set is kept.
    """
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest test files first (see LONGEST_FIRST); the order of the others, and in each file, is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                                 getattr(item, "originalname", item.name) != FIRST_IN_ITS_FILE))


@pytest.fixture(autouse=True)
def _no_crash_hook(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.delenv("TOTOPATCH_TEST_CRASH_AT", raising=False)
    monkeypatch.delenv("TOTOPATCH_SAMPLING", raising=False)  # a user's choice must not change what tests sample
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("user-state")))  # --installed state
    monkeypatch.chdir(os.getcwd())


# The tests parse the same few upstream files again and again, with the hypothesis sweeps' hundreds of variants
# in between. totopatch keeps the parses of the last 16 texts (LibCST) and 8 (Python's ast), what one CLI run
# needs; the tests keep 128 of each. Neither tree is changed after it is made, and a parse depends on the text
# alone, except for a source at the edge of Python's nesting limit, where a RecursionError depends on the
# caller's stack depth (no test source is near it). The in-process test files run about 20 % faster, with about
# 150 MB more in each worker (2026-12-01, this project's 2-core machine).
_cst.parse_exact = functools.lru_cache(maxsize=128)(_cst.parse_exact.__wrapped__)
textio._parse = functools.lru_cache(maxsize=128)(textio._parse.__wrapped__)
