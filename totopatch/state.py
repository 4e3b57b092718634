"""Which tree and which state folder a command works on; the folder's life itself is ``state_folder``'s."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import manifest as mf
from .fsio import file_on_path
from .layout import Layout, LayoutError, locate, state_dir_for, user_state_dir
from .outcome import Abort, Code

if TYPE_CHECKING:
    from .state_folder import Loaded


@dataclass(frozen=True)
class Context:
    layout: Layout
    backups_in_state: bool = False

    @property
    def manifest_path(self) -> Path:
        return self.layout.state_dir / "manifest.json"

    @property
    def journal_path(self) -> Path:
        return self.layout.state_dir / "journal.json"

    @property
    def lock_path(self) -> Path:
        return self.layout.state_dir / "lock"


def open_context(root: Path | None, installed: bool = False, backtest: Path | None = None,
                 state_dir: Path | None = None) -> Context:
    """Find the tree and its state folder; raise Abort(USAGE) naming what was expected.

    ``root`` None means none was named (the working directory).  With ``--installed`` the state belongs to
    the package, so a root not named is the one the state records, whatever the working directory.  A
    backtest script not named is the one the state records.
    """
    if state_dir is not None:
        _usable_state_dir(state_dir, "--state-dir")
    named = root is not None
    root = Path(".") if root is None else root
    try:
        if installed:
            layout = locate(root, True, backtest)
            state = (state_dir or user_state_dir(layout.toto_parent)).absolute()
            _usable_state_dir(state, "the per-user state folder")
            recorded = _recorded(state)
            if not named and backtest is None and (theirs := recorded_root(recorded)) is not None:
                layout = locate(theirs, True, None)
            return Context(replace(with_recorded_backtest(layout, recorded, backtest), state_dir=state),
                           backups_in_state=True)
        recorded = _recorded(state_dir_for(root, state_dir)) if root.is_dir() else None
        layout = locate(root, False, backtest, state_dir, recorded.toto_dir if recorded else None)
        if state_dir is None and recorded is None and (owner := _ancestor_owning(layout)) is not None:
            layout = replace(locate(owner, False, backtest), toto_parent=layout.toto_parent)
            recorded = _recorded(layout.state_dir)
        layout = with_recorded_backtest(layout, recorded, backtest)
    except LayoutError as exc:
        raise Abort(Code.USAGE, str(exc)) from None
    if layout.state_dir.exists() and not layout.state_dir.is_dir():
        raise Abort(Code.USAGE, f"{layout.state_dir}: the state folder is a file; move it, or use --state-dir DIR")
    return Context(layout, backups_in_state=state_dir is not None)


def recorded_root(recorded: mf.Manifest | None) -> Path | None:
    """The root a state records files under, where it records any and that folder is still there."""
    if recorded is None or not recorded.root or not any(e.base == "root" for e in recorded.entries):
        return None
    root = Path(recorded.root)
    return root if root.is_dir() else None


def with_recorded_backtest(layout: Layout, recorded: mf.Manifest | None, backtest: Path | None) -> Layout:
    """The layout with the backtest script the state records, where none was named."""
    if backtest is not None or recorded is None:
        return layout
    rel = next((e.file for e in recorded.entries if e.base == "root"), None)
    return replace(layout, backtest_rel=rel) if rel is not None else layout


def _usable_state_dir(state: Path, what: str) -> None:
    """Refuse, as a usage error, a state folder that is a file or lies under one."""
    blocker = file_on_path(state)
    if blocker is None:
        return
    if blocker == state:
        raise Abort(Code.USAGE, f"{state}: {what} must be a folder, found a file")
    raise Abort(Code.USAGE, f"{state}: {what} runs through {blocker}, which is a file; expected a folder path")


def _recorded(state: Path) -> mf.Manifest | None:
    """The manifest in ``state`` if it records anything."""
    if not (state / "manifest.json").is_file():
        return None
    try:
        manifest = mf.load(state / "manifest.json")
    except mf.StateError as exc:
        raise Abort(Code.STATE, str(exc)) from None
    return manifest if manifest.entries else None


def _ancestor_owning(layout: Layout) -> Path | None:
    """A folder above the root whose state records this Toto tree (run from inside a project)."""
    for folder in layout.root.parents:
        try:
            recorded = _recorded(folder / ".totopatch")
        except Abort:
            continue
        if recorded is not None and recorded.toto_dir and Path(recorded.toto_dir).resolve() == layout.toto_parent.resolve():
            return folder
    return None


def load(ctx: Context) -> "Loaded":
    """The manifest with any interrupted run's journal replayed (``state_folder.StateFolder.load``)."""
    from .state_folder import StateFolder

    return StateFolder(ctx).load()


def bind(ctx: Context, manifest: mf.Manifest) -> mf.Manifest:
    """The manifest as saved: it names the tree it belongs to."""
    backtest = ctx.layout.target("backtest").path
    return replace(manifest, toto_dir=str(ctx.layout.toto_parent.resolve()), root=str(ctx.layout.root),
                   backtest=str(backtest) if backtest.exists() else None)


def check_owner(ctx: Context, recorded: mf.Manifest) -> None:
    """Refuse a state folder that records changes to another tree, naming both."""
    if not recorded.entries:
        return
    layout = ctx.layout
    toto, root = layout.toto_parent.resolve(), layout.root
    their_toto = Path(recorded.toto_dir).resolve() if recorded.toto_dir else None
    their_root = Path(recorded.root) if recorded.root else None
    if their_root is not None and their_root != root and layout.state_dir == root / ".totopatch":
        # the state lives inside the tree: the tree was moved or copied, and the state with it
        if their_toto is not None:
            their_toto = Path(os.path.normpath(root / os.path.relpath(their_toto, their_root)))
        their_root = root
    if their_toto is not None and not _same(their_toto, toto) and any(e.base == "toto" for e in recorded.entries):
        raise Abort(Code.USAGE, f"{layout.state_dir}: this state belongs to the Toto tree {their_toto}, "
                    f"not {toto}; use that tree's state, or another --state-dir for this one")
    if their_root is not None and not _same(their_root, root) and any(e.base == "root" for e in recorded.entries):
        raise Abort(Code.USAGE, f"{layout.state_dir}: this state belongs to the root {their_root}, not {root}; "
                    f"run with --root {their_root}, or use another --state-dir for this root")


def _same(a: Path, b: Path) -> bool:
    """The same folder, by name or, through links and mounts, by identity."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False
