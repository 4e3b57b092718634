"""The README, docs/ and the results index hold together: links resolve, tests named exist, figures match files."""
from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md"), *RESULTS.rglob("README.md")])
DOC_PAGES = ("commands", "patches", "guarantees", "ci", "performance", "troubleshooting", "design")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where links are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_and_its_anchor_exists(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (REPO not in dest.parents and dest != REPO):
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_link_check_sees_links_anchors_and_code() -> None:
    text = "[a](x.md#h) `[no](y.md)` ![img](p.png)\n```\n[no](z.md)\n```\n[b](#a-b-c)"
    assert LINK.findall(prose(text)) == ["x.md#h", "p.png", "#a-b-c"]
    assert slug("`totopatch doctor`: where you stand (JSON, exit 7)") == "totopatch-doctor-where-you-stand-json-exit-7"
    assert slug("JSON (`--json` on apply, status)") == "json---json-on-apply-status"


def test_the_readme_is_a_front_door_and_links_every_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for name in DOC_PAGES:
        assert f"(docs/{name}.md)" in readme, name
        assert (REPO / "docs" / f"{name}.md").is_file(), name


# ---------------------------------------------------------------- tests named in the docs exist

@cache
def defined_tests(file: str) -> frozenset[str]:
    tree = ast.parse((REPO / "tests" / file).read_text())
    return frozenset(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for every `test_x.py::test_y`, `test_x.py` and bare `test_y` after a file."""
    out: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        current = None
        for token in re.findall(r"`((?:tests/)?test_\w+\.py(?:::\w+)?|test_\w+)`", line):
            file, _, name = token.removeprefix("tests/").partition("::")
            if file.endswith(".py"):
                current = file
                out.append((file, name or None))
            elif current is not None:
                out.append((current, file))
    return out


def test_the_test_name_parser_follows_the_table_shorthand() -> None:
    line = "| x | `test_a.py::test_b`, `test_c`; `test_d.py` (gpu) |"
    assert named_tests(line) == [("test_a.py", "test_b"), ("test_a.py", "test_c"), ("test_d.py", None)]


@pytest.mark.parametrize("page", ["docs/guarantees.md", "docs/patches.md", "docs/ci.md", "README.md"])
def test_every_test_a_page_names_exists(page: str) -> None:
    named = named_tests((REPO / page).read_text())
    if page == "docs/guarantees.md":
        assert len(named) > 60  # the table was read
    missing = [f"{file}::{name}" if name else file for file, name in named
               if not (REPO / "tests" / file).is_file() or name and name not in defined_tests(file)]
    assert not missing, missing


# ---------------------------------------------------------------- results: one folder per run, all indexed

def run_folders() -> list[Path]:
    return sorted(p for p in [*RESULTS.iterdir(), *(RESULTS / "exploration").iterdir()]
                  if p.is_dir() and p.name != "exploration")


def test_results_hold_only_run_folders_and_their_indexes() -> None:
    loose = [p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"]
    loose += [f"exploration/{p.name}" for p in (RESULTS / "exploration").iterdir() if p.is_file() and p.name != "README.md"]
    assert not loose
    for folder in run_folders():
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_[a-z0-9]+_[a-z0-9_]+", folder.name), folder.name
        assert any(folder.iterdir()), folder


def test_every_run_folder_is_listed_in_an_index() -> None:
    index = (RESULTS / "README.md").read_text() + (RESULTS / "exploration" / "README.md").read_text()
    unlisted = [f.name for f in run_folders() if f"`{f.name}/`" not in index]
    assert not unlisted


# ---------------------------------------------------------------- the README's headline figures

HEADLINE = RESULTS / "2026-11-30_h200_backtest" / "backtest_h200_20261130.json"
HEADLINE_ROWS = {  # the README's label and sampling -> (variant, mode, cache, sampling) in the result file
    "**patched, eager with CUDA graphs** (`TOTO_DISABLE_COMPILE=1`): what to run | exact":
        ("patched", "graphs", "fresh", "exact"),
    "patched, eager with CUDA graphs | same-law": ("patched", "graphs", "fresh", "same-law"),
    "patched, `reduce-overhead` | same-law": ("patched", "reduce-overhead", "fresh", "same-law"),
    "patched, `reduce-overhead` | exact": ("patched", "reduce-overhead", "fresh", "exact"),
    "unpatched, eager (the baseline) | exact": ("unpatched", "eager", "fresh", "exact"),
}


def headline_table() -> list[str]:
    """The README's results table, row by row, from the result file."""
    data = json.loads(HEADLINE.read_text())
    rows = {(r["variant"], r["mode"], r["cache"], (r.get("options") or {}).get("sampling") or "exact"): r
            for r in data["rows"]}
    out = []
    for label, key in HEADLINE_ROWS.items():
        r = rows[key]
        out.append(f"| {label} | {r['warm_median_ms']:.2f} | {r['warm_speedup_vs_eager']:.0f} "
                   f"| {r['first_call_s']:.2f} | {r['cold_total_s']:.2f} | {r['peak_mem_gb']:.2f} |")
    return out


def test_the_readme_headline_table_is_the_result_file() -> None:
    data = json.loads(HEADLINE.read_text())
    assert len({(r["variant"], r["mode"], r["cache"], (r.get("options") or {}).get("sampling") or "exact")
                for r in data["rows"]}) == len(data["rows"])  # every row found by its key alone
    readme = (REPO / "README.md").read_text()
    assert f"{data['device']} (torch {data['torch']}, {data['meta']['date'][:10]}" in readme
    for line in headline_table():
        assert line in readme, line
    assert f"]({HEADLINE.with_suffix('.png').relative_to(REPO)})" in readme


# ---------------------------------------------------------------- the version and the change log

def test_version_prints_the_package_version_which_the_changelog_records() -> None:
    from click.testing import CliRunner

    import totopatch
    from totopatch.cli import main

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"totopatch, version {totopatch.__version__}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(totopatch.__version__)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M)
