"""Every benchmark script imports from the benchmark modules only names they define (checked without importing)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted([*BENCHMARKS.glob("*.py"), *(BENCHMARKS / "exploration").glob("*.py")])
MODULES = {p.stem: p for p in BENCHMARKS.glob("*.py")}


def defined(path: Path) -> set[str]:
    """Top-level names a module binds: definitions, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_names_imported_from_benchmark_modules_exist(script: Path) -> None:
    missing = [f"{node.module}.{a.name}" for node in ast.walk(ast.parse(script.read_text()))
               if isinstance(node, ast.ImportFrom) and node.module in MODULES
               for a in node.names if a.name not in defined(MODULES[node.module])]
    assert not missing, f"{script.name} imports names its benchmark modules do not define: {missing}"
