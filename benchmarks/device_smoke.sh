#!/bin/bash
# The GPU smoke checks of issue 4, on the lent GPU machine (see /work/.library/device/README.md).
# Usage (from the repo root, with .whl carried): bash benchmarks/device_smoke.sh
# Runs, each logged under $OUT (or benchmarks/results/<date>_cuda_smoke):
#   1. pytest -m gpu tests/test_gpu.py (apply to a copy of the installed toto-ts, base shape, reduce-overhead);
#   2. totopatch verify --smoke --device cuda --backend inductor --mode reduce-overhead on a demo project;
#   3. python -m totopatch.smoke on the unpatched and the patched tree, tiny and base shapes.
# pytest and the CLI run from a scratch folder, so that `import totopatch` is the installed wheel
# built into .whl, as a user has it.
set -o pipefail
source "$(dirname "$0")/device_common.sh"
REPO=$(pwd)
device_install || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
OUTDIR=$(device_outdir "$REPO/benchmarks/results/$(date -u +%F)_cuda_smoke") || exit 1
mkdir -p /tmp/scratch && cd /tmp/scratch || exit 1
device_env "$OUTDIR/env.txt"
status=0
python3 -m pytest -c "$REPO/setup.cfg" --rootdir "$REPO" -o addopts="" -p no:cacheprovider -m gpu -v -s "$REPO/tests/test_gpu.py" \
  2>&1 | tee "$OUTDIR/pytest_gpu.log" || status=1
python3 -c "from pathlib import Path; from totopatch.demo import build_workspace; build_workspace(Path('/tmp/scratch/proj'))" || exit 1
{ totopatch --root /tmp/scratch/proj apply && \
  totopatch --root /tmp/scratch/proj verify --smoke --device cuda --backend inductor --mode reduce-overhead; } \
  2>&1 | tee "$OUTDIR/verify_smoke_cuda.log" || status=1
python3 -c "import toto, pathlib; print(pathlib.Path(toto.__file__).parents[1])" > /tmp/unpatched_parent
for tree in unpatched patched; do
  parent=$([ $tree = patched ] && echo /tmp/scratch/proj/toto || cat /tmp/unpatched_parent)
  for shape in tiny base; do
    python3 -m totopatch.smoke --toto-parent "$parent" --device cuda --backend inductor --mode reduce-overhead \
      --shape $shape --json > "/tmp/scratch/${tree}_${shape}.json" 2>> "$OUTDIR/smoke_stderr.log"
    rc=$?
    echo "$tree $shape rc=$rc" | tee -a "$OUTDIR/smoke_stderr.log"
    # the unpatched tree is expected to fail (recompiles, cudagraph skips); the patched one must pass
    [ $tree = patched ] && [ $rc -ne 0 ] && status=1
  done
done
python3 - "$OUTDIR/smoke_cuda.json" <<'PY'
import json, sys
runs = {}
for tree in ("unpatched", "patched"):
    for shape in ("tiny", "base"):
        lines = open(f"/tmp/scratch/{tree}_{shape}.json").read().strip().splitlines()
        runs[f"{tree}/{shape}"] = json.loads(lines[-1]) if lines else {"error": "no output"}
json.dump(runs, open(sys.argv[1], "w"), indent=2)
for name, r in runs.items():
    print(name, {k: r.get(k) for k in ("ok", "error", "graph_breaks", "recompiles_after_warmup",
                                         "cudagraph_skips", "outputs_match", "max_abs_diff", "max_rel_diff")})
PY
exit $status
