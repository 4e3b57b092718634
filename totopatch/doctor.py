"""``totopatch doctor``: where a user stands, on one screen.

It reads files, the manifest and the environment; it imports neither LibCST nor the model, and torch only
when it is installed.  Patch states come from the manifest and the files' hashes alone (``status``
inspects files the manifest does not vouch for, which needs LibCST).
"""
from __future__ import annotations

import getpass
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from . import advice, environment, manifest as mf
from .fsio import sha256
from .outcome import Abort
from .reading import read
from .render import envelope, note_line
from .layout import Layout, LayoutError, installed_toto, locate, state_dir_for, toto_version, user_state_dir
from .patches import PATCHES
from .spec import PatchRef
from .state import recorded_root, with_recorded_backtest
from .update import fresh, held

OK, PROBLEM, STATE = 0, 1, 7  # exit codes; STATE as everywhere: the manifest cannot be trusted


@dataclass(frozen=True)
class Torch:
    installed: bool
    version: str | None = None
    cuda_build: str | None = None  # None: a CPU-only build
    cuda_available: bool | None = None
    error: str | None = None  # import torch failed


@dataclass(frozen=True)
class Toto:
    tree: str | None  # the toto package this report is about
    found: str  # how that tree was found, or why none was
    tree_version: str | None
    imported: str | None  # the toto package `import toto` resolves to
    imported_version: str | None
    imported_is_tree: bool
    tree_is_patched: bool  # the manifest records a change to it


@dataclass(frozen=True)
class TargetState:
    target: str
    file: str
    state: str  # applied, outdated, not-recorded, replaced, changed-since-apply, missing or not-present


@dataclass(frozen=True)
class PatchState:
    patch: str
    state: str  # the targets' common state, or "mixed"
    takes_effect: str  # "compiled only" or "eager too"
    targets: tuple[TargetState, ...]


@dataclass(frozen=True)
class CompileCache:
    variable: str | None  # TORCHINDUCTOR_CACHE_DIR, if set
    path: str
    exists: bool


@dataclass
class Doctor:
    python: dict[str, str]
    torch: Torch
    toto: Toto
    patches: list[PatchState]
    environment: environment.Environment
    compile_cache: CompileCache
    advice: list[str]
    problems: list[str] = field(default_factory=list)
    code: int = OK

    @property
    def error(self) -> str | None:
        """The one-line error of an exit that is not a finding (7: the state cannot be trusted), else None."""
        return self.problems[0] if self.code == STATE and self.problems else None


def examine(root: Path | None, installed: bool, backtest: Path | None, state_dir: Path | None,
            env: Mapping[str, str]) -> Doctor:
    """Everything ``doctor`` shows; ``root`` must be a directory (None: the working directory, not named)."""
    named, root = root is not None, root or Path(".")
    manifest, untrusted = _manifest(state_dir_for(root, state_dir))
    layout, where, is_installed = _layout(root, installed, backtest, state_dir, manifest.toto_dir)
    if is_installed and layout is not None and state_dir is None:  # the installed copy's state is per user
        manifest, untrusted = _manifest(user_state_dir(layout.toto_parent))
        if not named and backtest is None and (theirs := recorded_root(manifest)) is not None:
            layout = locate(theirs, True, None)  # as `status` finds it, whatever the working directory
    if layout is not None:
        layout = with_recorded_backtest(layout, manifest, backtest)
    problems = [untrusted] if untrusted else []
    imported = installed_toto()
    patches = [_patch(layout, manifest, ref) for ref in PATCHES] if layout else []
    live = {p.patch: _options(manifest, p.patch) for p in patches if p.state in ("applied", "outdated")}
    found = environment.read(env, PATCHES, live)
    toto = _toto(layout, where, imported, manifest, problems)
    doctor = Doctor(_python(), probe_torch(), toto, patches, found, compile_cache(env),
                    [_choice(PATCHES)] + advice.lines(), problems)
    doctor.code = STATE if untrusted else PROBLEM if problems else OK
    return doctor


def _manifest(state: Path) -> tuple[mf.Manifest, str | None]:
    """The manifest, or an empty one and why it cannot be trusted."""
    try:
        return mf.load(state / "manifest.json"), None
    except mf.StateError as exc:
        return mf.Manifest(), f"state cannot be trusted: {exc}"


