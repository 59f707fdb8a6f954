#!/usr/bin/env bash
# The GPU check of the device backends, for a machine with an NVIDIA GPU and no network:
#   1. build the extensions (CPU _C and CUDA _C_cuda) in place — skipped for a module that is
#      already there when nvcc is missing (carry a prebuilt relex_kernels/_C_cuda*.so);
#   2. a smoke run: tests/test_gpu.py's extrapolation on each device backend against the reference
#      backend (the first sign of life, in seconds, before the long steps);
#   3. run the GPU tests (tests/test_gpu.py, tests/test_triton_kernels.py: GPU cases only; two
#      torchrun ranks on the GPU against one process, tests/test_distributed.py);
#   4. run benchmarks/bench_gpu.py: every figure with the card's name;
#   5. benchmarks/bench_ingest.py: the reader's preadv vs maps on the GPU host's cores.
# Everything it writes (the log, bench_gpu's json and md: three files) goes to $RELEX_CHECK_OUT,
# else $OUT (the folder a remote runner sends back), else benchmarks/results.
# The steps keep within $RELEX_CHECK_SECONDS (default 440 s): each has its own time limit, cut to
# what is left once the later steps' minimums are kept (a step left under 15 s is skipped and
# reported), sent as SIGINT (-s INT) so that a Python step unwinds (its temporary files go, the
# benchmark writes the figures it has), then KILL 10 s later. With the probes before them (seconds,
# each under its own limit) the script ends in under 8 minutes unless steps must be killed.
# Python: $PYTHON, else python3 (a GPU image's python with torch), else python.
# Usage: bash benchmarks/gpu_check.sh            (RELEX_CHECK_BENCH_ONLY=1: steps 4-5 only)
set -u
BUDGET="${RELEX_CHECK_SECONDS:-440}"
case "$BUDGET" in
  ''|*[!0-9]*) echo "RELEX_CHECK_SECONDS must be a number of seconds, got '$BUDGET'" >&2; exit 2;;
esac
RES="${RELEX_CHECK_OUT:-${OUT:-}}"
[ -n "$RES" ] && mkdir -p "$RES" && RES="$(cd "$RES" && pwd)"  # (relative to the caller's directory)
cd "$(dirname "$0")/.."
RES="${RES:-benchmarks/results}"
mkdir -p "$RES"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOG="$RES/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
status=0

# limit WANT RESERVE: seconds for a step that would like WANT, keeping RESERVE for the steps after it
limit() {
  local rest=$(( BUDGET - ($(date +%s) - t0) - $2 ))
  echo $(( $1 < rest ? $1 : rest ))
}
# step NAME WANT RESERVE CMD...: CMD under its limit (output to the log); a step with under 15 s left is skipped
step() {
  local name=$1 lim
  lim=$(limit "$2" "$3")
  shift 3
  if [ "$lim" -lt 15 ]; then
    say "SKIPPED $name: ${lim}s left of the ${BUDGET}s budget"
    status=1
    return 1
  fi
  say "$name (limit ${lim}s)"
  timeout -s INT -k 10 "$lim" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local why=""
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why=", time limit"
  [ "$rc" -eq 0 ] || { say "$name FAILED (exit $rc$why; see $LOG)"; status=1; }
  return $rc
}

say "host $(hostname); $(nproc) cpus; python $PY; results in $RES"
gpus=$(timeout 20 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1)
echo "$gpus" | tee -a "$LOG"
timeout 60 "$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import sys
import numpy, torch
print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
PY

# the seconds each step needs at least: a step's limit keeps those of the steps after it
MIN_SMOKE=40 MIN_TESTS=90 MIN_SPMD=40 MIN_BENCH=95 MIN_INGEST=35
if [ -z "${RELEX_CHECK_BENCH_ONLY:-}" ]; then
  # only the card's own architecture: a fraction of the default sm_80;sm_90 compile time
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    cc=$(echo "$gpus" | head -1 | cut -d, -f2 | tr -d ' ')
    case "$cc" in [0-9]*.[0-9]*) export TORCH_CUDA_ARCH_LIST="$cc";; esac
  fi
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; then
    step "building the extensions (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})" 200 \
      $((MIN_SMOKE + MIN_TESTS + MIN_SPMD + MIN_BENCH + MIN_INGEST)) \
      env RELEX_FORCE_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
  else
    built=$(ls relex_kernels/_C*.so 2>/dev/null | tr '\n' ' ')
    say "nvcc not found: using the modules already in relex_kernels/ ($built)"
  fi
  timeout 60 "$PY" -m relex_kernels backends 2>&1 | tee -a "$LOG"

  # the first sign of life, in seconds: one small run per device backend against the reference engine
  smoke="test_pipeline_outputs_match_reference_engine and resident and not double"
  step "smoke: one extrapolation on each device backend against the reference" 60 \
    $((MIN_TESTS + MIN_SPMD + MIN_BENCH + MIN_INGEST)) "$PY" -m pytest -q -x \
    -p no:cacheprovider tests/test_gpu.py -k "$smoke" -rs
  # RELEX_CUDA_SYNC=1: a kernel error is raised at the launch that caused it, naming the kernel (the
  # smoke's tests ran above)
  step "GPU tests" 150 $((MIN_SPMD + MIN_BENCH + MIN_INGEST)) env RELEX_CUDA_SYNC=1 "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py \
    -k "not interpreter_suite and not interpreted and not ($smoke)" -rs
  step "SPMD on the GPU: two torchrun ranks sharing it, against one process" 60 $((MIN_BENCH + MIN_INGEST)) \
    env RELEX_CUDA_SYNC=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py -k "gpu_ranks_match_one_process" -rs
fi

step "GPU benchmarks" 240 "$MIN_INGEST" "$PY" benchmarks/bench_gpu.py --out "$RES"
# (bench_gpu prints its table too: it is in the log)
step "device reader ingest, host side (preadv vs maps, 8 reader threads)" 60 0 \
  "$PY" benchmarks/bench_ingest.py --threads 8 --runs 3

say "done, status $status; results in $RES (gpu_*.json|md, gpu_check.log)"
exit $status
