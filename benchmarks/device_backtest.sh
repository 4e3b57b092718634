#!/bin/bash
# Run backtest_bench.py on the lent GPU machine (see /work/.library/device/README.md).
# Usage (from the repo root, with .whl carried): bash benchmarks/device_backtest.sh STEM [backtest_bench.py args...]
# BENCH_TIMEOUT (s, default 550) bounds the whole benchmark; the script gets a budget 30 s shorter, so it
# stops starting rows (and caps the running row) in time to write its files, and the logs get packed.
# Results land in $OUT (or benchmarks/results/<date>_STEM): STEM.json/.md/.png, console.log, logs.tgz, env.txt.
set -o pipefail
source "$(dirname "$0")/device_common.sh"
STEM=${1:?usage: device_backtest.sh STEM [backtest_bench.py args...]}; shift
T=${BENCH_TIMEOUT:-550}
device_install || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUTDIR=$(device_outdir "benchmarks/results/$(date -u +%F)_$STEM") || exit 1
device_env "$OUTDIR/env.txt" "$@"
device_bench "$OUTDIR" "$T" python3 benchmarks/backtest_bench.py --out "$OUTDIR" --stem "$STEM" --budget $((T - 30)) "$@"
rc=$?
device_pack "$OUTDIR"
exit $rc
