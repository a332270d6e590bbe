#!/usr/bin/env bash
# The one prepared check for a GPU machine (no network needed; its python3 holds torch, triton, pytest,
# pytest-benchmark and hypothesis): build the CUDA extension in place for this GPU, prove the cuda and
# triton backends and the FP8 teacher against their references on the GPU, and time the ops and the
# training step.
#
#   bash benchmarks/gpu_check.sh                 build, parity, op table (about 4 minutes)
#   bash benchmarks/gpu_check.sh --step          ... and the training-step tables: the SD 1.5-sized UNet
#                                                eager, the SD3-medium transformer (bf16 and FP8 teacher),
#                                                the SD-sized UNet compiled
#   bash benchmarks/gpu_check.sh --scale         ... and the total-memory table (MSE vs full, pruned and
#                                                pruned + checkpointed teacher on the SD-sized step)
#   bash benchmarks/gpu_check.sh --stages a,b    exactly these stages (names below), in rank order
#   bash benchmarks/gpu_check.sh --budget S      skip a stage whose (GPU) time limit would end past S
#                                                seconds (default 560: a run of at most 10 minutes)
#   bash benchmarks/gpu_check.sh --dry-run       the same stages on this CPU with tiny shapes
#
# Stages run in rank order, whatever the options: what a GPU job most needs first. `--step` runs env ..
# step_sd3 (550 s of limits), which leaves the compiled stage (300 s) out of the default budget unless
# the stages end early; a second run on the same machine takes it (`--stages step_compiled`: the
# extension built by the first run is still there); on a fresh machine, name `build` again with the
# stages that need the CUDA extension.
#
# Output folder: $GPU_CHECK_OUT, else $OUT (a job runner's output folder), else benchmarks/gpu_out. Each
# stage writes <stage>.log there as it runs, so a timeout still leaves what ran; summary.md lists the stages.
# A failed CUDA build does not stop the rest: the triton checks and the tables still run.
# FASTPERC_WHEELS=DIR: wheels to install first (no index), e.g. diffusers on a machine without network;
# without diffusers the UNet stages use fastperc's own UNet at the SD block widths and step_sd3 fails.
set -uo pipefail
set -f  # no globbing: stage names are words, never patterns
cd "$(dirname "$0")/.."

# rank order | name | time limit (s) | what it is for
STAGES=(env build info parity step_sd step_sd3 step_compiled op_table scale_table)
declare -A LIMIT=([env]=15 [build]=80 [info]=15 [parity]=90 [step_sd]=150 [step_sd3]=200 [step_compiled]=300
                  [op_table]=60 [scale_table]=150)
DEFAULT="env build info parity op_table"
STEP="step_sd step_sd3 step_compiled"

DRY=0
BUDGET=560
SELECTED=" $DEFAULT "
GIVEN=""  # --stages: exactly these, whatever else is asked
expect_budget=0
expect_stages=0
for arg in "$@"; do
  if [ $expect_budget = 1 ]; then
    [[ "$arg" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget expects whole seconds, got '$arg'" >&2; exit 2; }
    BUDGET=$arg; expect_budget=0; continue
  fi
  if [ $expect_stages = 1 ]; then
    GIVEN=" ${arg//,/ } "
    for s in $GIVEN; do
      [ -n "${LIMIT[$s]:-}" ] || { echo "gpu_check: unknown stage '$s' (expected ${STAGES[*]})" >&2; exit 2; }
    done
    expect_stages=0; continue
  fi
  case "$arg" in
    --dry-run) DRY=1 ;;
    --step) SELECTED="$SELECTED $STEP " ;;
    --scale) SELECTED="$SELECTED scale_table " ;;
    --budget) expect_budget=1 ;;
    --stages) expect_stages=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option '$arg' (expected --dry-run, --step, --scale, --stages, --budget or --help)" >&2
       exit 2 ;;
  esac
done
if [ $expect_budget = 1 ] || [ $expect_stages = 1 ]; then
  echo "gpu_check: --budget and --stages need a value" >&2; exit 2
fi
[ -n "$GIVEN" ] && SELECTED=$GIVEN

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

