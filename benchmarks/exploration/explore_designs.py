#!/usr/bin/env python3
"""Run gpu_bench.py with prototype KV-cache designs (cache_designs.py) swapped into the unpatched toto.

This is how the exploration in ``benchmarks/results/exploration/README.md`` compared cache
designs before the ``kv-cache`` patch existed.  Rows are gpu_bench.py's, plus ``design=NAME[+EXTRA...]:MODE``
(NAME from ``cache_designs.DESIGNS``, EXTRA from ``cache_designs.EXTRAS``)::

    python benchmarks/exploration/explore_designs.py \\
        --rows eager,unpatched:default,unpatched:reduce-overhead,design=static+causal:reduce-overhead
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu_bench  # noqa: E402


def parse(text: str) -> dict:
    """gpu_bench's rows, plus ``design=NAME[+EXTRA...]:MODE[@SCEN+SCEN]`` on the unpatched toto."""
    head, _, scens = text.partition("@")
    variant, _, mode = head.rpartition(":")
    if not variant.startswith("design="):
        return {**gpu_bench.parse_row(text), "design": "none", "extras": []}
    name, *extras = variant[len("design="):].split("+")
    return {"variant": variant, "mode": mode, "only": scens.split("+") if scens else [],
            "design": name, "extras": extras}


def install(spec: dict) -> dict[str, Any]:
    """Swap the row's cache design into the imported toto."""
    import cache_designs

    note = cache_designs.install(spec.get("design", "none"), tuple(spec.get("extras", ())))
    return {"note": note, "stats": lambda: dict(cache_designs.POOL_STATS)}


if __name__ == "__main__":
    sys.exit(gpu_bench.main(parse=parse, install=install, script=Path(__file__).resolve()))
