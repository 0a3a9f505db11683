#!/usr/bin/env bash
# Runs the GPU kernels once under NVIDIA compute-sanitizer (memcheck, then racecheck) on small sizes,
# and prints "clean" or "NOT CLEAN" per tool. Called from bench/gpu_check.sh on the GPU machine:
#   bash bench/gpu_sanitize.sh                 (about 30-90 s; logs under $OUT if set)
#   GPU_CHECK_DRY=1 bash bench/gpu_sanitize.sh (CPU machine: prints what it would run, exits 0)
# The workload is tests/test_gpu_streams.py::test_sanitizer_smoke: every block size and dtype of the
# fused kernel, loss-only, chunked, accumulate, staged layouts and a NaN slice, with CuPy's memory
# pool off so that memcheck sees the bounds of each buffer.
# Exit status: 0 all tools clean; 1 a tool found errors or the workload failed; 2 not run (no tool).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PY:-python3}
TOOLS=${SANITIZE_TOOLS:-memcheck racecheck}
LIMIT=${SANITIZE_TIMEOUT:-60}  # seconds per tool
WORKLOAD=(-m pytest -q -p no:cacheprovider -rs tests/test_gpu_streams.py -k test_sanitizer_smoke)

find_sanitizer() {
  if [ -n "${COMPUTE_SANITIZER:-}" ]; then echo "$COMPUTE_SANITIZER"; return; fi
  command -v compute-sanitizer 2>/dev/null && return
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
}

SAN=$(find_sanitizer)
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  for tool in $TOOLS; do
    echo "sanitize $tool: dry run, would run: ${SAN:-compute-sanitizer} --tool $tool --report-api-errors no --error-exitcode 86 $PY ${WORKLOAD[*]}"
  done
  exit 0
fi
if [ -z "$SAN" ]; then
  echo "sanitize: compute-sanitizer not found (not on PATH, not under /usr/local/cuda*/bin; set COMPUTE_SANITIZER=/path)"
  for tool in $TOOLS; do echo "sanitize $tool: NOT RUN (no compute-sanitizer)"; done | tee "$OUT/sanitize.txt"
  exit 2
fi

export GPU_ORTHOL1_TEST_GPU=1 PYTHONUNBUFFERED=1
status=0
: > "$OUT/sanitize.txt"
for tool in $TOOLS; do
  log="$OUT/sanitize_$tool.log"
  t0=$(date +%s)
  # --error-exitcode: a hazard or memory error makes the run fail even when pytest passes.
  # --report-api-errors no: numba-cuda's driver start-up probes symbols with cuGetProcAddress, and
  # each failed probe counts as an "error" (seen on an H200: 34, all CUDA_ERROR_INVALID_VALUE from
  # cuGetProcAddress_v2); API return codes are the libraries' business, memory errors are ours.
  timeout "$LIMIT" "$SAN" --tool "$tool" --report-api-errors no --error-exitcode 86 --print-limit 50 \
    "$PY" "${WORKLOAD[@]}" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -n 1)
  passed=$(grep -Eo "[0-9]+ passed" "$log" | tail -n 1)
  if [ $rc -eq 0 ] && [ "$passed" = "1 passed" ] && echo "$summary" | grep -Eq "(: 0 errors|\(0 errors, 0 warnings\))"; then
    verdict="clean"
  else
    verdict="NOT CLEAN"
    status=1
    [ $rc -eq 124 ] && verdict="NOT CLEAN (timed out after ${LIMIT}s)"
    [ $rc -eq 86 ] && verdict="NOT CLEAN (sanitizer reported errors)"
    [ -z "$passed" ] || [ "$passed" = "1 passed" ] || verdict="$verdict (workload: $passed)"
    [ -n "$passed" ] || verdict="$verdict (workload did not pass)"
  fi
  line="sanitize $tool: $verdict; exit $rc in ${secs}s; ${summary:-no summary line}; log $log"
  echo "$line" | tee -a "$OUT/sanitize.txt"
  [ "$verdict" = clean ] || tail -n 40 "$log"
done
exit $status
