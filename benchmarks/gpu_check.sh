#!/usr/bin/env bash
# The GPU check of the device backends, for a machine with an NVIDIA GPU and no network:
#   1. build the extensions (CPU _C and CUDA _C_cuda) in place — skipped for a module that is
#      already there when nvcc is missing (carry a prebuilt relex_kernels/_C_cuda*.so);
#   2. run the GPU tests (tests/test_gpu.py, tests/test_triton_kernels.py: GPU cases only; two
#      torchrun ranks on the GPU against one process, tests/test_distributed.py);
#   3. run benchmarks/bench_gpu.py: every figure with the card's name in benchmarks/results/;
#   4. benchmarks/bench_ingest.py: the reader's preadv vs maps on the GPU host's cores.
# Each step has its own time limit, sent as SIGINT (-s INT) so that a Python step unwinds: its
# temporary files go, and the benchmark writes the figures it has; the whole script stays well
# inside 10 minutes.
# Usage: bash benchmarks/gpu_check.sh            (RELEX_CHECK_BENCH_ONLY=1: step 3 only)
set -u
cd "$(dirname "$0")/.."
RES=benchmarks/results
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: > "$LOG"
t0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
status=0

say "host $(hostname); $(nproc) cpus"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
PY

if [ -z "${RELEX_CHECK_BENCH_ONLY:-}" ]; then
  # only the card's own architecture: a fraction of the default sm_80;sm_90 compile time
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [ -n "$cc" ] && export TORCH_CUDA_ARCH_LIST="$cc"
  fi
  if python csrc/cuda/build_cuda.py --help >/dev/null 2>&1 && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; }; then
    say "building the extensions (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
    RELEX_FORCE_CUDA=1 timeout 150 python setup.py -q build_ext --inplace >>"$LOG" 2>&1 \
      || { say "BUILD FAILED (see $LOG)"; status=1; }
  else
    say "nvcc not found: using the modules already in relex_kernels/ ($(ls relex_kernels/_C*.so 2>/dev/null | tr '\n' ' '))"
  fi
  python -m relex_kernels backends 2>&1 | tee -a "$LOG"

  say "GPU tests"
  # RELEX_CUDA_SYNC=1: a kernel error is raised at the launch that caused it, naming the kernel
  RELEX_CUDA_SYNC=1 timeout -s INT -k 10 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py \
      -k "not interpreter_suite and not interpreted" -rs 2>&1 | tail -40 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { say "GPU TESTS FAILED"; status=1; }
  say "SPMD on the GPU: two torchrun ranks sharing it, against one process"
  RELEX_CUDA_SYNC=1 timeout -s INT -k 10 100 python -m pytest -q -p no:cacheprovider tests/test_distributed.py \
      -k "gpu_ranks_match_one_process" -rs 2>&1 | tail -15 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { say "SPMD GPU TEST FAILED"; status=1; }
fi

say "GPU benchmarks"
timeout -s INT -k 10 240 python benchmarks/bench_gpu.py --out "$RES" 2>&1 | tee -a "$LOG" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || { say "BENCHMARK FAILED OR INCOMPLETE (see the json)"; status=1; }
say "device reader ingest, host side (preadv vs maps, 8 reader threads)"
timeout -s INT -k 10 60 python benchmarks/bench_ingest.py --threads 8 --runs 3 2>&1 | tee -a "$LOG" | tail -5

say "done, status $status; results in $RES/gpu_*.json|md, log $LOG"
exit $status