# The command of each stage, on the GPU and (dry run) as its CPU stand-in with tiny shapes.
command_of() {
  local name=$1
  if [ $DRY = 1 ]; then
    case $name in
      env) echo "$PY -c \"import torch, platform; print('dry run on', platform.machine(), 'torch', torch.__version__)\"" ;;
      build) echo "echo dry run: would run FASTPERC_CUDA=1 FASTPERC_CUDA_ARCHS=\<this GPU\> $PY setup.py build_ext --inplace" ;;
      info) echo "$PY -m fastperc.info" ;;
      parity) echo "$PY -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py tests/test_fp8_teacher.py -m 'not slow'" ;;
      step_sd) echo "$PY benchmarks/bench_step.py --device cpu --quick --warmup 1 --model default,sd-like" ;;
      step_sd3) echo "$PY benchmarks/bench_step.py --device cpu --quick --warmup 1 --model sd3-tiny --dtypes bf16" ;;
      step_compiled) echo "$PY benchmarks/bench_step.py --device cpu --quick --model default --dtypes fp32 --warmup 1 --compile-backend aot_eager --objectives mse-compiled,fastperc-compiled" ;;
      op_table) echo "$PY benchmarks/bench_ops.py --device cpu --markdown --quick --min-time 0.01" ;;
      scale_table) echo "$PY benchmarks/bench_scale.py --quick" ;;
    esac
    return
  fi
  case $name in
    env) echo "nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'" ;;
    # Only this GPU's architecture: a build for every listed one would not fit the time.
    build) echo "FASTPERC_CUDA=1 FASTPERC_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90) MAX_JOBS=${MAX_JOBS:-8} $PY setup.py build_ext --inplace" ;;
    info) echo "$PY -m fastperc.info" ;;
    # The FP8 tests on the GPU (their cuda cases, the compiled loss included) after the fixed-case suite.
    parity) echo "$PY -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py tests/test_sync_free.py::test_training_steps_run_under_cuda_sync_debug_mode_error && $PY -m pytest -q -p no:cacheprovider tests/test_fp8_teacher.py -k cuda" ;;
    step_sd) echo "$PY benchmarks/bench_step.py --model sd --dtypes bf16 --steps 30" ;;
    step_sd3) echo "$PY benchmarks/bench_step.py --model sd3-512,sd3-1024 --dtypes bf16 --steps 30" ;;
    # The compile cache does not survive between GPU jobs: each row pays its compile in "first s".
    step_compiled) echo "$PY benchmarks/bench_step.py --model sd --dtypes bf16 --steps 30 --warmup 2 --objectives mse-compiled,fastperc-compiled" ;;
    op_table) echo "$PY benchmarks/bench_ops.py --markdown --min-time 0.05" ;;
    scale_table) echo "$PY benchmarks/bench_scale.py --model sd --batch 8" ;;
  esac
}

# stage NAME: run its command with a time limit, output in NAME.log; record the outcome, show the tail.
stage() {
  local name=$1 limit=${LIMIT[$1]} start rc
  start=$(date +%s)
  if [ $((start - T0 + limit)) -gt "$BUDGET" ]; then
    echo "[gpu_check +$((start - T0))s] $name skipped: its ${limit}s would end past the ${BUDGET}s budget"
    echo "| $name | skipped (budget) | 0 | - |" >> "$SUMMARY"
    return 0
  fi
  [ $DRY = 1 ] && limit=$((4 * limit))  # CPU stand-ins: CI machines are slower and shared
  echo "[gpu_check +$((start - T0))s] $name (limit ${limit}s)"
  timeout -k 10 "$limit" bash -c "$(command_of "$name")" > "$DEST/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (timed out)') | $(( $(date +%s) - start )) | $name.log |" >> "$SUMMARY"
  tail -n 12 "$DEST/$name.log"
  [ $rc = 0 ] || FAILED=1
  return 0
}

for name in "${STAGES[@]}"; do
  [[ "$SELECTED" == *" $name "* ]] && stage "$name"
done

echo "" >> "$SUMMARY"
echo "total: $(( $(date +%s) - T0 )) s; $([ $FAILED = 0 ] && echo 'every stage that ran passed' || echo 'some stage failed')" >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