def _layout(root: Path, installed: bool, backtest: Path | None, state_dir: Path | None,
            recorded: str | None) -> tuple[Layout | None, str, bool]:
    """The tree to report on, a line saying how it was found, and whether it is the installed copy."""
    try:
        layout = locate(root, installed, backtest, state_dir, recorded)
        return layout, str(layout.toto_parent / "toto") + (" (--installed)" if installed else ""), installed
    except LayoutError as exc:
        if installed or installed_toto() is None:
            return None, str(exc), installed
    try:
        layout = locate(root, True, backtest, state_dir)
    except LayoutError as exc:
        return None, str(exc), True
    return layout, f"{layout.toto_parent / 'toto'} (the installed copy; no Toto tree under {root.resolve()})", True


def _choice(patches: tuple[PatchRef, ...]) -> str:
    return advice.choice([p.id for p in patches if not p.compiled_only])


def _python() -> dict[str, str]:
    return {"version": platform.python_version(), "executable": sys.executable}


def probe_torch() -> Torch:
    """torch's version, CUDA build and whether CUDA is available; imports torch only if it is installed."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return Torch(installed=False)
    try:
        import torch
    except Exception as exc:  # a broken install is something to report, not a crash
        return Torch(installed=True, error=f"import torch failed: {exc.__class__.__name__}: {exc}")
    return Torch(True, str(torch.__version__), torch.version.cuda, bool(torch.cuda.is_available()))


def _toto(layout: Layout | None, where: str, imported: Path | None, manifest: mf.Manifest,
          problems: list[str]) -> Toto:
    tree = layout.toto_parent.resolve() if layout else None
    patched = any(e.base == "toto" for e in manifest.entries)
    info = Toto(str(tree / "toto") if tree else None, where, toto_version(tree) if tree else None,
                str(imported / "toto") if imported else None, toto_version(imported) if imported else None,
                bool(imported and tree and imported == tree), patched)
    if imported is None:
        problems.append("`import toto` finds no toto package in this Python (pip install --no-deps toto-ts)")
    elif patched and tree and imported != tree:
        problems.append(f"`import toto` resolves to {imported / 'toto'}, not the patched copy {tree / 'toto'}")
    return info


def _patch(layout: Layout, manifest: mf.Manifest, ref: PatchRef) -> PatchState:
    targets = tuple(_target(layout, manifest, ref, key) for key in ref.targets)
    states = {t.state for t in targets if t.state != "not-present"} or {"not-present"}
    return PatchState(ref.id, states.pop() if len(states) == 1 else "mixed",
                      "compiled only" if ref.compiled_only else "eager too", targets)


def _target(layout: Layout, manifest: mf.Manifest, ref: PatchRef, key: str) -> TargetState:
    target = layout.target(key)
    try:
        data = read(target.path)  # regular files only: a FIFO or /dev/zero must not hang or fill memory
    except Abort:
        return TargetState(key, target.rel, "unreadable")
    if data is None:
        return TargetState(key, target.rel, "not-present" if target.optional else "missing")
    entry = manifest.find(ref.id, target.base, target.rel)
    current = sha256(data)
    if entry is None:
        state = "not-recorded"
    elif current in (entry.after_sha256, manifest.top_sha256(entry)):  # or with later patches stacked on it
        chain = held(manifest, entry, current)
        state = "applied" if chain is None or fresh(chain) else "outdated"  # by the fingerprints alone
    elif current == manifest.original_sha256(entry):
        state = "replaced"
    else:
        state = "changed-since-apply"
    return TargetState(key, target.rel, state)


def _options(manifest: mf.Manifest, patch: str) -> dict[str, str]:
    return next((dict(e.options) for e in manifest.entries if e.patch == patch), {})


def compile_cache(env: Mapping[str, str]) -> CompileCache:
    """Where inductor keeps compiled kernels: TORCHINDUCTOR_CACHE_DIR, else torch's default folder."""
    value = env.get("TORCHINDUCTOR_CACHE_DIR")
    path = Path(value).expanduser() if value else Path(tempfile.gettempdir()) / f"torchinductor_{_user()}"
    return CompileCache(value, str(path), path.is_dir())


def _user() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        name = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


# ---------------------------------------------------------------- rendering

STATE_WORDS = {
    "applied": "applied",
    "outdated": "applied by another totopatch version (`totopatch apply` updates it where this one differs)",
    "not-recorded": "not applied by totopatch (`totopatch status` inspects the file)",
    "replaced": "recorded, but the file is the original again (reinstalled?)",
    "changed-since-apply": "edited since apply (`totopatch status` says whether it still holds)",
    "missing": "required file missing",
    "not-present": "optional target absent",
    "unreadable": "not a readable Python file (`totopatch status` says why)",
}


def as_json(doctor: Doctor) -> str:
    return json.dumps({**envelope("doctor", doctor.code, doctor.error),
                       **{k: v for k, v in asdict(doctor).items() if k != "code"}}, indent=2)


