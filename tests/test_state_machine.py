"""A stateful property: apply, revert, user edits, kills at every crash point and toto-ts swaps, in any order.

After every step four invariants are checked, each in its own method so a failure names it:

(a) ``original_bytes_are_recoverable``: the bytes a file held before totopatch first patched it are in the
    file, in a file of the state folder, or in a backup the manifest (or a pending journal) records; the same
    for a user's version that ``revert --force`` replaced.  No run finds its own state untrustworthy (exit 7).
(b) ``status_and_revert_agree``: whatever status calls ``applied``, ``outdated`` or ``drifted``, revert (on a
    copy of the project) reverts without ``--force``, and a file whose patches are all ``applied`` or
    ``outdated`` comes back exactly (with the user's edits an apply re-recorded it with); where all are
    ``applied``, what revert gives back, patched again with the file's recorded stack, is the file.
(c) ``gate_passes_exactly_when_applied_and_intact``: ``status --check`` passes exactly when every default
    patch's file is recorded, hashes to its recorded result (or the top of its stack), is of the recorded
    toto-ts version and, where an entry of its stack records another totopatch's fingerprint, is what this
    totopatch's patches make of the recorded original; ``verify`` then passes too.
(d) ``no_traceback_and_documented_codes``: no step or check raised, every exit code is a documented one.

The library runs in-process, each patch's pure rewrite remembered; only the kills run the CLI in a
subprocess (``TOTOPATCH_TEST_CRASH_AT``).  Budget: ``TOTOPATCH_STATEFUL_EXAMPLES`` (default 16) sequences of
up to ``TOTOPATCH_STATEFUL_STEPS`` (default 12) steps, under a minute of one core.

By default the sequences are derandomized: every run (CI's too) draws the same ones, so a pass or a failure
is the same on every machine.  To explore others, give a seed; each seed draws its own sequences, the same
ones on every run::

    for n in $(seq 1 20); do
        TOTOPATCH_STATEFUL_SEED=$n python -m pytest -q -n 0 -p no:randomly tests/test_state_machine.py
    done

(``TOTOPATCH_STATEFUL_EXAMPLES=200`` draws more sequences per run.)  A failure names its invariant and prints
every step taken and a ``@reproduce_failure`` blob; rerun its seed to replay it, and set
``TOTOPATCH_STATEFUL_SHRINK=1`` to shrink the sequence (minutes).  The seed goes on the machine class, where
hypothesis reads it (a ``@seed`` on its ``TestCase`` is ignored); pytest's ``--hypothesis-seed`` does not
override the derandomized default, so use the variable.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import prefork
import pytest
from hypothesis import HealthCheck, Phase, seed, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import SAMPLE_BACKTEST, installed_toto_package, make_outdated
from totopatch import engine
from totopatch.fsio import CRASH_POINTS
from totopatch.layout import TARGETS
from totopatch.outcome import Code, Report, State
from totopatch.patches import PATCHES, by_id, code_sha256
from totopatch.reading import text
from totopatch.spec import Refusal, Rewrite
from totopatch.state import open_context
from totopatch.state_folder import StateFolder

WORKTREE = Path(__file__).resolve().parent.parent
VERSIONS = ("0.1.3", "0.1.4", "0.2.0")
TOTO_TARGETS = {k: s.path for k, s in TARGETS.items() if s.base == "toto"}  # key -> path under the toto parent
BACKTEST = "backtest_test3_inline.py"
DEFAULT = [p for p in PATCHES if p.default]
DOCUMENTED_CODES = {int(c) for c in Code}
EDITS = ("top", "bottom", "above", "on-line", "below", "blank-below", "code-far")
NOTE = "# a user's note"


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def release(version: str) -> dict[str, bytes]:
    """The target files of one toto-ts release, and its dist-info METADATA, by path under the toto parent."""
    source = installed_toto_package().parent if version == "0.2.0" else WORKTREE / ".toto-versions" / version
    files = {rel: (source / rel).read_bytes() for rel in TOTO_TARGETS.values() if (source / rel).is_file()}
    files[f"toto_ts-{version}.dist-info/METADATA"] = (source / f"toto_ts-{version}.dist-info" / "METADATA").read_bytes()
    return files


@functools.lru_cache(maxsize=None)
def region_lines(key: str, version: str) -> frozenset[str]:
    """The lines any patch changes in this target of this release, on either side of the change."""
    data = SAMPLE_BACKTEST if key == "backtest" else release(version).get(TOTO_TARGETS[key])
    if data is None:
        return frozenset()
    before = data.decode()
    after = before
    for ref in PATCHES:
        if key in ref.targets:
            try:
                after = ref.load().rewrite(after, dict(ref.options)).source
            except Exception:
                continue
    lines: set[str] = set()
    a, b = before.splitlines(), after.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            lines.update(x for x in a[i1:i2] + b[j1:j2] if x.strip())
    return frozenset(lines)


def edit(data: bytes, kind: str, region: frozenset[str], pick: int) -> bytes:
    """A user's edit of one kind, at a line of the patched region where the kind needs one."""
    text = data.decode()
    lines = text.splitlines(keepends=True)
    eol = "\r\n" if "\r\n" in text else "\n"
    if kind == "top":
        return (NOTE + eol + text).encode()
    if kind == "bottom" or kind == "code-far":
        tail = "" if not text or text.endswith(("\n", "\r")) else eol
        added = NOTE + eol if kind == "bottom" else f"USER_CONSTANT_{pick} = {pick}{eol}"
        return (text + tail + added).encode()
    spots = [i for i, line in enumerate(lines) if line.rstrip("\r\n") in region
             and not line.rstrip("\r\n").endswith("\\") and '"""' not in line and "'''" not in line]
    if not spots:
        return (NOTE + eol + text).encode()
    at = spots[pick % len(spots)]
    line = lines[at]
    indent = line[: len(line) - len(line.lstrip())]
    if kind == "on-line":
        body = line.rstrip("\r\n")
        lines[at] = body + "  " + NOTE + line[len(body):]
    elif kind == "above":
        lines.insert(at, indent + NOTE + eol)
    elif kind == "below":
        lines.insert(at + 1, indent + NOTE + eol)
    else:  # blank-below: the blank line right after the region line, else a new line there
        if at + 1 < len(lines) and not lines[at + 1].strip():
            lines[at + 1] = indent + NOTE + lines[at + 1].lstrip(" \t")
        else:
            lines.insert(at + 1, indent + NOTE + eol)
    return "".join(lines).encode()


