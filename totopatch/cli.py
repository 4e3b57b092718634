"""The click CLI: a thin layer that builds a Context, calls the engine and turns outcomes into output and exit codes.

Every command returns a ``render.Output``; ``TotopatchGroup.main`` prints it, once, and exits with its code.
Whatever stops a command before it has one (click's usage errors, an ``Abort`` while opening the state, a bug,
Ctrl-C) becomes an ``Output`` too, so ``--json`` anywhere on the command line gives one JSON object on stdout,
and every error is one line on stderr.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from . import __version__, engine, environment, render, state
from .engine import Code, Context, Report
from .patches import COMPILE_MODES, PATCHES, SAMPLING_MODES
from .render import Output
from .smoke_run import BACKENDS, attach_smoke
from .state import open_context

JSON_FLAG = "--json"


@dataclass(frozen=True)
class Where:
    root: Path | None  # None: not named, the working directory
    installed: bool
    backtest: Path | None
    state_dir: Path | None

    def context(self) -> Context:
        """The tree's context; its ``engine.Abort`` (a missing root, a state folder that is a file) is the error."""
        return open_context(self.root, self.installed, self.backtest, self.state_dir)


class TotopatchGroup(click.Group):
    """Click's group, with every outcome, click's own errors included, printed here and made the exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except engine.Abort as exc:  # before the command had a report: opening the state, an unknown patch id
            return render.error_output(ctx.invoked_subcommand, exc.code, str(exc))

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json_output = JSON_FLAG in argv
        printed = io.StringIO()  # under --json, what click prints itself (a help page, the version)
        with contextlib.redirect_stdout(printed) if as_json_output else contextlib.nullcontext():
            output = self._outcome(argv, prog_name, complete_var, extra, printed.getvalue)
        if as_json_output:
            click.echo(output.json)
        elif output.text:
            click.echo(output.text)
        if output.error:
            click.echo(render.error_line(output.error), err=True)
        if standalone_mode:
            sys.exit(output.code)
        return output.code

    def _outcome(self, argv: list[str], prog_name: str | None, complete_var: str | None, extra: dict[str, Any],
                 printed: Callable[[], str]) -> Output:
        try:
            value = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f"; try '{exc.ctx.command_path} -h' for help" if exc.ctx is not None else ""
            message = exc.format_message().rstrip(".")
            return render.error_output(self._named(exc.ctx, argv), Code.USAGE, message + hint)
        except click.ClickException as exc:
            return render.error_output(self._named(None, argv), Code.USAGE, exc.format_message())
        except click.Abort:
            return render.error_output(self._named(None, argv), Code.INTERRUPTED, "interrupted")
        except Exception as exc:  # a bug: still one line, and JSON under --json
            return render.error_output(self._named(None, argv), Code.INTERNAL, _internal(exc))
        if isinstance(value, Output):
            return value
        code = value if isinstance(value, int) else 0  # a help page or the version (click.Exit), the demo's status
        return render.text_output(self._named(None, argv), code, printed())

    def _named(self, ctx: click.Context | None, argv: list[str]) -> str | None:
        """The command a failed command line was for: click's, else the first word naming one, else None."""
        if ctx is not None and ctx.command is not self and ctx.command.name:
            return ctx.command.name
        return next((word for word in argv if word in self.commands), None)


def _internal(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"internal error {type(exc).__name__}{where}: {exc}; this is a bug in totopatch, please report it"


def _output(report: Report, show_diff: bool = False) -> Output:
    return render.report_output(report, show_diff, color=_color())


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


def _selected(ids: tuple[str, ...]) -> list | None:
    """The patches named; None where none is (the engine then takes the default and every recorded one)."""
    return engine.select(PATCHES, ids) if ids else None


json_option = click.option(JSON_FLAG, "as_json_output", is_flag=True,
                           help="Print one JSON object on stdout, errors included (schema in docs/commands.md).")
patch_ids = click.argument("patch_ids", nargs=-1, metavar="[PATCH_ID]...")


@click.group(name="totopatch", cls=TotopatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="totopatch")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Project root: holds the Toto tree, the backtest script and .totopatch/ [default: ., or with "
              "--installed the root its state records].")
@click.option("--installed", is_flag=True, help="Patch the toto package that `import toto` resolves to.")
@click.option("--backtest", type=click.Path(path_type=Path), default=None,
              help="Backtest script, which must then exist [default: <root>/backtest_test3_inline.py, if present].")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the manifest and backups here [default: <root>/.totopatch; with --installed, "
              "a per-user folder keyed by the package's path].")
@click.option("--no-color", is_flag=True, help="Never colour diffs (they are coloured only on a terminal without NO_COLOR).")
@json_option
@click.pass_context
def main(ctx: click.Context, root: Path | None, installed: bool, backtest: Path | None, state_dir: Path | None,
         no_color: bool, as_json_output: bool) -> None:
    """Safe, reversible patches that make Toto fast and stable, with torch.compile or without it."""
    ctx.obj = Where(root, installed, backtest, state_dir)
    ctx.meta["totopatch.no_color"] = no_color


@main.command("list")
@json_option
def list_patches(as_json_output: bool) -> Output:
    """List the known patches."""
    lines, rows = [], []
    width = max(len(ref.id) for ref in PATCHES)
    places = max(len(", ".join(ref.targets)) for ref in PATCHES)
    for ref in PATCHES:
        patch = ref.load()
        default = "" if ref.default else "  [opt-in]"
        lines.append(f"{ref.id:<{width}} {', '.join(ref.targets):<{places}} {patch.description}{default}")
        rows.append({"id": ref.id, "targets": list(ref.targets), "description": patch.description,
                     "default": ref.default})
    return render.text_output("list", Code.OK, "\n".join(lines), patches=rows)


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Print the unified diff; write nothing.")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default=None,
              help="The Toto loader's new default compile mode [default: the recorded one, else reduce-overhead].")
