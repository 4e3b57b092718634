"""The click CLI: a thin layer that builds a Context, calls the engine and turns reports into exit codes."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from . import __version__, engine, environment, state
from .engine import Code, Context, Report
from .state import open_context
from .patches import COMPILE_MODES, PATCHES
from .render import as_json, as_text
from .smoke_run import BACKENDS, attach_smoke


@dataclass(frozen=True)
class Where:
    root: Path
    installed: bool
    backtest: Path | None
    state_dir: Path | None

    def context(self) -> Context:
        try:
            return open_context(self.root, self.installed, self.backtest, self.state_dir)
        except engine.Abort as exc:
            _die(exc.code, str(exc))


def _die(code: Code, message: str) -> NoReturn:
    click.echo(f"totopatch: error: {message}", err=True)
    sys.exit(int(code))


def _finish(report: Report, as_json_output: bool, show_diff: bool = False) -> NoReturn:
    if as_json_output:
        click.echo(as_json(report))
    else:
        text = as_text(report, show_diff, color=_color())
        if text:
            click.echo(text)
        if report.error:
            click.echo(f"totopatch: error: {report.error}", err=True)
    sys.exit(int(report.code))


def _color() -> bool:
    """Colour diffs only for a terminal, unless --no-color or NO_COLOR (https://no-color.org) says not to."""
    ctx = click.get_current_context(silent=True)
    off = ctx is not None and ctx.find_root().meta.get("totopatch.no_color", False)
    return not off and not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def _with_environment(context: Context, report: Report) -> Report:
    """Notes on what the current environment overrides; they never change the exit code."""
    if report.error is None:
        options = {e.patch: e.options for e in state.load(context).manifest.entries}  # as status saw it
        live = {i.patch: options.get(i.patch, {}) for i in report.items if i.state in environment.IN_EFFECT_STATES}
        found = environment.read(os.environ, PATCHES, live)
        report.environment = found.as_dict()
        report.notes.extend(found.notes)
    return report


def _selected(ids: tuple[str, ...]) -> list:
    try:
        return engine.select(PATCHES, ids)
    except engine.Abort as exc:
        _die(exc.code, str(exc))


json_option = click.option("--json", "as_json_output", is_flag=True,
                           help="Print a JSON report (schema in docs/commands.md).")
patch_ids = click.argument("patch_ids", nargs=-1, metavar="[PATCH_ID]...")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="totopatch")
@click.option("--root", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Project root: holds the Toto tree, the backtest script and .totopatch/.")
@click.option("--installed", is_flag=True, help="Patch the toto package that `import toto` resolves to.")
@click.option("--backtest", type=click.Path(path_type=Path), default=None,
              help="Backtest script, which must then exist [default: <root>/backtest_test3_inline.py, if present].")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the manifest and backups here [default: <root>/.totopatch; with --installed, "
              "a per-user folder keyed by the package's path].")
@click.option("--no-color", is_flag=True, help="Never colour diffs (they are coloured only on a terminal without NO_COLOR).")
@click.pass_context
def main(ctx: click.Context, root: Path, installed: bool, backtest: Path | None, state_dir: Path | None,
         no_color: bool) -> None:
    """Safe, reversible patches that make Toto fast under torch.compile."""
    ctx.obj = Where(root, installed, backtest, state_dir)
    ctx.meta["totopatch.no_color"] = no_color


@main.command("list")
def list_patches() -> None:
    """List the known patches."""
    for ref in PATCHES:
        patch = ref.load()
        default = "" if ref.default else "  [opt-in]"
        click.echo(f"{ref.id:<14} {', '.join(ref.targets):<22} {patch.description}{default}")


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Print the unified diff; write nothing.")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default=None,
              help="The Toto loader's new default compile mode [default: the recorded one, else reduce-overhead].")
@click.option("--adopt-legacy", is_flag=True, help="Take over files edited by the old text-based script.")
@json_option
@click.pass_obj
def apply(where: Where, patch_ids: tuple[str, ...], dry_run: bool, compile_mode: str | None, adopt_legacy: bool,
          as_json_output: bool) -> None:
    """Apply all default patches, or only those named."""
    refs = _selected(patch_ids)
    options = {"compile_mode": compile_mode} if compile_mode else {}
    report = engine.apply(where.context(), refs, options, dry_run=dry_run, adopt_legacy=adopt_legacy)
    _finish(report, as_json_output, show_diff=dry_run)


