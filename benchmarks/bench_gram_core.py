"""Per-core rate of the native Gram kernel against the same core's fp32 GEMM and read rate.

Run: ``python benchmarks/bench_gram_core.py [--simd avx2] [--T 8,16,32,64]``.

One thread, and every time is the process's CPU time (``time.process_time``), so a
machine shared with other jobs still gives what a core achieves while it runs; the
GEMM (``torch.mm`` 2048^3, one thread) and the read probe (``_C.read_probe`` over the
very buffers the kernel reads) are timed interleaved with the kernel, and the medians
are compared. To compare the AVX2 path with an AVX2 GEMM on an AVX-512 machine, run
with ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (torch's GEMM is MKL's). Gram FLOPs count what
the kernel computes, T(T+1) per element. Prints one line per (T, elements).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from relex_kernels.ops import native  # noqa: E402


def cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simd", default="auto", help="SIMD path: auto, avx512, avx2, scalar")
    ap.add_argument("--T", default="8,16,32,64", help="history lengths (comma separated)")
    ap.add_argument("--elements", default="262144,8000000",
                    help="elements per buffer (comma separated): the first fits the L3 of most servers, "
                         "the second streams from memory")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median reported)")
    args = ap.parse_args()
    import torch

    native.set_simd(args.simd)
    native.set_num_threads(1)
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rng = np.random.default_rng(0)
    print(f"simd {native.info()['simd']}, 1 thread, CPU seconds, bf16 inputs")
    for T in (int(x) for x in args.T.split(",")):
        for n in (int(x) for x in args.elements.split(",")):
            reps = max(1, 10_000_000 // n)
            base = rng.integers(0x3C00, 0x3C40, n, dtype=np.uint16)
            hist = [(base + rng.integers(0, 3, n, dtype=np.uint16)).astype(np.uint16) for _ in range(T)]
            acc = np.zeros((T, T))
            tg, tm, tr = [], [], []
            for _ in range(args.repeats):
                tg.append(cpu_seconds(lambda: [native.gram(base, hist, "BF16", acc) for _ in range(reps)]))
                tm.append(cpu_seconds(lambda: torch.mm(a, b)))
                tr.append(cpu_seconds(lambda: [native.read_bandwidth_probe([base] + hist) for _ in range(reps)]))
            g, m, r = (statistics.median(x) for x in (tg, tm, tr))
            flops = T * (T + 1) * n * reps
            nbytes = (T + 1) * 2 * n * reps
            print(f"T={T:3d} n={n:>9d}: gram {flops / g / 1e9:6.1f} GFLOP/s {nbytes / g / 1e9:5.1f} GB/s | "
                  f"GEMM {2 * 2048**3 / m / 1e9:6.1f} GFLOP/s -> {100 * flops / g / (2 * 2048**3 / m):3.0f}% | "
                  f"read {nbytes / r / 1e9:5.1f} GB/s -> {100 * r / g:3.0f}%", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