@pytest.fixture(autouse=True, scope="module")
def _remembered_rewrites() -> Iterator[None]:
    """Each patch's rewrite is a pure function of (source, options): remember its results while the machine runs.

    The machine asks about the same few sources at every step; LibCST's parse was nine tenths of its time.
    """
    modules = [importlib.import_module(f"totopatch.patches.{ref.module}") for ref in PATCHES]
    patches = [m.PATCH for m in modules]
    for module, patch in zip(modules, patches):
        module.PATCH = dataclasses.replace(patch, rewrite=_remember(patch.rewrite))
    yield
    for module, patch in zip(modules, patches):
        module.PATCH = patch


def _remember(rewrite: Callable[[str, Mapping[str, str]], Rewrite]) -> Callable[[str, Mapping[str, str]], Rewrite]:
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], Rewrite | Refusal] = {}

    def remembered(source: str, options: Mapping[str, str]) -> Rewrite:
        key = (source, tuple(sorted(options.items())))
        if key not in seen:
            try:
                seen[key] = rewrite(source, options)
            except Refusal as exc:
                seen[key] = exc
        found = seen[key]
        if isinstance(found, Refusal):
            raise found
        return found

    return remembered


@dataclass
class Obligation:
    """Bytes that must stay recoverable: an original, or a user's version that revert --force replaced."""

    key: str
    data: bytes
    why: str


class TotopatchMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="totopatch-machine-"))
        self.root = self.tmp / "project"
        self.version = "0.2.0"
        for rel, data in release(self.version).items():
            (self.root / "toto" / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / "toto" / rel).write_bytes(data)
        (self.root / BACKTEST).write_bytes(SAMPLE_BACKTEST)
        self.obligations: list[Obligation] = []
        self.origin: dict[str, bytes] = {}  # the original the current record of each file was made from
        self.problems: list[str] = []  # (d): tracebacks and undocumented exit codes, with the step
        self.untrusted: list[str] = []  # (a): a run that found its own state untrustworthy
        self.steps: list[str] = []
        self._status_at, self._status_report = -1, Report("status")

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    def path(self, key: str) -> Path:
        return self.root / (BACKTEST if key == "backtest" else Path("toto") / TOTO_TARGETS[key])

    def files(self) -> dict[str, bytes | None]:
        return {k: (self.path(k).read_bytes() if self.path(k).is_file() else None) for k in (*TOTO_TARGETS, "backtest")}

    def ctx(self) -> engine.Context:
        return open_context(self.root)

    def call(self, what: str, action: Callable[[], Report]) -> Report | None:
        """Run a library call; a raise or an undocumented code is an invariant (d) problem."""
        try:
            report = action()
        except Exception:
            self.problems.append(f"{what} raised:\n{traceback.format_exc()}")
            return None
        code = int(report.code)
        if code not in DOCUMENTED_CODES:
            self.problems.append(f"{what} exited {code}, not a documented exit code")
        if code == Code.STATE:
            self.untrusted.append(f"{what} found the state untrustworthy: {report.error}")
        return report

    def live_keys(self) -> set[str]:
        """Targets with a record that still concerns the file there (not replaced by another release)."""
        try:
            loaded = StateFolder(self.ctx()).load()
        except Exception:
            return set()
        live = set()
        for entry in loaded.manifest.entries:
            key = self.ctx().layout.key_for(entry.base, entry.file)
            if entry.base == "toto" and entry.toto_version not in (None, self.version):
                continue
            live.add(key)
        return live

    def tool_step(self, what: str, action: Callable[[], object]) -> None:
        """Run a step of totopatch and learn the originals it put in its care."""
        self.steps.append(what)
        live, before, bottoms = self.live_keys(), self.files(), self.recorded_originals()
        action()
        after = self.files()
        for key, data in before.items():
            if data is not None and after[key] != data and key not in live:
                self.obligations.append(Obligation(key, data, f"original before {what}"))
                self.origin[key] = data
        for key, (digest, path) in self.recorded_originals().items():
            if key in self.origin and key in live and bottoms.get(key, (digest,))[0] != digest \
                    and path.is_file() and hashlib.sha256(held := path.read_bytes()).hexdigest() == digest:
                self.origin[key] = held  # re-recorded as it stood: revert gives back the user's edits with it
        self.discharge()

    def recorded_originals(self) -> dict[str, tuple[str, Path]]:
        """Per target with one stack recorded: the sha256 of its original and the backup that holds it."""
        try:
            manifest = StateFolder(self.ctx()).load().manifest
        except Exception:
            return {}
        layout = self.ctx().layout
        out: dict[str, list[tuple[str, Path]]] = {}
        for entry in manifest.entries:
            if not manifest.below(entry) and entry.before_sha256 != entry.after_sha256:
                out.setdefault(layout.key_for(entry.base, entry.file), []).append(
                    (entry.before_sha256, layout.resolve(entry.backup_base, entry.backup)))
        return {key: found[0] for key, found in out.items() if len(found) == 1}

    def discharge(self) -> None:
        """An original the file holds again, with nothing recorded for it, is the user's once more.  While a killed
        run's journal holds entries it may still record; one left with only backups to clear is a finished run."""
        live, files = self.live_keys(), self.files()
        try:
            pending = bool(StateFolder(self.ctx()).load().journal)
        except Exception:
            pending = True
        self.obligations = [o for o in self.obligations if pending or o.key in live or files[o.key] != o.data]

    # ------------------------------------------------------------ rules

    @rule(ids=st.sampled_from([(), ("compile-mode",), ("kv-cache",), ("sdpa-causal",), ("shared-prefill",),
                               ("spacewise-mask",), ("spacewise-mask", "layer-region"), ("layer-region",)]))
    def apply(self, ids: tuple[str, ...]) -> None:
        refs = engine.select(PATCHES, ids)
        self.tool_step(f"apply {' '.join(ids) or '(defaults)'}",
                       lambda: self.call("apply", lambda: engine.apply(self.ctx(), refs, {})))

    @rule(ids=st.sampled_from([(), ("compile-mode",), ("sdpa-causal",), ("spacewise-mask",), ("layer-region",),
                               ("spacewise-mask", "layer-region")]), force=st.booleans())
    def revert(self, ids: tuple[str, ...], force: bool) -> None:
        refs = engine.select(PATCHES, ids or tuple(p.id for p in PATCHES))
        files = self.files()

        def run() -> None:
            report = self.call("revert", lambda: engine.revert(self.ctx(), refs, force=force, include_unknown=not ids))
            for item in report.items if report else ():
                if item.state == State.REVERTED and "forced" in item.detail and files.get(item.target) is not None:
                    self.obligations.append(Obligation(item.target, files[item.target], "the user's version, forced over"))

        self.tool_step(f"revert {' '.join(ids) or '(all)'}{' --force' if force else ''}", run)

    @rule(key=st.sampled_from([*TOTO_TARGETS, "backtest"]), kind=st.sampled_from(EDITS),
          pick=st.integers(0, 1000))
    def user_edits(self, key: str, kind: str, pick: int) -> None:
        path = self.path(key)
        if not path.is_file():
            return
        self.steps.append(f"edit {key} {kind} {pick}")
        path.write_bytes(edit(path.read_bytes(), kind, region_lines(key, self.version), pick))

    @rule(command=st.sampled_from([("apply",), ("apply", "compile-mode"), ("apply", "spacewise-mask", "layer-region"),
                                   ("revert",), ("revert", "--force"), ("revert", "compile-mode")]),
          point=st.sampled_from(CRASH_POINTS))
    def killed(self, command: tuple[str, ...], point: str) -> None:
        def run() -> None:
            env = {**os.environ, "TOTOPATCH_TEST_CRASH_AT": point,
                   "PYTHONPATH": os.pathsep.join(filter(None, (str(WORKTREE), os.environ.get("PYTHONPATH"))))}
            ran = subprocess.run([prefork.python("cli"), "-m", "totopatch", "--root", str(self.root), *command],
                                 capture_output=True, text=True, env=env, timeout=300)
            if "Traceback" in ran.stderr or (ran.returncode not in DOCUMENTED_CODES
                                             and ran.returncode != -signal.SIGKILL):
                self.problems.append(f"{' '.join(command)} killed at {point}: exit {ran.returncode}\n{ran.stderr}")
            if ran.returncode == Code.STATE:
                self.untrusted.append(f"{' '.join(command)} (kill at {point}): {ran.stderr.strip()}")

        self.tool_step(f"{' '.join(command)} killed at {point}", run)

    @rule(key=st.sampled_from([*TOTO_TARGETS, "backtest"]))
    def earlier_totopatch(self, key: str) -> None:
        """The file as an earlier totopatch wrote it: its top patch's block differs, under another fingerprint."""
        if make_outdated(self.root, key):
            self.steps.append(f"{key} as an earlier totopatch wrote it")

    @rule(version=st.sampled_from(VERSIONS))
    def swap_release(self, version: str) -> None:
        """What pip does to the package folder: the old release's files go, the new one's come; others stay."""
        if version == self.version:
            return
        self.steps.append(f"swap toto-ts {self.version} -> {version}")
        toto = self.root / "toto"
        for rel in release(self.version):
            (toto / rel).unlink(missing_ok=True)
        shutil.rmtree(toto / f"toto_ts-{self.version}.dist-info", ignore_errors=True)
        for rel, data in release(version).items():
            (toto / rel).parent.mkdir(parents=True, exist_ok=True)
            (toto / rel).write_bytes(data)
        self.version = version
        self.discharge()

    # ------------------------------------------------------------ invariants

    @invariant()
    def original_bytes_are_recoverable(self) -> None:
        assert not self.untrusted, "invariant (a): " + "; ".join(self.untrusted) + self._trail()
        held = self._held_bytes()
        files = self.files()
        for o in self.obligations:
            assert files[o.key] == o.data or _h(o.data) in held, (
                f"invariant (a): {o.why} of {o.key} (sha {_h(o.data)}) is in neither the file nor the state folder"
                f" nor a recorded backup" + self._trail())

    @invariant()
    def status_and_revert_agree(self) -> None:
        status = self._status()
        if status.error:
            return
        states = {(i.patch, i.target): State(i.state) for i in status.items}
        ids = {p for p, _ in states}
        recorded = {k for k, s in states.items() if s not in (State.NOT_APPLIED, State.NOT_PRESENT)}
        on = {p: {t: s for (q, t), s in states.items() if q == p} for p in ids}
        live = (State.APPLIED, State.OUTDATED, State.DRIFTED)
        chosen = {p for p in ids if all(s in (*live, State.NOT_PRESENT) for s in on[p].values())
                  and any(s in live for s in on[p].values())}
        while stacked := {p for p in chosen for t in on[p] if any((q, t) in recorded for q in ids - chosen)}:
            chosen -= stacked  # a recorded patch outside the set may lie on top of it: no promise alone
        if not chosen:
            return
        copy = self.tmp / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.root, copy, symlinks=True)
        try:
            report = engine.revert(open_context(copy), [r for r in PATCHES if r.id in chosen])
        except Exception:
            raise AssertionError(f"invariant (d) in (b): revert on a copy raised:\n{traceback.format_exc()}"
                                 + self._trail()) from None
        promised = {k: s for k, s in states.items() if k[0] in chosen and s in live}
        assert report.code == Code.OK, (
            f"invariant (b): status said {_fmt(promised)}, but revert {' '.join(sorted(chosen))} exited "
            f"{int(report.code)}: {report.error}" + self._trail())
        done = {(i.patch, i.target): i.state for i in report.items}
        for key, state in promised.items():
            assert done.get(key) == State.REVERTED, (
                f"invariant (b): status said {key[0]} on {key[1]} is {state}, revert made it {done.get(key)}"
                + self._trail())
        for target in {t for _, t in promised}:
            mine = {p: states[(p, t)] for p, t in recorded if t == target}
            if set(mine) <= chosen and set(mine.values()) <= {State.APPLIED, State.OUTDATED} \
                    and target in self.origin:
                got = (copy / self.path(target).relative_to(self.root)).read_bytes()
                assert got == self.origin[target], (
                    f"invariant (b): status said {target} is applied, but revert did not restore its original "
                    f"exactly (sha {_h(got)}, expected {_h(self.origin[target])})" + self._trail())
            if set(mine) <= chosen and set(mine.values()) == {State.APPLIED}:
                got = (copy / self.path(target).relative_to(self.root)).read_bytes()
                again, how = self._repatched(target, got)
                assert again is None or again == self.files()[target], (
                    f"invariant (b): status said {target} is applied, but what revert gave back (sha {_h(got)}), "
                    f"patched again with {how}, is not the file: revert took out more or less than the patches' "
                    "change" + self._trail())

    def _repatched(self, target: str, data: bytes) -> tuple[bytes | None, str]:
        """``data`` with the file's recorded stack applied again, bottom first, with the recorded options, and the
        stack's order; None where the file's entries are not one stack of known patches."""
        manifest = StateFolder(self.ctx()).load().manifest
        layout = self.ctx().layout
        mine = [e for e in manifest.entries if layout.key_for(e.base, e.file) == target]
        bottoms = [e for e in mine if not manifest.below(e)]
        if len(bottoms) != 1 or len(chain := (bottoms[0], *manifest.above(bottoms[0]))) != len(mine):
            return None, ""
        source, encode = text(self.path(target), data)
        if any(by_id(e.patch) is None for e in chain):
            return None, ""
        for entry in chain:
            ref = by_id(entry.patch)
            assert ref is not None
            options = {**ref.options, **{k: v for k, v in entry.options.items() if k in ref.options}}
            try:
                source = ref.load().rewrite(source, options).source
            except Refusal as exc:
                raise AssertionError(f"invariant (b): status said {target} is applied, but what revert gave back "
                                     f"(sha {_h(data)}) is refused by {entry.patch}: {exc}" + self._trail()) from None
        return encode(source), " then ".join(e.patch for e in chain)

    @invariant()
    def gate_passes_exactly_when_applied_and_intact(self) -> None:
        status = self._status()
        if status.error:
            return
        gate = Report("status", [i for i in status.items if i.patch in {r.id for r in DEFAULT}], check=True)
        expected, why = self._applied_and_intact()
        passed = gate.code == Code.OK
        assert passed == expected, (
            f"invariant (c): status --check {'passed' if passed else 'failed'}, but the files are "
            f"{'' if expected else 'not '}all applied and intact ({why}); status: "
            f"{_fmt({(i.patch, i.target): i.state for i in gate.items})}" + self._trail())
        if passed:
            try:
                verify = engine.verify(self.ctx(), DEFAULT)
            except Exception:
                raise AssertionError(f"invariant (d) in (c): verify raised:\n{traceback.format_exc()}"
                                     + self._trail()) from None
            assert verify.code == Code.OK, (
                f"invariant (c): status --check passed but verify exited {int(verify.code)}: "
                f"{_fmt({(i.patch, i.target): i.state + ' ' + i.detail for i in verify.items})}" + self._trail())

    @invariant()
    def no_traceback_and_documented_codes(self) -> None:
        assert not self.problems, "invariant (d): " + "\n".join(self.problems) + self._trail()

    # ------------------------------------------------------------ what the invariants read

    def _status(self) -> Report:
        """Status of every patch, once per step (the gate of the default ones is read from it)."""
        if self._status_at != len(self.steps):
            try:
                report = engine.status(self.ctx(), list(PATCHES))
            except Exception:
                raise AssertionError(f"invariant (d): status raised:\n{traceback.format_exc()}"
                                     + self._trail()) from None
            if report.code not in DOCUMENTED_CODES:
                raise AssertionError(f"invariant (d): status exited {report.code}" + self._trail())
            if report.code == Code.STATE:
                raise AssertionError(f"invariant (a): status found the state untrustworthy: {report.error}"
                                     + self._trail())
            self._status_report, self._status_at = report, len(self.steps)
        return self._status_report

    def _held_bytes(self) -> set[str]:
        """Short hashes of the state folder's files, and of the backups its manifest, journal or clean-up list name."""
        state = self.root / ".totopatch"
        held = {_h(p.read_bytes()) for p in state.rglob("*") if p.is_file() and not p.is_symlink()}
        folder = StateFolder(self.ctx())
        loaded = folder.load()
        entries = list(loaded.manifest.entries) + [i.entry for i in loaded.journal]
        listed = [self.ctx().layout.resolve(e.backup_base, e.backup) for e in entries]
        listed += [self.ctx().layout.resolve(base, rel) for base, rel in loaded.pending]  # still to be cleared
        held |= {_h(path.read_bytes()) for path in listed if path.is_file()}
        return held

    def _applied_and_intact(self) -> tuple[bool, str]:
        """The oracle of (c), from the manifest (journal replayed) and the files' hashes alone."""
        ctx = self.ctx()
        manifest = StateFolder(ctx).load().manifest
        for ref in DEFAULT:
            for key in ref.targets:
                target = ctx.layout.target(key)
                if not target.path.is_file():
                    if target.optional:
                        continue
                    return False, f"{key} is missing"
                entry = manifest.find(ref.id, target.base, target.rel)
                if entry is None:
                    return False, f"{ref.id} on {key} is not recorded"
                if entry.base == "toto" and entry.toto_version not in (None, self.version):
                    return False, f"{ref.id} on {key} was recorded on toto-ts {entry.toto_version}"
                top, seen = entry, {entry.key}
                while nxt := next((e for e in manifest.entries if (e.base, e.file) == (entry.base, entry.file)
                                   and e.before_sha256 == top.after_sha256 and e.key not in seen), None):
                    top = nxt
                    seen.add(nxt.key)
                current = hashlib.sha256(target.path.read_bytes()).hexdigest()
                if current not in (entry.after_sha256, top.after_sha256):
                    return False, f"{key} does not hash to what {ref.id} recorded"
                if self._outdated(manifest, entry, current):
                    return False, f"{key} is not what this totopatch's patches make of its original"
        return True, "every default patch recorded, hashes, release and patch code match"

    def _outdated(self, manifest, entry, current: str) -> bool:  # type: ignore[no-untyped-def]
        """Whether a stack with another totopatch's fingerprint is not what this one writes from the original."""
        chain = [entry]
        while (low := next((e for e in manifest.entries if (e.base, e.file) == (entry.base, entry.file)
                            and e.after_sha256 == chain[0].before_sha256 and e not in chain), None)) is not None:
            chain.insert(0, low)
        while chain[-1].after_sha256 != current:
            chain.append(next(e for e in manifest.entries if (e.base, e.file) == (entry.base, entry.file)
                              and e.before_sha256 == chain[-1].after_sha256 and e not in chain))
        if all(e.code_sha256 == code_sha256(by_id(e.patch)) for e in chain):
            return False
        backup = self.ctx().layout.resolve(chain[0].backup_base, chain[0].backup)
        data = backup.read_bytes() if backup.is_file() else None
        if data is None or hashlib.sha256(data).hexdigest() != chain[0].before_sha256:
            return False  # not provable: status and verify fall back on the hashes (verify fails on the backup)
        for each in chain:
            ref = by_id(each.patch)
            try:
                data = ref.load().rewrite(data.decode(), {**ref.options, **each.options}).source.encode()
            except Refusal:
                return True
            if hashlib.sha256(data).hexdigest() != each.after_sha256:
                return True
        return False

    def _trail(self) -> str:
        return "\nsteps: " + " | ".join(self.steps)


def _fmt(states: dict) -> str:
    return ", ".join(f"{p}:{t}={s}" for (p, t), s in sorted(states.items()))


SEED = os.environ.get("TOTOPATCH_STATEFUL_SEED")
if SEED:  # hypothesis reads a state machine's @seed from the machine class: on its TestCase it is ignored
    seed(int(SEED))(TotopatchMachine)

TotopatchMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("TOTOPATCH_STATEFUL_EXAMPLES", "16")),
    stateful_step_count=int(os.environ.get("TOTOPATCH_STATEFUL_STEPS", "12")),
    deadline=None,
    print_blob=True,
    database=None,
    derandomize=not SEED,  # CI runs the same sequences every time; a seed explores others
    # Shrinking a sequence of kills takes minutes; a failure already prints every step it took.
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("TOTOPATCH_STATEFUL_SHRINK") else []),
    suppress_health_check=list(HealthCheck),
)

TestTotopatchMachine = TotopatchMachine.TestCase
