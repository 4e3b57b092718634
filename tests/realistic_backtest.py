"""A generated backtest script with the structures of the users' real one (3,000-4,300 lines).

Toto, Kronos and Chronos loaders side by side, a fast-simulation helper pinning the Toto mode
with ``setdefault``, the Toto loader's mode chain next to its backend chain, log messages and
docstrings that mention the modes, and many strategy, metric and reporting functions around them.
Written for these tests; no third-party text.
"""
from __future__ import annotations

HEADER = '''\
#!/usr/bin/env python3
"""Inline backtest of forecasting models over many symbols.

Toto, Kronos and Chronos are loaded side by side; the default torch.compile mode was
"max-autotune" for all of them (see TOTO_COMPILE_MODE, KRONOS_COMPILE_MODE).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger("backtest")

_TOTO_PIPELINE: Optional[Any] = None
_KRONOS_PIPELINE: Optional[Any] = None
_CHRONOS_PIPELINE: Optional[Any] = None


@dataclass
class BacktestConfig:
    symbols: List[str] = field(default_factory=lambda: ["AAPL", "MSFT", "NVDA"])
    context_length: int = 512
    prediction_length: int = 64
    num_samples: int = 256
    use_toto: bool = True
    use_kronos: bool = True
    use_chronos: bool = False


def enable_fast_simulation() -> None:
    """Pin a fast compile mode for quick simulations; this is not the loader default."""
    os.environ.setdefault("TOTO_COMPILE_MODE", "reduce-overhead")
    os.environ.setdefault("FAST_SIMULATION", "1")
    logger.info("Fast simulation: TOTO_COMPILE_MODE=%s", os.environ["TOTO_COMPILE_MODE"])


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.getenv(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}
'''

TOTO_LOADER = '''

def load_toto_pipeline(device: str = "cuda") -> Any:
    """Load Toto once and compile it.

    The mode defaults to "max-autotune" unless TOTO_COMPILE_MODE says otherwise.
    """
    global _TOTO_PIPELINE
    if _TOTO_PIPELINE is not None:
        return _TOTO_PIPELINE

    compile_enabled = _env_flag("TOTO_COMPILE", default=True)
    compile_mode_env = (
        os.getenv("REAL_TOTO_COMPILE_MODE")
        or os.getenv("TOTO_COMPILE_MODE")
        or "max-autotune"  # fastest kernels after a slow first call
    )
    compile_mode = (compile_mode_env or "").strip() or "max-autotune"
    compile_backend_env = os.getenv("REAL_TOTO_COMPILE_BACKEND") or os.getenv("TOTO_COMPILE_BACKEND") or "inductor"
    compile_backend = (compile_backend_env or "").strip()
    if not compile_backend:
        compile_backend = None
    model_id = os.getenv("TOTO_MODEL_ID") or "Datadog/Toto-Open-Base-1.0"
    if compile_mode not in {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}:
        logger.warning("Unknown Toto compile mode %r; using 'max-autotune'", compile_mode)
        compile_mode = "max-autotune"
    logger.info("Loading Toto (compile=%s, mode=%s, backend=%s)", compile_enabled, compile_mode, compile_backend)
    _TOTO_PIPELINE = {"device": device, "compile": compile_enabled, "mode": compile_mode,
                      "backend": compile_backend, "model": model_id}
    return _TOTO_PIPELINE


def load_kronos_pipeline(device: str = "cuda") -> Any:
    """Kronos has its own compile mode ("max-autotune")."""
    global _KRONOS_PIPELINE
    if _KRONOS_PIPELINE is None:
        mode = os.getenv("KRONOS_COMPILE_MODE", "max-autotune")
        _KRONOS_PIPELINE = {"device": device, "mode": mode}
    return _KRONOS_PIPELINE


def load_chronos_pipeline(device: str = "cuda") -> Any:
    global _CHRONOS_PIPELINE
    if _CHRONOS_PIPELINE is None:
        backend = os.getenv("CHRONOS_COMPILE_BACKEND") or "inductor"
        mode = os.getenv("CHRONOS_COMPILE_MODE") or "max-autotune"
        _CHRONOS_PIPELINE = {"device": device, "mode": mode, "backend": backend}
    return _CHRONOS_PIPELINE
'''

BLOCK = '''

@dataclass
class Strategy{n}Result:
    symbol: str
    returns: List[float] = field(default_factory=list)
    trades: int = 0
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def sharpe(self) -> float:
        if len(self.returns) < 2:
            return 0.0
        mean = sum(self.returns) / len(self.returns)
        var = sum((r - mean) ** 2 for r in self.returns) / (len(self.returns) - 1)
        return mean / math.sqrt(var) * math.sqrt(252) if var > 0 else 0.0


def strategy_{n}(prices: List[float], forecast: List[float], threshold: float = 0.00{m}) -> Strategy{n}Result:
    """Trade when the forecast moves more than the threshold (variant {n})."""
    result = Strategy{n}Result(symbol="SYM{n}")
    position = 0
    for i, (price, predicted) in enumerate(zip(prices[:-1], forecast)):
        change = (predicted - price) / price if price else 0.0
        if change > threshold and position <= 0:
            position, result.trades = 1, result.trades + 1
        elif change < -threshold and position >= 0:
            position, result.trades = -1, result.trades + 1
        realised = (prices[i + 1] - price) / price if price else 0.0
        result.returns.append(position * realised)
    result.notes["mode"] = os.getenv("KRONOS_COMPILE_MODE", "max-autotune")
    return result


def report_{n}(results: List[Strategy{n}Result], path: Optional[str] = None) -> Dict[str, float]:
    summary = {{
        "trades": float(sum(r.trades for r in results)),
        "sharpe": max((r.sharpe for r in results), default=0.0),
    }}
    try:
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2)
    except OSError as exc:
        logger.error("could not write %s: %s", path, exc)
    logger.debug(f"strategy {n}: {{summary['trades']:.0f}} trades, sharpe {{summary['sharpe']:.3f}}")
    return summary
'''

FOOTER = '''

def run_backtest(config: BacktestConfig, device: str = "cuda") -> Dict[str, Any]:
    started = time.time()
    models: Dict[str, Any] = {}
    if config.use_toto:
        models["toto"] = load_toto_pipeline(device)
    if config.use_kronos:
        models["kronos"] = load_kronos_pipeline(device)
    if config.use_chronos:
        models["chronos"] = load_chronos_pipeline(device)
    logger.info("backtest of %d symbols with %s", len(config.symbols), sorted(models))
    return {"models": models, "elapsed": time.time() - started}


if __name__ == "__main__":
    if _env_flag("FAST_SIMULATION"):
        enable_fast_simulation()
    print(run_backtest(BacktestConfig()))
'''


def realistic_script(lines: int = 4300) -> str:
    """The generated script, grown with strategy blocks to at least ``lines`` lines."""
    text = HEADER + TOTO_LOADER
    n = 0
    while (text + FOOTER).count("\n") < lines:
        text += BLOCK.format(n=n, m=n % 10)
        n += 1
    return text + FOOTER