def as_text(doctor: Doctor) -> str:
    out = [f"python      {doctor.python['version']} ({doctor.python['executable']})", _torch_line(doctor.torch)]
    out += _toto_lines(doctor.toto)
    out += [f"  {p.patch:<15} {_state_text(p)}  [{p.takes_effect}]" for p in doctor.patches]
    out += _environment_lines(doctor.environment, doctor.torch)
    cache = doctor.compile_cache
    origin = "TORCHINDUCTOR_CACHE_DIR" if cache.variable else "TORCHINDUCTOR_CACHE_DIR unset; torch's default"
    out.append(f"cache       {cache.path} ({origin}; {'exists' if cache.exists else 'does not exist yet'})")
    out.append("advice      (break-even: forecasts per process from which compiling is faster overall)")
    out += [f"  {line}" for line in doctor.advice]
    out += [note_line(p, "problem") for p in doctor.problems]
    return "\n".join(out)


def _torch_line(torch: Torch) -> str:
    if not torch.installed:
        return "torch       not installed (Toto cannot run here; the rest of this report still holds)"
    if torch.error:
        return f"torch       {torch.error}"
    build = f"CUDA {torch.cuda_build} build" if torch.cuda_build else "CPU-only build"
    return f"torch       {torch.version}, {build}, CUDA {'available' if torch.cuda_available else 'not available'}"


def _toto_lines(toto: Toto) -> list[str]:
    version = f"toto-ts {toto.imported_version}" if toto.imported_version else "toto-ts (version unknown)"
    imported = f"{version}; `import toto` -> {toto.imported}" if toto.imported else "`import toto` finds nothing"
    if toto.tree is None:
        return [f"toto        {imported}", f"patches     none: {toto.found}"]
    if toto.imported_is_tree:
        which = "the patched copy" if toto.tree_is_patched else "this tree (nothing patched in it)"
    else:
        which = f"NOT this tree {toto.tree} (toto-ts {toto.tree_version or 'version unknown'})"
    return [f"toto        {imported}, {which}", f"patches     in {toto.found}:"]


def _state_text(patch: PatchState) -> str:
    targets = [t for t in patch.targets if t.state != "not-present"] or list(patch.targets)
    if patch.state != "mixed":
        return f"{STATE_WORDS[patch.state]}: {', '.join(t.file for t in targets)}"
    return "; ".join(f"{t.file}: {STATE_WORDS[t.state]}" for t in targets)


def _sampling_line(env: environment.Environment) -> str:
    if env.sampling is None:
        return f"sampling    upstream's ({environment.SAMPLING_PATCH} not applied)"
    by = "chosen at apply time" if env.sampling_set_by == environment.SAMPLING_PATCH else env.sampling_set_by
    what = {"exact": "upstream's samples for a seed",
            "same-law": "only the kept steps drawn: upstream's distribution, not its samples for a seed"}[env.sampling]
    return f"sampling    {env.sampling} ({by}): {what}"


def _graphs_text(env: environment.Environment) -> str:
    """What cuda-graphs does at run time, as ``compile`` says what the loader does."""
    if env.graphs == "not applied":
        return "not applied (cuda-graphs): one-step forecasts run eagerly"
    if env.graphs == "off":
        return f"off ({env.graphs_set_by}): one-step forecasts run eagerly"
    idle = "" if env.compile == "off" else "; idle while Toto is compiled, which the loader does unless compile is off"
    return f"on: one-step forecasts on CUDA replay from captured CUDA graphs when Toto runs eager{idle}"


def _environment_lines(env: environment.Environment, torch: Torch) -> list[str]:
    compiles = {"on": "on", "off": "off: Toto runs eager",
                "cuda": "on when Toto runs on CUDA (the loader's default)"}[env.compile]
    if env.compile == "cuda" and torch.cuda_available is False:
        compiles += "; no CUDA here, so eager"
    by = f" ({env.compile_set_by})" if env.compile_set_by else ""
    mode = env.mode or "the backtest's own default (compile-mode not applied)"
    source = "the patched default" if env.mode_set_by == "compile-mode" else env.mode_set_by
    out = [f"compile     {compiles}{by}; mode {mode}" + (f" ({source})" if source else ""), _sampling_line(env)]
    out.append("graphs      " + _graphs_text(env))
    for var in env.variables:
        value = "unset" if var.value is None else environment.shown_value(var.value)
        meaning = "" if var.value is None else var.meaning
        out.append(f"  {var.name:<31} {value:<16} {meaning}".rstrip())
    out += [f"  {note_line(n)}" for n in env.notes]
    return out
