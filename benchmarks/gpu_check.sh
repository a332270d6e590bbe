#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (no network; its python3 holds torch, triton, pytest,
# pytest-benchmark and hypothesis): build the CUDA extension in place for this GPU, prove the cuda and
# triton backends against float64 truth on the GPU, and time every op next to the copy bandwidth.
# The default run fits in 4 minutes, so a second run fits in the same 10-minute job.
#
#   bash benchmarks/gpu_check.sh            build, parity, op table
#   bash benchmarks/gpu_check.sh --step     ... and the training-step table (up to 3 more minutes): an
#                                           SD-sized UNet, bf16 autocast, every objective incl. compiled
#   bash benchmarks/gpu_check.sh --scale    ... and, first (it needs no CUDA build), the total-memory table
#                                           (up to 2.5 more minutes): MSE vs full, pruned and pruned +
#                                           checkpointed teacher on the SD-sized step
#   bash benchmarks/gpu_check.sh --dry-run  the same stages on this CPU with tiny shapes (make test runs it)
#
# Output folder: $GPU_CHECK_OUT, else $OUT (the device tool's), else benchmarks/gpu_out. Each stage
# writes <stage>.log there as it runs, so a timeout still leaves what ran; summary.md lists the stages.
# A failed CUDA build does not stop the rest: the triton checks and the table still run.
# FASTPERC_WHEELS=DIR: wheels to install first (no index), e.g. diffusers on a machine without network;
# without diffusers the step stage uses fastperc's own UNet at the SD block widths.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STEP=0
SCALE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --step) STEP=1 ;;
    --scale) SCALE=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option '$arg' (expected --dry-run, --step, --scale or --help)" >&2; exit 2 ;;
  esac
done

# Stage time limits (s). The default stages must fit the 240 s budget, --step its 180 s and --scale its
# 150 s: checked below. Stages are ranked so that what a job most needs runs first.
L_ENV=15 L_BUILD=80 L_INFO=15 L_PARITY=70 L_OPS=60 L_STEP=180 L_SCALE=150
BUDGET=$((L_ENV + L_BUILD + L_INFO + L_PARITY + L_OPS))
if [ $BUDGET -gt 240 ] || [ $L_STEP -gt 180 ] || [ $L_SCALE -gt 150 ]; then
  echo "gpu_check: stage limits add up to ${BUDGET}s (+${L_STEP}s step, +${L_SCALE}s scale), over the budget" >&2
  exit 3
fi

DEST=${GPU_CHECK_OUT:-${OUT:-benchmarks/gpu_out}}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SUMMARY="$DEST/summary.md"
T0=$(date +%s)
FAILED=0
if [ -n "${FASTPERC_WHEELS:-}" ]; then
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$FASTPERC_WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:$SITE || echo "gpu_check: could not install $FASTPERC_WHEELS/*.whl" >&2
fi
printf '# gpu_check %s\n\n| stage | exit code | seconds | log |\n|---|---|---|---|\n' \
  "$([ $DRY = 1 ] && echo '(dry run on CPU)')" > "$SUMMARY"

# stage NAME LIMIT_S CMD...: run CMD with its output in NAME.log, record the outcome, show the tail.
stage() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  echo "[gpu_check +$((start - T0))s] $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$DEST/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (timed out)') | $(( $(date +%s) - start )) | $name.log |" >> "$SUMMARY"
  tail -n 12 "$DEST/$name.log"
  [ $rc = 0 ] || FAILED=1
  return 0
}

if [ $DRY = 1 ]; then
  # The CPU stand-ins: same stages, same files, no GPU and no CUDA build.
  # The CPU stand-ins get generous limits: CI machines are slower and shared.
  stage env $((4 * L_ENV)) $PY -c "import torch, platform; print('dry run on', platform.machine(), 'torch', torch.__version__)"
  [ $SCALE = 1 ] && stage scale_table $((2 * L_SCALE)) $PY benchmarks/bench_scale.py --quick
  stage build $((4 * L_BUILD)) echo "dry run: would run FASTPERC_CUDA=1 FASTPERC_CUDA_ARCHS=<this GPU> $PY setup.py build_ext --inplace"
  stage info $((4 * L_INFO)) $PY -m fastperc.info
  stage parity $((4 * L_PARITY)) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py
  stage op_table $((4 * L_OPS)) $PY benchmarks/bench_ops.py --device cpu --markdown --quick --min-time 0.01
  [ $STEP = 1 ] && stage step_table $L_STEP $PY benchmarks/bench_step.py --device cpu --quick --model default,sd-like
else
  stage env $L_ENV bash -c "nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"
  [ $SCALE = 1 ] && stage scale_table $L_SCALE $PY benchmarks/bench_scale.py --model sd --batch 8
  # Only this GPU's architecture: a build for every listed one would not fit the time.
  ARCH=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
  stage build $L_BUILD env FASTPERC_CUDA=1 FASTPERC_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-8}" \
    $PY setup.py build_ext --inplace
  stage info $L_INFO $PY -m fastperc.info
  stage parity $L_PARITY $PY -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py \
    tests/test_sync_free.py::test_training_steps_run_under_cuda_sync_debug_mode_error
  stage op_table $L_OPS $PY benchmarks/bench_ops.py --markdown --min-time 0.05
  [ $STEP = 1 ] && stage step_table $L_STEP $PY benchmarks/bench_step.py --model sd --dtypes bf16 --batch 8 --steps 5
fi

echo "" >> "$SUMMARY"
echo "total: $(( $(date +%s) - T0 )) s; $([ $FAILED = 0 ] && echo 'every stage passed' || echo 'some stage failed')" >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
