#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (no network; its python3 holds torch and triton):
# build the CUDA extension in place, prove the cuda and triton backends against the reference on the
# GPU, time every op per backend next to the copy bandwidth, and save the table. Under 8 minutes.
#   bash benchmarks/gpu_check.sh          (writes into $OUT, or benchmarks/gpu_out without it)
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/gpu_out}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/gpu.txt"
stamp "build (FASTPERC_CUDA=1, sm_90)"
if ! FASTPERC_CUDA=1 FASTPERC_CUDA_ARCHS="90" MAX_JOBS=${MAX_JOBS:-12} timeout 300 \
     $PY setup.py build_ext --inplace > "$DEST/build.log" 2>&1; then
  tail -60 "$DEST/build.log"; stamp "build failed"; exit 1
fi
$PY -m fastperc.info | tee "$DEST/info.txt"

stamp "parity and op checks on the GPU"
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/test_ops_parity.py tests/test_custom_ops.py \
  tests/test_loss.py 2>&1 | tee "$DEST/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

stamp "benchmarks"
timeout 200 $PY benchmarks/bench_ops.py --markdown --min-time 0.2 2>&1 | tee "$DEST/gpu_table.md"
stamp "done (tests exit code $tests_rc)"
exit "$tests_rc"
