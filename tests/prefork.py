"""Python child processes for the tests, forked from a server that has already imported torch.

About twenty tests run a script in a fresh Python process, because the ``toto`` it imports must be the
tree under test and not the worker's. Each such process spent about 5 s of CPU importing torch, lightning
(through gluonts), scipy and pandas before the script's first line. ``python()`` gives an executable that
stands for ``sys.executable``. It hands its arguments, environment, working folder and standard streams
to a server (one per test worker) that imported those libraries once. The server forks, runs the script
as ``python`` would, and sends back the exit status, which the executable exits with.

What the child imports after that, ``toto`` first, is imported fresh in each child. The executable runs
the real interpreter instead wherever a forked child could be told apart from a fresh one:
- an interpreter option other than ``-m`` or ``-c``;
- an environment that differs from the server's in a variable that the preloaded libraries read when
  they are imported (``TORCH*``, ``PYTHON*``, ``OMP_*`` and the others in ``WATCHED``).

Inside a child, ``sys.executable`` is the executable too, so the processes a script starts (a benchmark's
workers, ``verify --smoke``'s smoke test) are forked the same way.

``python("cli")`` does the same for ``python -m totopatch``: its server has imported the CLI, LibCST and
every patch (about 0.4 s of a 0.5 s run), for the tests that run the CLI in a process of its own to kill
it, pause it or race two of them. A request whose PYTHONPATH holds a module the server imported from
elsewhere (another totopatch, an earlier release) runs the real interpreter.

Run as ``python prefork.py --serve SOCKET KIND``; the tests only call ``python()``.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = __file__
SET_ON_IMPORT: dict[str, str] = {}
# what each kind of server imports: for scripts that import toto, what toto 0.1.3-0.2.0 imports besides itself
# (never toto); for ``python -m totopatch``, the CLI with LibCST and every patch
PRELOAD = {
    "torch": ("torch", "torch._dynamo", "numpy", "gluonts.torch.distributions", "einops", "jaxtyping",
              "rotary_embedding_torch", "huggingface_hub", "safetensors"),
    "cli": ("click", "libcst", "totopatch.cli", "totopatch.demo", "totopatch.doctor", "totopatch.patches.*"),
}
# environment variables read when those libraries are imported: a child whose value differs is not forked
WATCHED = ("TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOTO", "NUMEXPR", "CUDA", "NVIDIA", "TRITON",
           "LD_", "PYTHON", "HF_", "HUGGINGFACE", "LIGHTNING", "PL_", "GLUONTS", "JAX", "NUMPY", "SCIPY", "MPLBACKEND")
# ... except these: set up in the child as Python does at start-up, or read only when first used (torch itself
# sets the last three in a process that compiles or asks for CUDA, such as a test worker)
HANDLED = ("PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
           "PYTORCH_NVML_BASED_CUDA_CHECK")
# (PYTHONPATH's entries are looked into by the client: see ``shadows`` in CLIENT)


def _watched(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(WATCHED) and k not in HANDLED}


# the executable: a shell script (a shebang holds a path of at most 127 bytes on some kernels) that runs this
# client in an isolated Python without site-packages
EXECUTABLE = '''\
#!/bin/sh
exec {python} -IS {client} "$@"
'''
CLIENT = '''\
import json, os, socket, sys
REAL, SOCKET, WATCHED, HANDLED, EXECUTABLE = {real!r}, {socket!r}, {watched!r}, {handled!r}, {executable!r}
SERVER_ENV, ORIGINS = json.loads({server_env!r}), json.loads({origins!r})
args = sys.argv[1:]


def real():
    os.execv(REAL, [REAL] + args)


def shadows(entry):
    """Whether a PYTHONPATH entry holds what a fresh python runs at start-up (``sitecustomize``), or a module
    the server imported from elsewhere (``ORIGINS``: the CLI's server only, whose totopatch could differ)."""
    if not entry or (os.path.exists(entry) and not os.path.isdir(entry)):
        return True  # the working folder, a zip file: not looked into
    try:
        names = os.listdir(entry)
    except OSError:
        return False  # nothing there
    here = os.path.realpath(entry)
    stems = {{name.split(".")[0] for name in names}}
    return bool(stems & {{"sitecustomize", "usercustomize"}}) or any(ORIGINS.get(s, here) != here for s in stems)


if not args or (args[0].startswith("-") and (args[0] not in ("-m", "-c") or len(args) < 2)):
    real()
if "PYTHONPATH" in os.environ and any(map(shadows, os.environ["PYTHONPATH"].split(os.pathsep))):
    real()  # otherwise the child puts it on sys.path
if {{k: v for k, v in os.environ.items() if k.startswith(WATCHED) and k not in HANDLED}} != SERVER_ENV:
    real()
try:  # standard streams to hand over, a folder to start in, a server to ask
    [os.fstat(fd) for fd in (0, 1, 2)]
    request = {{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "executable": EXECUTABLE}}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(SOCKET)
except OSError:
    real()
socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
reply = sock.recv(64)
code = int(reply) if reply else 1
if code < 0:  # died of a signal: so does this process
    import signal
    if -code not in (signal.SIGKILL, signal.SIGSTOP):  # (whose handlers cannot be set)
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
'''


def serve(path: str, kind: str) -> None:
    """Import ``PRELOAD[kind]``, then fork a child for each request on the socket at ``path`` (until the parent dies)."""
    import importlib
    import pkgutil

    before = dict(os.environ)
    for name in PRELOAD[kind]:
        if name.endswith(".*"):  # a package and every module in it
            package = importlib.import_module(name[:-2])
            for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        else:
            importlib.import_module(name)
    global SET_ON_IMPORT  # what the imports put in the environment (lightning sets PYTORCH_NVML_BASED_CUDA_CHECK)
    SET_ON_IMPORT = {k: v for k, v in os.environ.items() if before.get(k) != v}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    # where each top-level module the server imported came from: a PYTHONPATH entry holding one of them from
    # elsewhere would have shadowed it in a fresh process (for the CLI's server, which does not ignore PYTHONPATH)
    origins = {}
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if "." not in name and where:
            package = hasattr(module, "__path__")
            origins[name] = os.path.realpath(os.path.dirname(os.path.dirname(where) if package else where))
    print("ready", json.dumps(origins), flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except (socket.timeout, InterruptedError):
            continue
        fds: list[int] = []
        try:
            conn.settimeout(None)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if len(fds) == 3 and os.fork() == 0:
                try:
                    listener.close()
                    _wait_for(conn, json.loads(message), fds)
                finally:
                    os._exit(70)
        except OSError:
            pass  # the caller went away before it was served
        conn.close()
        for fd in fds:
            os.close(fd)


def _wait_for(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Fork the child for ``request``; send its exit status back, or kill it when the caller goes away."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds)
    for fd in fds:
        os.close(fd)
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP)
    child = os.pidfd_open(pid)
    poller.register(child, select.POLLIN)
    while True:
        ready = dict(poller.poll())
        if child in ready:
            break
        if conn.fileno() in ready:  # the caller was killed (a timeout): so are the child and what it started
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # before the child made its own group
                os.kill(pid, signal.SIGKILL)
            break
    _, status = os.waitpid(pid, 0)
    try:
        conn.send(str(os.waitstatus_to_exitcode(status)).encode())
    except OSError:
        pass
    os._exit(0)


def _run(request: dict, fds: list[int]) -> None:
    """Become the process ``python *argv`` would have started, run it, and exit with its status."""
    import io
    import runpy
    import types

    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(SET_ON_IMPORT)  # as those imports would have set them in a fresh process
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))

    def stream(fd: int, mode: str, errors: str = "strict") -> io.TextIOWrapper:
        """The text stream Python makes for ``fd`` at start-up (line-buffered on a terminal)."""
        return io.TextIOWrapper(open(fd, mode + "b", closefd=False), errors=errors, write_through=unbuffered,
                                line_buffering=mode == "w" and os.isatty(fd))

    sys.stdin, sys.stdout, sys.stderr = stream(0, "r"), stream(1, "w"), stream(2, "w", "backslashreplace")
    sys.executable = request["executable"]
    argv = request["argv"]
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:1] = [os.getcwd(), *paths]
            sys.modules["__main__"] = types.ModuleType("__main__")  # runs in __main__'s namespace: a fresh one
            runpy._run_module_as_main(argv[1], alter_argv=True)  # what ``python -m`` itself calls
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[:1] = ["", *paths]
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path[:1] = [os.path.dirname(os.path.abspath(argv[0])), *paths]
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:
        tb = exc.__traceback__
        ours = {HERE} | (set() if argv[0] == "-m" else {runpy.__file__, "<frozen runpy>"})
        while tb is not None and tb.tb_frame.f_code.co_filename in ours:
            tb = tb.tb_next  # as Python prints it
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_code(value: object) -> int:
    """The status ``sys.exit(value)`` gives, as Python's own exit handling computes it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


_launchers: dict[str, str] = {}


def python(kind: str = "torch") -> str:
    """An executable to use in place of ``sys.executable`` (see the module).

    ``kind`` "torch" is for a script that imports toto: its server has imported torch and what toto imports.
    ``kind`` "cli" is for ``-m totopatch``: its server has imported totopatch's CLI, LibCST and every patch,
    about 0.4 s of a CLI run's 0.5 s. A script that checks which modules a command imports needs a fresh
    process: ``sys.executable``.

    A server starts on the first call of its kind in this process (about 5 s for torch, 0.6 s for the CLI);
    where it cannot start, ``sys.executable`` itself.
    """
    if kind in _launchers:
        return _launchers[kind]
    folder = Path(tempfile.mkdtemp(prefix=f"totopatch-prefork-{kind}-"))
    sock = folder / "server.sock"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads in the process that forks
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(sock), kind], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env, text=True)
    atexit.register(_stop, server, folder)
    ready, _, _ = select.select([server.stdout], [], [], 300)
    word, _, origins = server.stdout.readline().partition(" ") if ready else ("", "", "")
    if word != "ready":
        _launchers[kind] = sys.executable
        return sys.executable
    launcher, client = folder / "python", folder / "client.py"
    client.write_text(CLIENT.format(real=sys.executable, socket=str(sock), watched=WATCHED, handled=HANDLED,
                                    executable=str(launcher), server_env=json.dumps(_watched(dict(os.environ))),
                                    origins=origins.strip() if kind == "cli" else "{}"))
    launcher.write_text(EXECUTABLE.format(python=shlex.quote(sys.executable), client=shlex.quote(str(client))))
    launcher.chmod(0o755)
    _launchers[kind] = str(launcher)
    return _launchers[kind]


def _stop(server: subprocess.Popen, folder: Path) -> None:
    server.kill()
    server.wait()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2], sys.argv[3])
