"""Files patched by an earlier totopatch: told apart by the patch code's fingerprint, rebuilt from the original.

Each manifest entry records ``code_sha256``, the fingerprint of the code that wrote it (``patches.code_sha256``,
files hashed, nothing imported).  Where every entry of a file's stack carries this totopatch's fingerprint,
the file is as this totopatch writes it and no patch runs, so ``status --check`` stays free of LibCST.
Otherwise (another version's fingerprint, or none: a manifest written before the field) the stack is
rebuilt: the verified original (the bottom entry's backup) with each recorded patch applied again, in stack
order, with its recorded options.  Where that gives other bytes than the manifest records, the file is
``outdated``: the code that runs is not the code this totopatch writes, and ``apply`` writes the rebuilt
file.  Where it gives the same bytes, the file is applied, and ``apply`` records the current fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import manifest as mf
from .fsio import sha256
from .outcome import Abort, Code
from .patches import by_id, code_sha256
from .reading import text
from .spec import Refusal
from .state import Context
from .undo import options, verified_backup


@dataclass(frozen=True)
class Rebuilt:
    """A file's stack as this totopatch writes it from the recorded original."""

    chain: tuple[mf.Entry, ...]  # the entries whose patches the file holds, bottom first
    original: bytes  # the bottom entry's verified backup
    outputs: tuple[bytes, ...]  # what each patch of ``chain`` makes of what the one beneath it made
    problem: str = ""  # why this totopatch cannot rebuild it (a patch refuses the original), else ''

    @property
    def outdated(self) -> bool:
        """Whether the file holds other bytes than this totopatch writes (or can write)."""
        return bool(self.problem) or any(sha256(out) != e.after_sha256 for e, out in zip(self.chain, self.outputs))

    @property
    def inputs(self) -> tuple[bytes, ...]:
        """What each patch of ``chain`` is applied to: the original, then the output beneath it."""
        return (self.original, *self.outputs[:-1])

    def detail(self, entry: mf.Entry) -> str:
        """The status row's detail for ``entry``, one of ``chain``."""
        others = [e.patch for e in self.chain if e is not entry]
        stacked = f" (with {', '.join(others)} in the same file)" if others else ""
        if self.problem:
            return (f"applied by an earlier totopatch{stacked}, and this one cannot patch the original "
                    f"({self.problem}); `totopatch revert` restores the original")
        return f"applied by an earlier totopatch{stacked}; `totopatch apply` updates it"


def held(manifest: mf.Manifest, entry: mf.Entry, current: str) -> tuple[mf.Entry, ...] | None:
    """The entries of ``entry``'s stack that a file hashing to ``current`` holds, bottom first; None where it
    holds neither ``entry``'s result nor that of a patch stacked on it."""
    stack = manifest.stack(entry)
    at = stack.index(entry)
    top = next((i for i in range(at, len(stack)) if stack[i].after_sha256 == current), None)
    return None if top is None else stack[:top + 1]


def fresh(chain: tuple[mf.Entry, ...]) -> bool:
    """Whether every entry records this totopatch's fingerprint of its patch (no LibCST, no patch run)."""
    return all((ref := by_id(e.patch)) is not None and e.code_sha256 == code_sha256(ref) for e in chain)


def check(ctx: Context, manifest: mf.Manifest, entry: mf.Entry, current: str) -> Rebuilt | None:
    """The rebuilt stack of a file that holds ``entry``'s result (or its stack's), where a fingerprint in it is
    not this totopatch's; None where all are, or where it cannot be rebuilt (a patch this totopatch does not
    know, a backup that is not the original: verify and apply report that on their own)."""
    chain = held(manifest, entry, current)
    if chain is None or fresh(chain) or any(by_id(e.patch) is None for e in chain):
        return None
    return rebuild(ctx, chain)


def rebuild(ctx: Context, chain: tuple[mf.Entry, ...]) -> Rebuilt | None:
    """Each patch of ``chain`` applied again, in order, to the verified original; None without that original."""
    try:
        original = verified_backup(ctx, chain[0])
    except Abort as exc:
        if exc.code != Code.STATE:
            raise
        return None
    path = ctx.layout.resolve(chain[0].base, chain[0].file)
    data, outputs = original, []
    for entry in chain:
        ref = by_id(entry.patch)
        assert ref is not None
        try:
            source, encode = text(path, data)
            data = encode(ref.load().rewrite(source, options(entry)).source)
        except Refusal as exc:
            return Rebuilt(chain, original, tuple(outputs), f"{entry.patch}: {exc}")
        except Abort as exc:
            if exc.code != Code.REFUSED:
                raise
            return Rebuilt(chain, original, tuple(outputs), f"{entry.patch}: {exc}")
        outputs.append(data)
    return Rebuilt(chain, original, tuple(outputs))


def outdated_entry(entry: mf.Entry) -> bool:
    """Whether ``entry`` was written by another version of its patch (by its fingerprint; no patch run)."""
    ref = by_id(entry.patch)
    return ref is not None and entry.code_sha256 != code_sha256(ref)
