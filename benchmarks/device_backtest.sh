#!/bin/bash
# Run backtest_bench.py on the lent GPU machine (see /work/.library/device/README.md).
# Usage (from the repo root, with .whl carried): bash benchmarks/device_backtest.sh STEM [backtest_bench.py args...]
# BENCH_TIMEOUT (s, default 550) bounds the whole benchmark; the script gets a budget 30 s shorter, so it
# stops starting rows (and caps the running row) in time to write its files, and the logs get packed.
# Results land in $OUT (or benchmarks/results): STEM.json/.md/.png, console.log, logs.tgz, env.txt
# (6 files, one folder deep).
set -o pipefail
STEM=${1:?usage: device_backtest.sh STEM [backtest_bench.py args...]}; shift
REPO=$(pwd)
T=${BENCH_TIMEOUT:-550}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import sys, torch, triton, toto; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'toto', toto.__file__)"
  python3 -c "import click, libcst, matplotlib; print('click', click.__version__, 'libcst', libcst.__version__ if hasattr(libcst, '__version__') else '?', 'matplotlib', matplotlib.__version__)"
  echo "cpus $(nproc)"
  echo "args: $*"
} 2>&1 | tee "$OUTDIR/env.txt"
timeout -k 10 "$T" python3 benchmarks/backtest_bench.py --out "$OUTDIR" --stem "$STEM" --budget $((T - 30)) "$@" 2>&1 \
  | tee "$OUTDIR/console.log"
rc=$?
[ -d "$OUTDIR/logs" ] && tar czf "$OUTDIR/logs.tgz" -C "$OUTDIR" logs && rm -rf "$OUTDIR/logs"
exit $rc
