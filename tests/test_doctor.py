from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from totopatch import doctor
from totopatch.environment import VARIABLES
from totopatch.layout import installed_toto
from totopatch.patches import PATCHES

REPO = Path(__file__).resolve().parents[1]
# Runs the CLI in a fresh process, then reports which of the heavy packages it imported.
PROBE = """
import json, sys
from totopatch.cli import main
try:
    main(sys.argv[1:], prog_name="totopatch")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("libcst", "torch", "toto") and sys.modules[m] is not None)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES + ("TORCHINDUCTOR_CACHE_DIR",):
        monkeypatch.delenv(name, raising=False)


def run_doctor(root: Path, *args: str, hide_torch: bool = False, tmp: Path | None = None) -> tuple[dict, dict]:
    """``totopatch doctor --json`` in a fresh process; torch hidden by a sitecustomize when asked."""
    paths = [str(REPO)]
    if hide_torch:
        assert tmp is not None
        (tmp / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None  # import torch fails\n')
        paths.insert(0, str(tmp))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", PROBE, "--root", str(root), *args, "doctor", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    return json.loads(proc.stdout), json.loads(proc.stderr.strip().splitlines()[-1])


def test_doctor_without_torch_imports_nothing_heavy(project, cli, tmp_path) -> None:
    assert cli(project, "apply").exit_code == 0
    report, probe = run_doctor(project, hide_torch=True, tmp=tmp_path)
    assert probe["heavy"] == []
    assert report["torch"] == {"installed": False, "version": None, "cuda_build": None, "cuda_available": None,
                               "error": None}
    assert [p["state"] for p in report["patches"]] == ["not-recorded" if p == "layer-region" else "applied"
                                                       for p in (ref.id for ref in PATCHES)]  # opt-in
    assert probe["code"] == report["exit_code"]


def test_doctor_with_torch_imports_torch_but_neither_libcst_nor_the_model(project, cli, tmp_path) -> None:
    assert cli(project, "apply").exit_code == 0
    report, probe = run_doctor(project)
    assert {m.split(".")[0] for m in probe["heavy"]} == {"torch"}
    import torch

    assert report["torch"] == {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available(), "error": None}


def test_doctor_text_has_every_section(project, cli, monkeypatch, tmp_path) -> None:
    assert cli(project, "apply").exit_code == 0
    monkeypatch.setenv("TOTO_DISABLE_COMPILE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(doctor, "installed_toto", lambda: project / "toto")
    ran = cli(project, "doctor")
    assert ran.exit_code == 0, ran.stdout
    lines = ran.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["python", "torch", "toto", "patches"]
    assert "the patched copy" in lines[2]
    assert sum(line.startswith("  kv-cache ") and "applied" in line for line in lines) == 1
    assert any(line.startswith("compile     off: Toto runs eager (TOTO_DISABLE_COMPILE=1)") for line in lines)
    assert any(line.split()[:3] == ["TOTO_DISABLE_COMPILE", "1", "compile"] for line in lines)
    assert "graphs      on: one-step forecasts on CUDA replay from captured CUDA graphs when Toto runs eager" in lines
    assert f"cache       {tmp_path / 'inductor'} (TORCHINDUCTOR_CACHE_DIR; does not exist yet)" in lines
    assert any("compiling pays off from" in line for line in lines)
    assert not any(line.startswith("problem:") for line in lines)


def test_doctor_says_which_sampling_forecasts_use_and_what_set_it(project, cli, monkeypatch) -> None:
    assert cli(project, "apply", "kv-cache").exit_code == 0
    assert "sampling    upstream's (shared-prefill not applied)" in cli(project, "doctor").stdout.splitlines()
    assert cli(project, "apply", "shared-prefill", "--sampling", "same-law").exit_code == 0
    lines = cli(project, "doctor").stdout.splitlines()
    assert any(line.startswith("sampling    same-law (chosen at apply time): only the kept steps drawn") for line in lines)
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "Exact")
    lines = cli(project, "doctor").stdout.splitlines()
    assert "sampling    exact (TOTOPATCH_SAMPLING=Exact): upstream's samples for a seed" in lines
    assert any(line.split()[:3] == ["TOTOPATCH_SAMPLING", "Exact", "sampling"] for line in lines)
    monkeypatch.setenv("TOTOPATCH_SAMPLING", "fast")
    data = json.loads(cli(project, "doctor", "--json").stdout)
    assert (data["environment"]["sampling"], data["environment"]["sampling_set_by"]) == ("exact", "TOTOPATCH_SAMPLING=fast")
    assert data["environment"]["notes"][-1].startswith("TOTOPATCH_SAMPLING=fast is not a sampling mode")


def test_doctor_json_has_the_same_content(project, cli, monkeypatch) -> None:
    assert cli(project, "apply", "compile-mode").exit_code == 0
    monkeypatch.setenv("TOTO_COMPILE_MODE", "max-autotune")
    data = json.loads(cli(project, "doctor", "--json").stdout)
    assert {"python", "torch", "toto", "patches", "environment", "compile_cache", "advice", "problems"} <= set(data)
    states = {p["patch"]: p["state"] for p in data["patches"]}
    assert states == {p.id: "applied" if p.id == "compile-mode" else "not-recorded" for p in PATCHES}
    assert data["environment"]["graphs"] == "not applied"
    assert data["environment"]["notes"] == ["TOTO_COMPILE_MODE=max-autotune overrides the patched default reduce-overhead"]
    assert data["toto"]["tree_is_patched"] is False and data["exit_code"] == 0


def test_doctor_reports_the_cuda_graphs_switch(project, cli, monkeypatch) -> None:
    assert cli(project, "apply").exit_code == 0
    monkeypatch.setenv("TOTOPATCH_CUDA_GRAPHS", "0")
    lines = cli(project, "doctor").stdout.splitlines()
    assert "graphs      off (TOTOPATCH_CUDA_GRAPHS=0): one-step forecasts run eagerly" in lines
    assert any(line.split()[:2] == ["TOTOPATCH_CUDA_GRAPHS", "0"] and line.endswith("run without them")
               for line in lines)
    assert "  note: TOTOPATCH_CUDA_GRAPHS=0: cuda-graphs is off at run time; one-step forecasts run without CUDA " \
           "graphs" in lines
    monkeypatch.delenv("TOTOPATCH_CUDA_GRAPHS")
    lines = cli(project, "doctor").stdout.splitlines()
    assert any(line.startswith("graphs      on: ") and line.endswith("unless compile is off") for line in lines)


def test_patched_copy_not_imported_is_a_problem(project, cli) -> None:
    assert cli(project, "apply", "kv-cache").exit_code == 0
    ran = cli(project, "doctor")
    assert ran.exit_code == 1
    assert f"problem: `import toto` resolves to {installed_toto() / 'toto'}, not the patched copy" in ran.stdout


def test_toto_not_importable_is_a_problem(project, cli, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "installed_toto", lambda: None)
    data = json.loads(cli(project, "doctor", "--json").stdout)
    assert data["exit_code"] == 1 and data["toto"]["imported"] is None
    assert data["problems"] == ["`import toto` finds no toto package in this Python (pip install --no-deps toto-ts)"]


def test_without_a_tree_under_the_root_doctor_shows_the_installed_copy(tmp_path, cli) -> None:
    ran = cli(tmp_path, "doctor")
    assert ran.exit_code == 0
    assert (f"patches     in {installed_toto() / 'toto'} (the installed copy; no Toto tree under {tmp_path.resolve()}):"
            in ran.stdout)


def test_corrupt_manifest_is_the_state_code(project, cli) -> None:
    (project / ".totopatch").mkdir()
    (project / ".totopatch" / "manifest.json").write_text("{not json")
    ran = cli(project, "doctor")
    assert ran.exit_code == 7 and "problem: state cannot be trusted: " in ran.stdout


def test_missing_root_is_a_usage_error(tmp_path, cli) -> None:
    ran = cli(tmp_path / "absent", "doctor")
    assert ran.exit_code == 2 and ran.stderr.startswith("totopatch: error: ")
