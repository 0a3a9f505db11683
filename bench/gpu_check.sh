#!/usr/bin/env bash
# The one GPU check of gpu_orthol1, run on the lent GPU machine in a single call:
#   bash bench/gpu_check.sh            (there: python3 has cupy-cuda13x, numba-cuda, torch, pytest; no network)
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh   (here, on a CPU: same steps, GPU parts skipped/CPU-only)
# It installs the package without dependencies, runs the `gpu` tests, the GPU benchmarks and the
# sanitizers, and writes everything under $OUT (default: a temp dir). Keep it under ~7 minutes:
# give the device call timeout_s ~470. The full list no longer fits one session's 15 minutes: on an
# H100 (2026-11-27) the gpu tests took 170-190 s (over 220 s with the tests added at 03:45 UTC),
# the plans bench 45-80, the kernel variants 50-60, the sanitizers 47, ncu 16, and each machine
# start about 30 s more. Split it over calls, e.g.
#   GPU_CHECK_STEPS="info gpu_tests plans fused_kernel ncu_fused" GPU_TESTS="tests/test_fused.py
#     tests/test_ptx_launch.py" GPU_PLANS_ONLY=host,host_breakdown,shapes GPU_CHECK_DEADLINE=250
# then the rest of the tests (GPU_TESTS="tests/ --ignore=tests/test_fused.py ..."), the plans
# bench and the sanitizers (bench/results/gpu-h100-call-check.md has the three calls of one session).
# GPU_TESTS narrows the gpu tests, GPU_PLANS_ONLY the plans bench's sections.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DRY=${GPU_CHECK_DRY:-0}
# The device call has a hard limit and only 8 files come back from $OUT: every step gets at most
# what is left before DEADLINE (seconds from start), and everything is packed into one archive at
# the end, so the check always finishes and returns its logs.
DEADLINE=${GPU_CHECK_DEADLINE:-420}  # the check stays under 7 minutes: steps run in priority order, the last skipped
START=$(date +%s)
status=0
# GPU_CHECK_STEPS="gpu_tests plans ...": run only the named steps (a rerun in what is left of a
# session's device time); default all
STEPS=${GPU_CHECK_STEPS:-}
step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "$name not-selected 0" >> "$OUT/steps.txt"; return
  fi
  local t0=$(date +%s)
  local left=$(( DEADLINE - (t0 - START) ))
  if [ "$left" -lt 15 ]; then
    echo "=== $name: SKIPPED, deadline reached"; echo "$name skipped 0" >> "$OUT/steps.txt"; status=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  $PY - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for m in ("numpy", "cupy", "numba", "numba_cuda", "torch", "jax", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__, e)
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY" != 1 ]; then
  # numba-cuda 0.30.4 cannot compile with NumPy 2.5 (kernels/_compat.py says so); the GPU machine has
  # numpy 2.5.2 and no network, so carry a numpy<2.5 wheel for its Python 3.12 here first:
  #   pip download 'numpy<2.5' --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  #       --no-deps -d bench/wheels          (then run with carry=["bench/wheels"])
  if $PY -c "import numpy, sys; sys.exit(hasattr(numpy, 'row_stack'))"; then
    ls bench/wheels/numpy-*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps bench/wheels/numpy-*.whl \
      > "$OUT/numpy.log" 2>&1 || echo "!!! numpy>=2.5 and no bench/wheels/numpy-*.whl carried: the GPU kernels will refuse to compile"
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; status=1; }
  export GPU_ORTHOL1_TEST_GPU=1
  DEV=gpu
else
  DEV=cpu
fi

step info 60 $PY -m gpu_orthol1.cli info
step run 60 $PY -m gpu_orthol1.cli run --shape 4096,32,128
# -rfEs lists failures, errors and skips (on the card a skipped gpu test is a failure of this check)
# at the end of the log, whose tail the call prints
step gpu_tests 300 $PY -m pytest -q -m gpu -rfEs --tb=short -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  ${GPU_TESTS:-tests/ --ignore=tests/test_jax_gpu.py}
if [ "$DRY" != 1 ] && [ -f "$OUT/gpu_tests.log" ] && grep -q "skipped" "$OUT/gpu_tests.log"; then
  echo "!!! gpu tests were skipped on the GPU machine"; status=1
fi
# gpu_orthol1.jax on the card (issue 23): its gpu tests, then bench_jax --device gpu, in a step of
# their own because JAX may lack a CUDA backend there (the image had jax-cuda13-plugin 0.11.2 in
# 2026-11): then the step logs why and is recorded as skipped, not failed. XLA must not preallocate
# 75% of the card: CuPy allocates in the same process.
jax_gpu() {
  if ! $PY -c "import jax, cupy; assert jax.devices('gpu')" > "$OUT/jax_probe.log" 2>&1; then
    echo "jax_gpu: JAX (or CuPy) has no GPU here; skipped:"; tail -n 3 "$OUT/jax_probe.log"; return 0
  fi
  $PY -m pytest -q -m gpu -rfEs --tb=short -p no:cacheprovider tests/test_jax_gpu.py || return 1
  $PY bench/bench_jax.py --device gpu --repeat 30 --json "$OUT/bench_jax_gpu.json"
}
if [ "$DRY" != 1 ]; then
  step jax_gpu 120 env XLA_PYTHON_CLIENT_PREALLOCATE=false bash -c "OUT='$OUT' PY='$PY'; $(declare -f jax_gpu); jax_gpu"
