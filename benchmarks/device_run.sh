#!/bin/bash
# Run gpu_bench.py on the lent GPU machine (see /work/.library/device/README.md).
# Usage (from the repo root, with .whl carried): bash benchmarks/device_run.sh STEM [gpu_bench.py args...]
# BENCH_TIMEOUT (s, default 540) stops the benchmark early enough for the logs to be packed.
# Results land in $OUT (or benchmarks/results/<date>_STEM): STEM.json/.md/.png, console.log, logs.tgz, env.txt.
set -o pipefail
source "$(dirname "$0")/device_common.sh"
STEM=${1:?usage: device_run.sh STEM [gpu_bench.py args...]}; shift
device_install || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUTDIR=$(device_outdir "benchmarks/results/$(date -u +%F)_$STEM") || exit 1
device_env "$OUTDIR/env.txt" "$@"
device_bench "$OUTDIR" "${BENCH_TIMEOUT:-540}" python3 benchmarks/gpu_bench.py --out "$OUTDIR" --stem "$STEM" "$@"
rc=$?
device_pack "$OUTDIR"
exit $rc