@main.command()
@patch_ids
@click.option("--check", is_flag=True, help="Exit 1 unless every selected patch is applied and intact.")
@json_option
@click.pass_obj
def status(where: Where, patch_ids: tuple[str, ...], check: bool, as_json_output: bool) -> None:
    """Show what is applied, drifted, missing or in conflict. Never writes."""
    context = where.context()
    report = _with_environment(context, engine.status(context, _selected(patch_ids), check=check))
    _finish(report, as_json_output)


@main.command()
@patch_ids
@click.option("--smoke", is_flag=True, help="Also compile the patched Toto and run a forecast (CPU, or CUDA if present).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the smoke test runs.")
@click.option("--backend", type=click.Choice(BACKENDS), default="eager", show_default=True,
              help="torch.compile backend of the smoke test: eager (dynamo only, fast) or inductor.")
@click.option("--mode", "compile_mode", type=click.Choice(COMPILE_MODES), default=None,
              help="torch.compile mode of the smoke test (with --backend inductor).")
@json_option
@click.pass_obj
def verify(where: Where, patch_ids: tuple[str, ...], smoke: bool, device: str, backend: str,
           compile_mode: str | None, as_json_output: bool) -> None:
    """Prove the applied patches: structure, hashes, backups and, with --smoke, a compile test."""
    context = where.context()
    report = _with_environment(context, engine.verify(context, _selected(patch_ids)))
    if smoke and report.code in (Code.OK, Code.NOT_DESIRED):
        report = attach_smoke(context, report, device, backend, compile_mode,
                              progress=lambda phase: click.echo(f"smoke: {phase}", err=True))
    _finish(report, as_json_output)


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Print what would be restored; write nothing.")
@click.option("--force", is_flag=True, help="Restore the original even over edits in the patched region "
              "(your version is saved aside first).")
@json_option
@click.pass_obj
def revert(where: Where, patch_ids: tuple[str, ...], dry_run: bool, force: bool, as_json_output: bool) -> None:
    """Undo recorded changes in reverse order, restoring the exact original bytes."""
    ids = patch_ids or tuple(p.id for p in PATCHES)
    report = engine.revert(where.context(), _selected(ids), dry_run=dry_run, force=force,
                           include_unknown=not patch_ids)
    _finish(report, as_json_output, show_diff=dry_run or bool(report.error))


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Say which records would be dropped; write nothing.")
@json_option
@click.pass_obj
def forget(where: Where, patch_ids: tuple[str, ...], dry_run: bool, as_json_output: bool) -> None:
    """Drop the records of patched files that were deleted or replaced since; write no target."""
    ids = patch_ids or tuple(p.id for p in PATCHES)
    report = engine.forget(where.context(), _selected(ids), dry_run=dry_run, include_unknown=not patch_ids)
    _finish(report, as_json_output)


@main.command()
@json_option
@click.pass_obj
def doctor(where: Where, as_json_output: bool) -> None:
    """Where you stand: Python, torch, which Toto is imported, patch states, environment, advice."""
    from . import doctor as dr

    if not where.root.is_dir():
        _die(Code.USAGE, f"{where.root}: --root is not a directory")
    found = dr.examine(where.root, where.installed, where.backtest, where.state_dir, os.environ)
    click.echo(dr.as_json(found) if as_json_output else dr.as_text(found))
    sys.exit(found.code)


@main.command()
@click.option("--keep", is_flag=True, help="Keep the throwaway workspace and print where it is.")
@click.option("--diff", "show_diff", is_flag=True, help="Show each step's full report and the diffs.")
def demo(keep: bool, show_diff: bool) -> None:
    """Run apply, status, verify and revert on a throwaway copy of the installed toto-ts."""
    from .demo import run_demo

    sys.exit(run_demo(click.echo, keep, show_diff))
