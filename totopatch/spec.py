"""The contract between the engine and the patch modules in ``totopatch/patches/``."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping


class Refusal(Exception):
    """The source does not have the shape a patch expects; nothing may be written.

    ``lines`` are 1-based line numbers for ``file:line`` reports: the candidates the patch saw, or with
    ``at`` the one line the reason is about (a syntax error, a byte the patch cannot keep).  ``hint`` says
    what to do; reports put it after the place.
    """

    def __init__(self, reason: str, lines: tuple[int, ...] = (), *, at: bool = False, hint: str = "") -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason
        self.lines = lines
        self.at = at
        self.hint = hint


class NeedsBase(Refusal):
    """The patch stacks on another patch's edit of the file, which is not there yet: not applied, not a conflict."""


class LegacyPatched(Refusal):
    """The source carries the edits of the old text-based patch script."""


@dataclass(frozen=True)
class Rewrite:
    """What a patch made of one file: the new source and anything the user should be told."""

    source: str
    notes: tuple[str, ...] = ()


Options = Mapping[str, str]
RewriteFn = Callable[[str, Options], Rewrite]


@dataclass(frozen=True)
class Patch:
    """One patch: pure ``source -> source`` functions plus the data the engine needs.

    ``rewrite`` must be idempotent (its own output comes back unchanged) and raise
    ``Refusal`` for any shape it does not recognise, also for a tree too deep to walk
    (``@refuses_deep_trees``).  ``adopt_legacy`` turns a file edited by the old script
    back into the pre-legacy source, or raises ``Refusal``.
    """

    id: str
    description: str
    targets: tuple[str, ...]
    rewrite: RewriteFn
    adopt_legacy: Callable[[str], str] | None = None
    default: bool = True


def refuses_deep_trees(rewrite: RewriteFn) -> RewriteFn:
    """Decorate a patch's ``rewrite``: a RecursionError becomes a Refusal (LibCST walks its trees recursively).

    Python's own parser gave up first where the file is too deep for Python (``textio.TooDeep``); this is
    what Python parses but LibCST cannot walk, e.g. a sum of a few thousand terms in a statement a patch reads.
    """
    @functools.wraps(rewrite)
    def guarded(source: str, options: Options) -> Rewrite:
        try:
            return rewrite(source, options)
        except RecursionError:
            raise Refusal("nested too deeply for LibCST (a RecursionError while walking its tree); Python can "
                          "parse it, but this patch cannot read it", hint="split the deep expression") from None

    guarded.refuses_deep_trees = True  # type: ignore[attr-defined]
    return guarded


@dataclass(frozen=True)
class PatchRef:
    """What the fast paths need to know of a patch without importing it (and LibCST)."""

    id: str
    module: str
    targets: tuple[str, ...]
    default: bool = True
    options: Mapping[str, str] = field(default_factory=dict)  # every option the patch takes, with its default
    compiled_only: bool = False  # changes nothing when Toto runs eagerly (e.g. TOTO_DISABLE_COMPILE=1)
    env_option: str | None = None  # the option a run-time environment variable can override

    def load(self) -> Patch:
        import importlib

        patch: Patch = importlib.import_module(f"totopatch.patches.{self.module}").PATCH
        if (patch.id, patch.targets) != (self.id, self.targets):
            raise RuntimeError(f"patch module {self.module} does not match its registry entry")
        return patch
