"""The contract between the engine and the patch modules in ``totopatch/patches/``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping


class Refusal(Exception):
    """The source does not have the shape a patch expects; nothing may be written."""

    def __init__(self, reason: str, lines: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lines = lines  # 1-based line numbers of the candidates, for file:line reports


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
    ``Refusal`` for any shape it does not recognise.  ``adopt_legacy`` turns a file
    edited by the old script back into the pre-legacy source, or raises ``Refusal``.
    """

    id: str
    description: str
    targets: tuple[str, ...]
    rewrite: RewriteFn
    adopt_legacy: Callable[[str], str] | None = None
    default: bool = True


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
