#!/bin/bash
# Run gpu_bench.py on the lent GPU machine (see /work/.library/device/README.md).
# Usage (from the repo root, with .whl carried): bash benchmarks/device_run.sh STEM [gpu_bench.py args...]
# BENCH_TIMEOUT (s, default 540) stops the benchmark early enough for the logs to be packed.
# Results land in $OUT (or benchmarks/results): STEM.json/.md/.png, console.log, logs.tgz, env.txt.
set -o pipefail
STEM=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import sys, torch, triton, toto; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'toto', toto.__file__)"
  nproc
} 2>&1 | tee "$OUTDIR/env.txt"
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/gpu_bench.py --out "$OUTDIR" --stem "$STEM" "$@" 2>&1 | tee "$OUTDIR/console.log"
rc=$?
tar czf "$OUTDIR/logs.tgz" -C "$OUTDIR" logs && rm -rf "$OUTDIR/logs"
exit $rc
