"""Compile smoke test of a Toto tree: eager vs ``torch.compile`` forecasts with the KV cache.

Run it in a fresh process, so that ``toto`` comes from the tree under test::

    python -m totopatch.smoke --toto-parent DIR [--device cpu|cuda|auto] [--backend eager|inductor]
                              [--mode MODE] [--shape tiny|base] [--json]

``DIR`` holds the ``toto`` package; the run fails unless ``toto.__file__`` lies under it.  It builds
a random-weight Toto with a fixed seed (``tiny``: 4 layers, 32 wide; ``base``: the shape of
Toto-Open-Base-1.0), forecasts eagerly with the KV cache, compiles the backbone, warms it up with
a 3-patch forecast, then runs the full forecast (6 patches) compiled.  Recompiles are counted in
that last run only: a cache that specialises per position or per layer recompiles there.

Each phase is announced on stderr as it starts, as a line ``smoke phase: <what>`` (building the
model, eager forecast, compile, warm-up, forecast); ``totopatch verify --smoke`` shows them.

JSON keys (``--json`` prints one object on stdout; logs go to stderr):

- ``ok`` (bool): no error, compiled output matches eager, no recompile after warm-up, no
  recompile-limit hit; the exit status is 0 exactly when ``ok``
- ``error`` (str or null): what failed, e.g. an import error or a forecast exception
- ``toto_file`` (str): ``toto.__file__`` as imported
- ``kv_cache_class`` (str): the class the model allocates (``KVCacheCompileFriendly`` when patched)
- ``torch_version``, ``device``, ``backend``, ``mode`` (str or null), ``shape`` (``tiny``/``base``)
- ``context_length``, ``prediction_length``, ``warmup_prediction_length`` (int)
- ``graph_breaks`` (int): dynamo's graph-break counter over warm-up and measured run
- ``graph_break_reasons`` (object): first line of each reason -> count
- ``recompiles_warmup``, ``recompiles_after_warmup``, ``recompile_limit_hits`` (int)
- ``unique_graphs`` (int): graphs dynamo compiled
- ``cudagraph_skips`` (int): times inductor fell back from CUDA graphs (e.g. "mutated inputs")
- ``outputs_match`` (bool), ``max_abs_diff``, ``max_rel_diff`` (float): measured compiled
  forecast vs the eager one (exact for the eager backend, ``--rtol``/``--atol`` otherwise)
- ``eager_s``, ``warmup_s``, ``compiled_s`` (float): wall seconds of the three forecasts
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .model_shape import SHAPES, toto_kwargs

WARMUP_PATCHES, MEASURED_PATCHES = 3, 6
PROGRESS_PREFIX = "smoke phase: "


@dataclass(frozen=True)
class SmokeResult:
    """What one smoke run saw; ``ok`` says whether it passed."""

    error: str | None = None
    toto_file: str = ""
    kv_cache_class: str = ""
    torch_version: str = ""
    device: str = ""
    backend: str = ""
    mode: str | None = None
    shape: str = ""
    context_length: int = 0
    prediction_length: int = 0
    warmup_prediction_length: int = 0
    graph_breaks: int = 0
    graph_break_reasons: dict[str, int] = field(default_factory=dict)
    recompiles_warmup: int = 0
    recompiles_after_warmup: int = 0
    recompile_limit_hits: int = 0
    unique_graphs: int = 0
    cudagraph_skips: int = 0
    outputs_match: bool = False
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    eager_s: float = 0.0
    warmup_s: float = 0.0
    compiled_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.error is None and self.outputs_match and self.recompiles_after_warmup == 0
                and self.recompile_limit_hits == 0 and self.cudagraph_skips == 0)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


class _DynamoLog(logging.Handler):
    """Count dynamo's recompile messages and recompile-limit warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.recompiles = 0
        self.limit_hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.recompiles += message.startswith("Recompiling function")
        self.limit_hits += "recompile_limit" in message or "cache_size_limit" in message


def _phase(what: str) -> None:
    """Announce a phase on stderr at once (the whole run takes 15-90 s on a CPU)."""
    print(f"{PROGRESS_PREFIX}{what}", file=sys.stderr, flush=True)


def import_toto(toto_parent: Path) -> Any:
    """Import ``toto`` from ``toto_parent``; refuse one imported from anywhere else."""
    parent = toto_parent.resolve()
    sys.path.insert(0, str(parent))
    import toto

    where = Path(toto.__file__).resolve()
    if parent not in where.parents:
        raise ImportError(f"toto was imported from {where}, not from {parent} (run in a fresh process)")
    return toto


def build_model(shape: str = "tiny", seed: int = 0) -> Any:
    """A random-weight Toto of ``shape`` (eval mode, on the CPU) from the imported toto."""
    import torch
    from toto.model.toto import Toto

    torch.manual_seed(seed)
    model = Toto(**toto_kwargs(shape))
    return model.eval()