@click.option("--sampling", type=click.Choice(SAMPLING_MODES), default=None,
              help="shared-prefill's default sampling: exact (upstream's samples for a seed) or same-law (only the "
              "kept steps drawn; the same distribution); TOTOPATCH_SAMPLING overrides it at run time "
              "[default: the recorded one, else exact].")
@click.option("--adopt-legacy", is_flag=True, help="Take over files edited by the old text-based script.")
@json_option
@click.pass_obj
def apply(where: Where, patch_ids: tuple[str, ...], dry_run: bool, compile_mode: str | None, sampling: str | None,
          adopt_legacy: bool, as_json_output: bool) -> Output:
    """Apply all default patches, or only those named."""
    refs = _selected(patch_ids)
    options = {"compile_mode": compile_mode} if compile_mode else {}
    if sampling:
        options["sampling"] = sampling
    report = engine.apply(where.context(), refs, options, dry_run=dry_run, adopt_legacy=adopt_legacy)
    return _output(report, show_diff=dry_run)


@main.command()
@patch_ids
@click.option("--check", is_flag=True, help="Exit 1 unless every selected patch is applied and intact.")
@json_option
@click.pass_obj
def status(where: Where, patch_ids: tuple[str, ...], check: bool, as_json_output: bool) -> Output:
    """Show what is applied, drifted, missing or in conflict. Never writes."""
    context = where.context()
    return _output(_with_environment(context, engine.status(context, _selected(patch_ids), check=check)))


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
           compile_mode: str | None, as_json_output: bool) -> Output:
    """Prove the applied patches: structure, hashes, backups and, with --smoke, a compile test."""
    context = where.context()
    report = _with_environment(context, engine.verify(context, _selected(patch_ids)))
    if smoke and report.code in (Code.OK, Code.NOT_DESIRED):
        report = attach_smoke(context, report, device, backend, compile_mode,
                              progress=lambda phase: click.echo(f"smoke: {phase}", err=True))
    return _output(report)


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Print what would be restored; write nothing.")
@click.option("--force", is_flag=True, help="Restore the original even over edits in the patched region "
              "(your version is saved aside first).")
@json_option
@click.pass_obj
def revert(where: Where, patch_ids: tuple[str, ...], dry_run: bool, force: bool, as_json_output: bool) -> Output:
    """Undo recorded changes in reverse order, restoring the exact original bytes."""
    context = where.context()
    refs = engine.select(PATCHES, patch_ids or tuple(p.id for p in PATCHES))
    report = engine.revert(context, refs, dry_run=dry_run, force=force, include_unknown=not patch_ids)
    return _output(report, show_diff=dry_run or bool(report.error))


@main.command()
@patch_ids
@click.option("--dry-run", is_flag=True, help="Say which records would be dropped; write nothing.")
@json_option
@click.pass_obj
def forget(where: Where, patch_ids: tuple[str, ...], dry_run: bool, as_json_output: bool) -> Output:
    """Drop the records of patched files that were deleted or replaced since; write no target."""
    context = where.context()
    refs = engine.select(PATCHES, patch_ids or tuple(p.id for p in PATCHES))
    return _output(engine.forget(context, refs, dry_run=dry_run, include_unknown=not patch_ids))


@main.command()
@json_option
@click.pass_obj
def doctor(where: Where, as_json_output: bool) -> Output:
    """Where you stand: Python, torch, which Toto is imported, patch states, environment, advice."""
    from . import doctor as dr

    root = where.root or Path(".")
    if not root.is_dir():
        raise engine.Abort(Code.USAGE, f"{root}: --root is not a directory")
    found = dr.examine(where.root, where.installed, where.backtest, where.state_dir, os.environ)
    return Output(found.code, dr.as_text(found), dr.as_json(found), found.error)


@main.command()
@click.option("--keep", is_flag=True, help="Keep the throwaway workspace and print where it is.")
@click.option("--diff", "show_diff", is_flag=True, help="Show each step's full report and the diffs.")
def demo(keep: bool, show_diff: bool) -> int:
    """Run apply, status, verify and revert on a throwaway copy of the installed toto-ts."""
    from .demo import run_demo

    return run_demo(click.echo, keep, show_diff)