fi
# issue 22: real TF32 against the "tf32" tolerance class (also in gpu_tests; a step of its own so that
# a short call can take it alone: GPU_CHECK_STEPS="precision_tests bench_torch_precision")
if [ "$DRY" != 1 ]; then
  step precision_tests 90 $PY -m pytest -q -m gpu -rfEs --tb=short -p no:cacheprovider tests/test_precision.py
fi
# issue 8/9 figures: host vs device time per call and per phase (cupyx.profiler.benchmark), plan and
# graph replay, fused vs two-GEMM vs limit, JAX and torch, the n sweep vs the roofline, and a
# torch.profiler kernel table
if [ "$DRY" != 1 ]; then
  step plans 150 $PY bench/bench_gpu_plans.py --quick --json "$OUT/gpu_plans.json" --profile-txt "$OUT/gpu_profile.txt" \
    ${GPU_PLANS_ONLY:+--only $GPU_PLANS_ONLY}
else
  step plans 30 $PY bench/bench_gpu_plans.py --dry
fi
# issue 22 item 3: full Gram GEMM vs its blocked triangle (GPU_ORTHOL1_GRAM=full|triangle) at
# n = 256 .. 2048, l = n and 4n, m = 1, 12, 36, highest and tf32: sets _triangle.TRIANGLE_MIN_N
if [ "$DRY" != 1 ]; then
  step triangle 150 $PY bench/bench_triangle.py --quick --json "$OUT/gpu_triangle.json"
else
  step triangle 30 $PY bench/bench_triangle.py --dry
fi
# the kernels under compute-sanitizer (memcheck, racecheck): after the tests and the per-call
# figures (what a rerun could not replace when device time runs out), before the variants
step sanitize 80 env OUT="$OUT" PY="$PY" GPU_CHECK_DRY="$DRY" SANITIZE_TIMEOUT=35 bash bench/gpu_sanitize.sh
# issue 9: the fused kernel's launch alone per config variant (the default; a gradient phase one S
# row at a time; every run length; at n = 64 twice and half the tile rows and the 16 x 16 grid)
if [ "$DRY" != 1 ]; then
  step fused_kernel 120 $PY bench/bench_gpu_plans.py --kernel-only --json "$OUT/gpu_fused_kernel.json"
fi
TDEV=cpu; [ "$DEV" = gpu ] && TDEV=cuda
step bench_torch 70 $PY bench/bench_torch.py --device $TDEV --quick --threads 1 --json "$OUT/bench_torch_$TDEV.json"
# issue 22: the loop and OrthoL1 under the same setting (float32 highest, TF32, bfloat16 and float16
# parameters), eager and replayed from a CUDA graph, each side's GEMM TFLOP/s against the card's peak
# (the 12-layer d_model 768 transformer on the card; a small one for the CPU dry run)
TSMALL=""; [ "$TDEV" = cpu ] && TSMALL="--layers 2 --d-model 64"
step bench_torch_precision 240 $PY bench/bench_torch.py --device $TDEV --quick --threads 1 --precision all $TSMALL \
  --json "$OUT/bench_torch_precision_$TDEV.json"
step bench 90 $PY -m gpu_orthol1.cli bench --quick --device $DEV --time-limit 60 --no-progress \
  --csv "$OUT/bench_$DEV.csv" --json "$OUT/bench_$DEV.json" --plot "$OUT/bench_$DEV.png"
# bfloat16 (issue 22): the quick bench's --time-limit stops before its float16/bfloat16/float64 cases
# (the H200 run of 2026-11 reached none of them), so bfloat16's reference shapes get a run of their own:
# gpu_orthol1 (the int16 carrier, as gpu_orthol1.torch hands over CUDA bfloat16 tensors), torch,
# JAX and limit-cublas-bf16 (CUDA_R_16BF operands, float32 compute). Needs ml_dtypes (JAX installs
# it); without it the bench refuses --dtypes bfloat16 and the step fails, saying so.
BF16_SHAPES=4096x32x128,64x4096x64,512x64x512
[ "$DEV" = cpu ] && BF16_SHAPES=256x16x32,32x64x16  # the dry run: the same step, CPU-sized
step bench_bf16 60 $PY -m gpu_orthol1.cli bench --quick --device $DEV --dtypes bfloat16 --shapes $BF16_SHAPES \
  --sweep-m none --sweep-n none --no-crossover --time-limit 40 --no-progress \
  --csv "$OUT/bench_bf16_$DEV.csv" --json "$OUT/bench_bf16_$DEV.json"
# the fused kernel's own counters, one launch per config (the default at (64, 4096, 64) float32,
# that config at 112 registers, the 16 x 16 grid): speed of light, occupancy, launch stats, warp
# stalls, issue, and the shared-memory table (wavefronts, bank conflicts). Clocks left alone
# (--clock-control none).
if [ "$DRY" != 1 ] && command -v ncu >/dev/null; then
  step ncu_fused 90 ncu --clock-control none -k regex:fused_ortho --launch-count 3 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section MemoryWorkloadAnalysis_Tables --print-details all \
    $PY bench/bench_gpu_plans.py --ncu-variants
fi
step bench_core 50 $PY bench/bench_core.py --device $DEV --repeat 7 --json "$OUT/bench_core_$DEV.json"
echo "=== steps (name exit seconds):"; cat "$OUT/steps.txt"
# pack into a file outside $OUT first: tar of a folder that holds its own archive fails
( cd "$OUT" && tar czf /tmp/gpu_check_logs.tgz . && mv /tmp/gpu_check_logs.tgz . && \
  find . -mindepth 1 -maxdepth 1 ! -name gpu_check_logs.tgz ! -name steps.txt ! -name env.txt -exec rm -rf {} + )
ls -la "$OUT"
exit $status
