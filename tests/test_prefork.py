"""The tests' fork server (tests/prefork.py): its children behave as a fresh ``python`` does, for what a script sees."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import prefork
import pytest

# what a script can see of its process: arguments, folder, import path, environment, streams, exit status
PROGRAMS = {
    "argv and folder": "import os, sys; print(sys.argv, os.getcwd(), repr(sys.path[0]))",
    "environment": "import os; print(os.environ.get('PREFORK_PROBE'), os.environ.get('PYTHONPATH'))",
    "import path": "import sys; print([p for p in sys.path if 'prefork-probe' in p])",
    "stdin to stdout": "import sys; data = sys.stdin.read(); print(data.upper(), end='')",
    "stderr and exit code": "import sys; print('to stderr', file=sys.stderr); sys.exit(3)",
    "exit with a message": "raise SystemExit('gone')",
    "uncaught exception": "def f():\n    raise ValueError('boom')\nf()",
    "killed by a signal": "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    "killed by SIGKILL": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    "main module": "import sys; print(sys.modules['__main__'].__name__, __name__)",
}


def run(python: str, args: list[str], tmp_path: Path, kind: str = "torch") -> tuple[int, str, str]:
    env = {**os.environ, "PREFORK_PROBE": "yes"}
    if kind == "torch":  # the CLI's server looks into a PYTHONPATH (tests below); these probes leave it out
        env["PYTHONPATH"] = str(tmp_path / "prefork-probe")
    ran = subprocess.run([python, *args], input="in", capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    return ran.returncode, ran.stdout, ran.stderr


@pytest.mark.parametrize("kind", ["torch", "cli"])
@pytest.mark.parametrize("program", PROGRAMS.values(), ids=PROGRAMS.keys())
@pytest.mark.parametrize("how", ["-c", "script", "-m"])
def test_a_forked_child_is_what_a_fresh_python_gives(program: str, how: str, kind: str, tmp_path: Path) -> None:
    (tmp_path / "probe_module.py").write_text(program)
    args = {"-c": ["-c", program, "x"], "script": [str(tmp_path / "probe_module.py"), "x"],
            "-m": ["-m", "probe_module", "x"]}[how]
    assert run(prefork.python(kind), args, tmp_path, kind) == run(sys.executable, args, tmp_path, kind)


def test_torch_is_imported_and_toto_is_not() -> None:
    program = "import sys, torch; print('toto' in sys.modules, torch.ones(3).sum().item())"
    ran = subprocess.run([prefork.python(), "-c", program], capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout) == (0, "False 3.0\n"), ran.stderr


def test_a_variable_lightning_sets_in_the_worker_still_forks(monkeypatch) -> None:
    """Importing toto imports lightning, which sets PYTORCH_NVML_BASED_CUDA_CHECK=1 in the worker's environment;
    a child is still forked (its ``sys.executable`` is the server's executable), and sees the variable as a
    fresh python that imports lightning does."""
    python = prefork.python()
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    program = "import os, sys; print(sys.executable, os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))"
    ran = subprocess.run([python, "-c", program], capture_output=True, text=True, timeout=120)
    assert ran.stdout == f"{python} 1\n", ran.stderr


def test_interpreter_options_and_a_watched_variable_run_the_real_interpreter(tmp_path: Path) -> None:
    python = prefork.python()
    assert python != sys.executable  # the server started
    probe = "import sys, os; print(sys.flags.optimize, os.environ.get('TORCH_LOGS'))"
    assert subprocess.run([python, "-O", "-c", probe], capture_output=True, text=True).stdout == "1 None\n"
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env).stdout == "0 recompiles\n"


def test_the_cli_s_child_is_forked_and_runs_totopatch_as_a_fresh_python_does(tmp_path: Path) -> None:
    python = prefork.python("cli")
    program = "import sys; print(sys.executable, 'libcst' in sys.modules, 'torch' in sys.modules)"
    ran = subprocess.run([python, "-c", program], capture_output=True, text=True, timeout=120)
    assert ran.stdout == f"{python} True False\n", ran.stderr  # forked: the preloaded modules are there
    for args in (["--version"], ["--root", str(tmp_path), "status", "--json"], ["--root", str(tmp_path / "none"), "status"]):
        forked, fresh = (subprocess.run([exe, "-m", "totopatch", *args], capture_output=True, text=True, cwd=tmp_path,
                                        timeout=120) for exe in (python, sys.executable))
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_pythonpath_with_another_totopatch_gives_what_a_fresh_python_gives(tmp_path: Path) -> None:
    """The CLI's server imported this totopatch; a PYTHONPATH may hold another (an earlier release)."""
    other = tmp_path / "other" / "totopatch"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "__main__.py").write_text("print('the other totopatch')")
    env = {**os.environ, "PYTHONPATH": str(other.parent)}
    forked, fresh = (subprocess.run([exe, "-m", "totopatch", "--version"], capture_output=True, text=True, env=env,
                                    cwd=tmp_path, timeout=120) for exe in (prefork.python("cli"), sys.executable))
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_pythonpath_shadowing_a_module_the_cli_s_server_imported_runs_the_real_interpreter(tmp_path: Path) -> None:
    """An entry that holds none of the server's modules is put on the child's path; one that holds one of them
    (here a ``click``) would have shadowed it in a fresh process, so a fresh process runs."""
    python = prefork.python("cli")
    harmless, shadowing = tmp_path / "harmless", tmp_path / "shadowing"
    for folder in (harmless, shadowing):
        folder.mkdir()
        (folder / "probe_helper.py").write_text(f"WHERE = {folder.name!r}")
    (shadowing / "click.py").write_text("SHADOW = True")
    program = "import sys, click, probe_helper; print(sys.executable, probe_helper.WHERE, hasattr(click, 'SHADOW'))"
    for folder, executable in ((harmless, python), (shadowing, sys.executable)):
        env = {**os.environ, "PYTHONPATH": str(folder)}
        ran = subprocess.run([python, "-c", program], capture_output=True, text=True, env=env, timeout=120)
        assert ran.stdout == f"{executable} {folder.name} {folder == shadowing}\n", ran.stderr


@pytest.mark.parametrize("kind", ["torch", "cli"])
def test_a_sitecustomize_on_pythonpath_runs_as_in_a_fresh_python(kind: str, tmp_path: Path) -> None:
    """A fresh python runs a ``sitecustomize`` it finds on PYTHONPATH at start-up; a forked child could not."""
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['SITE_RAN'] = 'yes'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    program = "import os; print(os.environ.get('SITE_RAN'))"
    forked, fresh = (subprocess.run([exe, "-c", program], capture_output=True, text=True, env=env, timeout=120)
                     for exe in (prefork.python(kind), sys.executable))
    assert fresh.stdout == "yes\n" and (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)


@pytest.mark.parametrize("kind", ["torch", "cli"])
def test_a_killed_caller_takes_the_process_running_its_script_with_it(kind: str, tmp_path: Path) -> None:
    """What ``subprocess.run(..., timeout=...)`` does on a timeout: kill the process it started, which for a fresh
    ``python`` is the one running the script; for a forked child, the server kills it (and its process group)."""
    pids = tmp_path / "pids"
    program = f"import os, time; open({str(pids)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    caller = subprocess.Popen([prefork.python(kind), "-c", program])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pids.exists() and pids.read_text()):
        time.sleep(0.05)
    running = int(pids.read_text())
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(running):
        time.sleep(0.05)
    assert not _alive(running)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
