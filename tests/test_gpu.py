"""GPU smoke test: the patched Toto-Open-Base-shaped model under reduce-overhead on CUDA.

Skipped where CUDA is absent (CI has no GPU); run on the device with `pytest -m gpu`.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_patched_toto_compiles_in_reduce_overhead_without_recompiles(project, cli) -> None:
    assert cli(project, "apply").exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "totopatch.smoke", "--toto-parent", str(project / "toto"), "--device", "cuda",
         "--backend", "inductor", "--mode", "reduce-overhead", "--shape", "base", "--json"],
        capture_output=True, text=True, timeout=1200,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    assert result["error"] is None
    assert result["kv_cache_class"] == "KVCacheCompileFriendly"
    assert result["recompiles_after_warmup"] == 0 and result["recompile_limit_hits"] == 0
    assert result["graph_breaks"] == 0
    assert result["outputs_match"]
    assert result["cudagraph_skips"] == 0
    assert proc.returncode == 0
