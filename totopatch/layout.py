"""Where the files are: the Toto tree, the backtest script and the state folder."""
from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import os
import re
from dataclasses import dataclass
from pathlib import Path


class LayoutError(Exception):
    """No Toto tree where the user pointed us."""


@dataclass(frozen=True)
class TargetSpec:
    key: str
    base: str  # "toto" or "root"
    path: str  # relative to the base; the backtest path is filled in by Layout
    optional: bool


TARGETS: dict[str, TargetSpec] = {
    "util": TargetSpec("util", "toto", "toto/model/util.py", False),
    "util_optimized": TargetSpec("util_optimized", "toto", "toto/model/util_optimized.py", True),
    "attention": TargetSpec("attention", "toto", "toto/model/attention.py", False),
    "transformer": TargetSpec("transformer", "toto", "toto/model/transformer.py", False),
    "rope": TargetSpec("rope", "toto", "toto/model/rope.py", False),
    "scaler": TargetSpec("scaler", "toto", "toto/model/scaler.py", False),
    "embedding": TargetSpec("embedding", "toto", "toto/model/embedding.py", False),
    "forecaster": TargetSpec("forecaster", "toto", "toto/inference/forecaster.py", False),
    "backtest": TargetSpec("backtest", "root", "backtest_test3_inline.py", True),
}

LAYOUTS = ("<root>/toto/toto/model/util.py (project with a nested Toto checkout)",
           "<root>/toto/model/util.py (Toto checkout root or site-packages)")


@dataclass(frozen=True)
class Target:
    key: str
    base: str
    rel: str
    path: Path
    optional: bool


@dataclass(frozen=True)
class Layout:
    root: Path
    toto_parent: Path
    backtest_rel: str
    state_dir: Path
    backtest_required: bool = False  # named with --backtest: it must exist

    def base_dir(self, base: str) -> Path:
        return {"toto": self.toto_parent, "root": self.root, "state": self.state_dir}[base]

    def target(self, key: str) -> Target:
        spec = TARGETS[key]
        rel = self.backtest_rel if key == "backtest" else spec.path
        optional = spec.optional and not (key == "backtest" and self.backtest_required)
        return Target(key, spec.base, rel, self.base_dir(spec.base) / rel, optional)

    def key_for(self, base: str, rel: str) -> str:
        """The target key of a recorded file, or the file itself where no key matches."""
        return next((k for k in TARGETS if (self.target(k).base, self.target(k).rel) == (base, rel)), rel)

    def resolve(self, base: str, rel: str) -> Path:
        return self.base_dir(base) / rel

    def display(self, path: Path) -> str:
        try:
            return os.path.relpath(path, Path.cwd())
        except ValueError:
            return str(path)


def locate(
    root: Path,
    installed: bool = False,
    backtest: Path | None = None,
    state_dir: Path | None = None,
    recorded_toto: str | None = None,
) -> Layout:
    """Find the Toto tree for ``root``; raise LayoutError naming the layouts looked for."""
    if not root.is_dir():
        raise LayoutError(f"{root}: --root is not a directory")
    root = root.resolve()
    toto_parent = _find_toto(root, installed, recorded_toto)
    return Layout(root, toto_parent, _backtest_rel(root, backtest), state_dir_for(root, state_dir),
                  backtest is not None)


def state_dir_for(root: Path, state_dir: Path | None) -> Path:
    return (state_dir or root.resolve() / ".totopatch").absolute()


def user_state_dir(toto_parent: Path) -> Path:
    """Where ``--installed`` keeps its state: per user, keyed by the package's resolved folder, so any
    working directory finds it and a read-only site-packages needs no write beyond the patched files."""
    home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    key = hashlib.sha256(str(toto_parent.resolve()).encode()).hexdigest()[:16]
    return Path(home).absolute() / "totopatch" / f"toto-{key}"


def _find_toto(root: Path, installed: bool, recorded: str | None) -> Path:
    if installed:
        found = installed_toto()
        if found is None:
            raise LayoutError("--installed: no 'toto' package is importable in this Python environment")
        return found
    for parent in (root / "toto", root):
        if (parent / "toto" / "model" / "util.py").is_file():
            return parent
    if recorded and Path(recorded).is_dir():  # the tree this state belongs to, even with its files gone
        return Path(recorded)
    raise LayoutError(f"{root}: no Toto tree found; looked for {' and '.join(LAYOUTS)}; "
                      "use --root DIR or --installed")


def installed_toto() -> Path | None:
    """The folder holding the ``toto`` package that ``import toto`` would load, found without importing it."""
    spec = importlib.machinery.PathFinder.find_spec("toto")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _backtest_rel(root: Path, backtest: Path | None) -> str:
    if backtest is None:
        return TARGETS["backtest"].path
    absolute = Path(os.path.realpath(Path(backtest).absolute().parent)) / Path(backtest).name
    rel = os.path.relpath(absolute, root)
    if rel.startswith(".."):
        raise LayoutError(f"{backtest}: --backtest must lie inside --root {root} "
                          "(the manifest records paths relative to it)")
    return Path(rel).as_posix()


@dataclass(frozen=True)
class Installed:
    """One ``toto_ts-*.dist-info`` beside the package: its version and the sha256 of every file pip installed."""

    version: str
    hashes: dict[str, str]  # path relative to the folder holding ``toto`` (posix) -> sha256 hex

    def matching(self, toto_parent: Path) -> int:
        """How many of the package's files still hold the bytes this release installed."""
        return sum(1 for rel, digest in self.hashes.items()
                   if rel.startswith("toto/") and _file_sha256(toto_parent / rel) == digest)


def installed_releases(toto_parent: Path) -> list[Installed]:
    """Every toto-ts dist-info beside the package; ``pip install --upgrade --target`` leaves the old one there."""
    found = []
    for info in sorted(toto_parent.glob("toto_ts-*.dist-info")):
        try:
            meta = (info / "METADATA").read_text(errors="replace")
            record = (info / "RECORD").read_text(errors="replace") if (info / "RECORD").is_file() else ""
        except OSError:
            continue
        match = re.search(r"^Version: (\S+)$", meta, re.M)
        if match:
            found.append(Installed(match.group(1), _record_hashes(record)))
    return found


def toto_version(toto_parent: Path) -> str | None:
    """The toto-ts release installed beside the package, decided by the files' bytes where pip left several.

    With one dist-info, its version.  With more (an upgrade with ``--target`` keeps the old one), the release
    whose RECORD matches the most files on disk; None where none matches more files than the others.
    """
    releases = installed_releases(toto_parent)
    if len(releases) <= 1:
        return releases[0].version if releases else None
    counts = sorted(((r.matching(toto_parent), r.version) for r in releases), reverse=True)
    (best, version), (second, _) = counts[0], counts[1]
    return version if best > second else None


def installed_as(toto_parent: Path, rel: str, digest: str) -> str | None:
    """The toto-ts release whose RECORD lists ``rel`` with exactly these bytes (sha256 hex), if any."""
    return next((r.version for r in reversed(installed_releases(toto_parent)) if r.hashes.get(rel) == digest), None)


def _record_hashes(record: str) -> dict[str, str]:
    """RECORD's ``path,sha256=<urlsafe base64>,size`` lines as path -> sha256 hex."""
    hashes = {}
    for line in record.splitlines():
        path, _, rest = line.partition(",")
        algorithm, _, value = rest.partition(",")[0].partition("=")
        if algorithm == "sha256" and value:
            try:
                hashes[path] = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
            except ValueError:
                continue
    return hashes


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
