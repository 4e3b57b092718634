# Sourced by device_run.sh, device_backtest.sh and device_smoke.sh: what every run on the lent GPU machine
# does the same way (see /work/.library/device/README.md). Run from the repo root, with .whl carried: the
# wheels built from this checkout and the packages the benchmarks import (toto-ts and what it needs).
#
#   device_install                  install .whl/*.whl into /tmp/site (no index, no dependencies)
#   device_outdir DEFAULT           $OUT on the device, else DEFAULT (made if missing)
#   device_env FILE [ARGS...]       date, GPU, versions, CPU count and ARGS, into FILE and the console
#   device_bench OUTDIR SECONDS CMD... CMD under `timeout`, its output teed to OUTDIR/console.log; exit status
#   device_pack OUTDIR              pack OUTDIR/logs into OUTDIR/logs.tgz (the tool brings back files, not trees)

device_install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

device_outdir() {
  local dir=${OUT:-$1}
  mkdir -p "$dir" && echo "$dir"
}

device_env() {
  local file=$1; shift
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    python3 -c "import sys, torch, triton, toto; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'toto', toto.__file__)"
    python3 -c "import click, libcst, matplotlib, totopatch; print('click', click.__version__, 'libcst', getattr(libcst, '__version__', '?'), 'matplotlib', matplotlib.__version__, 'totopatch', totopatch.__version__, totopatch.__file__)"
    echo "cpus $(nproc)"
    echo "args: $*"
  } 2>&1 | tee "$file"
}

device_bench() {
  local outdir=$1 seconds=$2; shift 2
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$outdir/console.log"
  return "${PIPESTATUS[0]}"
}

device_pack() {
  [ -d "$1/logs" ] || return 0
  tar czf "$1/logs.tgz" -C "$1" logs && rm -rf "$1/logs"
}
