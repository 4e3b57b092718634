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
    "main module": "import sys; print(sys.modules['__main__'].__name__, __name__)",
}


def run(python: str, args: list[str], tmp_path: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PREFORK_PROBE": "yes", "PYTHONPATH": str(tmp_path / "prefork-probe")}
    ran = subprocess.run([python, *args], input="in", capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    return ran.returncode, ran.stdout, ran.stderr


@pytest.mark.parametrize("program", PROGRAMS.values(), ids=PROGRAMS.keys())
@pytest.mark.parametrize("how", ["-c", "script", "-m"])
def test_a_forked_child_is_what_a_fresh_python_gives(program: str, how: str, tmp_path: Path) -> None:
    (tmp_path / "probe_module.py").write_text(program)
    args = {"-c": ["-c", program, "x"], "script": [str(tmp_path / "probe_module.py"), "x"],
            "-m": ["-m", "probe_module", "x"]}[how]
    assert run(prefork.python(), args, tmp_path) == run(sys.executable, args, tmp_path)


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


def test_a_killed_caller_takes_the_process_running_its_script_with_it(tmp_path: Path) -> None:
    """What ``subprocess.run(..., timeout=...)`` does on a timeout: kill the process it started, which for a fresh
    ``python`` is the one running the script; for a forked child, the server kills it (and its process group)."""
    pids = tmp_path / "pids"
    program = f"import os, time; open({str(pids)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    caller = subprocess.Popen([prefork.python(), "-c", program])
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
