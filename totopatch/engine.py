"""The library: apply, status, verify, revert and forget each return a Report and never exit or print.

Reading order: ``outcome`` (codes, states, reports), ``state`` (manifest and journal), ``status``
(one decision tree per file), ``plan_apply`` and ``plan_revert`` (what to write), ``transaction``
(the one write path).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from .outcome import GOOD_STATES, REFUSING_STATES, Abort, Code, Item, Report, State
from .plan_apply import plan as plan_apply
from .plan_revert import plan as plan_revert, plan_forget, select as select_entries
from .spec import PatchRef
from .state import Context
from .state_folder import StateFolder
from .status import selected, status, verify
from .transaction import run

__all__ = ["GOOD_STATES", "REFUSING_STATES", "Abort", "Code", "Context", "Item", "Report", "State",
           "apply", "forget", "revert", "select", "status", "verify"]


def select(patches: Iterable[PatchRef], ids: tuple[str, ...]) -> list[PatchRef]:
    """The patches named (all default ones when none is), in registry order; the commands take None for
    "none named", which adds every patch the manifest records to the default ones."""
    patches = list(patches)
    known = {p.id for p in patches}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise Abort(Code.USAGE, f"unknown patch {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [p for p in patches if (p.id in ids if ids else p.default)]


def apply(ctx: Context, refs: list[PatchRef] | None = None, options: Mapping[str, str] | None = None, *,
          dry_run: bool = False, adopt_legacy: bool = False) -> Report:
    """Apply ``refs`` (None: the default patches and every recorded one); ``options`` holds only what was asked
    for: the rest keeps what was recorded, else defaults."""
    report = Report("apply")
    return run(ctx, report, lambda m: plan_apply(ctx, report, m, selected(refs, m), options or {}, adopt_legacy),
               dry_run=dry_run)


def revert(ctx: Context, refs: list[PatchRef], *, dry_run: bool = False, force: bool = False,
           include_unknown: bool = False) -> Report:
    """Undo the recorded changes of ``refs``, newest first; ``include_unknown`` adds patches this version lacks."""
    report = Report("revert")
    ids = {r.id for r in refs}

    def plan(manifest):  # type: ignore[no-untyped-def]
        entries = select_entries(manifest, ids, include_unknown)
        if not entries:
            report.notes.append("nothing to revert: no recorded change for " + ", ".join(sorted(ids)))
            if kept := StateFolder(ctx).kept(manifest):
                report.notes.append("copies kept aside in the state folder (each named by its sha256; the run "
                                    "that kept one said what it holds): "
                                    + ", ".join(ctx.layout.display(p) for p in kept))
        return plan_revert(ctx, report, manifest, entries, force)

    return run(ctx, report, plan, dry_run=dry_run)


def forget(ctx: Context, refs: list[PatchRef], *, dry_run: bool = False, include_unknown: bool = False) -> Report:
    """Drop the records of files that were deleted or replaced since apply; write no target."""
    report = Report("forget")
    ids = {r.id for r in refs}
    return run(ctx, report, lambda m: plan_forget(ctx, report, select_entries(m, ids, include_unknown)),
               dry_run=dry_run)