def make_series(variates: int, length: int, device: str, seed: int = 1) -> Any:
    """A seeded random walk per variate as a MaskedTimeseries, one minute apart."""
    import torch
    from toto.data.util.dataset import MaskedTimeseries

    series = torch.randn(variates, length, generator=torch.Generator().manual_seed(seed)).cumsum(-1)
    return MaskedTimeseries(series=series.to(device),
                            padding_mask=torch.ones(variates, length, dtype=torch.bool, device=device),
                            id_mask=torch.zeros(variates, length, dtype=torch.int, device=device),
                            timestamp_seconds=(torch.arange(length, device=device) * 60).expand(variates, length),
                            time_interval_seconds=torch.full((variates,), 60, device=device))


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _timed(device: str, run: Any) -> tuple[Any, float]:
    import torch

    start = time.perf_counter()
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _reasons(counter: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason, count in counter.items():
        first = reason.strip().splitlines()[0] if reason.strip() else reason
        out[first] = out.get(first, 0) + count
    return out


@contextmanager
def _dynamo_log() -> Iterator[_DynamoLog]:
    import torch

    handler = _DynamoLog()
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


def run_smoke(toto_parent: Path, device: str = "auto", backend: str = "eager", mode: str | None = None,
              shape: str = "tiny", seed: int = 0, rtol: float | None = None, atol: float | None = None) -> SmokeResult:
    """Run the smoke test in this process (which must not have imported toto from elsewhere)."""
    base = SmokeResult(backend=backend, mode=mode, shape=shape)
    try:
        toto = import_toto(toto_parent)
        import torch

        base = SmokeResult(backend=backend, mode=mode, shape=shape, toto_file=toto.__file__,
                           torch_version=torch.__version__, device=_resolve_device(device))
        return _measure(base, seed, rtol, atol)
    except Exception as exc:  # the report is the product: any failure becomes its error field
        return SmokeResult(**{**asdict(base), "error": f"{type(exc).__name__}: {exc}"})


def _measure(base: SmokeResult, seed: int, rtol: float | None, atol: float | None) -> SmokeResult:
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from toto.inference.forecaster import TotoForecaster

    dims, device = SHAPES[base.shape], base.device
    patch = dims["patch_size"]
    warm_len, full_len = WARMUP_PATCHES * patch, MEASURED_PATCHES * patch
    _phase(f"building the model ({base.shape} shape, {device})")
    model = build_model(base.shape, seed).to(device)
    series = make_series(dims["variates"], dims["context_length"], device)

    with torch.no_grad():
        _phase(f"eager forecast ({MEASURED_PATCHES} patches)")
        eager, eager_s = _timed(device, lambda: TotoForecaster(model.model).forecast(
            series, prediction_length=full_len, use_kv_cache=True).mean)
        torch._dynamo.reset()
        counters.clear()
        kwargs = {} if base.mode is None else {"mode": base.mode}
        _phase(f"compile (torch.compile, backend {base.backend}, mode {base.mode or 'default'})")
        compiled = TotoForecaster(torch.compile(model.model, backend=base.backend, **kwargs))
        with _dynamo_log() as log:
            _phase(f"warm-up forecast ({WARMUP_PATCHES} patches; compiles on the first call)")
            _, warmup_s = _timed(device, lambda: compiled.forecast(series, prediction_length=warm_len, use_kv_cache=True))
            warm_recompiles = log.recompiles
            _phase(f"compiled forecast ({MEASURED_PATCHES} patches)")
            out, compiled_s = _timed(device, lambda: compiled.forecast(
                series, prediction_length=full_len, use_kv_cache=True).mean)

    exact = base.backend == "eager" and rtol is None and atol is None
    diff = (out - eager).abs()
    matches = torch.equal(out, eager) if exact else torch.allclose(
        out, eager, rtol=1e-3 if rtol is None else rtol, atol=1e-4 if atol is None else atol)
    return SmokeResult(**{
        **asdict(base),
        "kv_cache_class": sys.modules["toto.model.backbone"].KVCache.__name__,
        "context_length": dims["context_length"], "prediction_length": full_len, "warmup_prediction_length": warm_len,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": _reasons(counters["graph_break"]),
        "recompiles_warmup": warm_recompiles, "recompiles_after_warmup": log.recompiles - warm_recompiles,
        "recompile_limit_hits": log.limit_hits, "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "outputs_match": bool(matches), "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / eager.abs().clamp_min(1e-12)).max()),
        "eager_s": round(eager_s, 3), "warmup_s": round(warmup_s, 3), "compiled_s": round(compiled_s, 3),
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m totopatch.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--toto-parent", type=Path, required=True, help="the folder that holds the toto package")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", default="eager", help="torch.compile backend (eager, inductor, ...)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    result = run_smoke(args.toto_parent, args.device, args.backend, args.mode, args.shape, args.seed,
                       args.rtol, args.atol)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for key, value in result.to_json().items():
            print(f"{key}: {value}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
