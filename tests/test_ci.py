"""The pre-commit hook and the CI workflow of docs/ci.md run as shipped, so neither can rot."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import SAMPLE_BACKTEST, installed_toto_package
from totopatch.layout import installed_toto

REPO = Path(__file__).resolve().parents[1]


def totopatch_bin(tmp_path: Path) -> Path:
    """A folder with a `totopatch` command that runs this checkout's totopatch (what pip would install)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "totopatch"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m totopatch "$@"\n')
    script.chmod(0o755)
    return folder


def env_with(bin_dir: Path, *python_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TOTOPATCH_TEST_CRASH_AT")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(map(str, [*python_path, REPO]))
    return env


# ---------------------------------------------------------------- pre-commit hook

def hook() -> dict:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    (found,) = [h for h in hooks if h["id"] == "totopatch-check"]
    return found


def test_pre_commit_hook_is_declared_for_a_whole_project_check() -> None:
    found = hook()
    assert found["entry"] == "totopatch status --check"
    assert found["pass_filenames"] is False and found["always_run"] is True and found["language"] == "python"
    assert "totopatch = totopatch.cli:main" in (REPO / "setup.cfg").read_text()  # what `language: python` installs


def test_pre_commit_hook_entry_runs_and_gates(project: Path, tmp_path: Path) -> None:
    argv = shlex.split(hook()["entry"])
    env = env_with(totopatch_bin(tmp_path))

    def run() -> int:  # pre-commit runs the entry in the repository root, with no file names
        return subprocess.run(argv, cwd=project, env=env, capture_output=True).returncode

    assert run() == 1
    assert subprocess.run(["totopatch", "apply"], cwd=project, env=env, capture_output=True).returncode == 0
    assert run() == 0


# ---------------------------------------------------------------- the GitHub Actions workflow of docs/ci.md

CI_PAGE = REPO / "docs" / "ci.md"


def documented_workflow() -> dict:
    page = CI_PAGE.read_text()
    blocks = re.findall(r"```yaml\n(# \.github/workflows/totopatch\.yml\n.*?)```", page, re.S)
    assert len(blocks) == 1, f"{CI_PAGE} must hold exactly one example workflow"
    return yaml.safe_load(blocks[0])


def workflow_steps() -> tuple[dict, list[dict]]:
    job = documented_workflow()["jobs"]["patches"]
    return job, job["steps"]


def test_documented_workflow_installs_totopatch_and_toto_without_dependencies() -> None:
    job, steps = workflow_steps()
    assert job["defaults"]["run"]["shell"] == "bash"  # bash -eo pipefail: a non-zero exit fails the job
    installs = [s["run"] for s in steps if "pip install" in s.get("run", "")]
    assert len(installs) == 1
    lines = installs[0].strip().splitlines()
    assert lines == ['python -m pip install "$TOTOPATCH"', "python -m pip install --no-deps toto-ts==0.2.0"]
    assert job["env"]["TOTOPATCH"] == "totopatch"
    commands = [s["run"] for s in steps if "totopatch --installed" in s.get("run", "")]
    assert commands == ["totopatch --installed apply", "totopatch --installed verify --json > totopatch-report.json"]


def fake_site_packages(tmp_path: Path) -> Path:
    """A site-packages folder holding a copy of the installed toto package and its dist-info."""
    site = tmp_path / "site-packages"
    shutil.copytree(installed_toto_package(), site / "toto", ignore=shutil.ignore_patterns("__pycache__"))
    for meta in installed_toto().glob("toto_ts-*.dist-info"):
        shutil.copytree(meta, site / meta.name)
    return site


def run_workflow(tmp_path: Path, only: tuple[str, ...] = ()) -> tuple[Path, Path, list[int]]:
    """Run the workflow's `totopatch` steps as Actions would (`bash --noprofile --norc -eo pipefail`)."""
    _, steps = workflow_steps()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "backtest_test3_inline.py").write_bytes(SAMPLE_BACKTEST)
    site = fake_site_packages(tmp_path)
    env = env_with(totopatch_bin(tmp_path), site)
    codes = []
    for step in steps:
        script = step.get("run", "")
        if "totopatch --installed" not in script or (only and not any(o in script for o in only)):
            continue
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              cwd=checkout, env=env, capture_output=True, text=True)
        codes.append(proc.returncode)
        if proc.returncode:
            break  # a failed step fails the job; later steps do not run
    return checkout, site, codes


def test_documented_workflow_patches_and_verifies_the_installed_toto(tmp_path: Path) -> None:
    checkout, site, codes = run_workflow(tmp_path)
    assert codes == [0, 0]
    report = json.loads((checkout / "totopatch-report.json").read_text())
    assert report["command"] == "verify" and report["ok"] is True and report["exit_code"] == 0
    patched = {(i["patch"], i["target"]) for i in report["items"] if i["state"] == "applied"}
    assert ("kv-cache", "util") in patched and ("compile-mode", "backtest") in patched
    assert "totopatch kv-cache: begin" in (site / "toto" / "model" / "util.py").read_text()
    assert "totopatch kv-cache: begin" not in (installed_toto_package() / "model" / "util.py").read_text()


def test_documented_workflow_fails_the_job_when_verify_fails(tmp_path: Path) -> None:
    checkout, _, codes = run_workflow(tmp_path, only=("verify",))  # nothing applied: verify must fail
    assert codes == [1]
    report = json.loads((checkout / "totopatch-report.json").read_text())
    assert report["ok"] is False and report["exit_code"] == 1
