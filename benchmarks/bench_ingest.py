"""The device reader's ingest, host side: filling staging buffers from the page cache.

The device pipeline's reader threads copy each group's T+1 row ranges into (pinned) staging
buffers in READ_PIECE pieces. Two ways, measured here on the same warm files, interleaved:

* ``maps``: ``np.copyto`` from a view of the read-only map, then ``MADV_DONTNEED`` (the old
  path: every page is faulted in and its mapping torn down again — TLB shootdowns across the
  reader threads);
* ``preadv``: :meth:`MappedFile.read_into`, one copy out of the page cache (the current path).

Staging buffers here are ordinary host memory (pinned memory needs a CUDA build of torch; the
copies out of the page cache are the same). Prints medians of ``--runs`` and the ratio.

    python benchmarks/bench_ingest.py [--gb 1.5] [--threads 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_info import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.5, help="input size (GB, fp16 in 4 files)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--piece-mb", type=int, default=16, help="bytes per read (the pipeline's READ_PIECE)")
    args = ap.parse_args()

    from safetensors.numpy import save_file

    from relex_kernels.io import SafetensorsFile
    from relex_kernels.ops import native

    # the 1.5 GB of inputs, the maps and the reader threads go whatever happens (gpu_check.sh runs
    # this under `timeout -s INT`: the interrupt unwinds through these blocks)
    with tempfile.TemporaryDirectory(prefix="relex-ingest-") as tmp, ExitStack() as stack:
        n = int(args.gb * 1e9 / 2 / 4)
        paths = []
        rng = np.random.default_rng(0)
        for i in range(4):
            p = os.path.join(tmp, f"v{i}.safetensors")
            save_file({"w": rng.standard_normal(n, dtype=np.float32).astype(np.float16)}, p)
            paths.append(p)
        files = [stack.enter_context(SafetensorsFile(p)) for p in paths]
        piece = (args.piece_mb << 20) // 2
        buf = np.empty(4 * n, dtype=np.uint16)
        pool = ThreadPoolExecutor(args.threads)
        stack.callback(pool.shutdown, cancel_futures=True)  # registered last: runs first, before the files close

        def by_maps(f, r, lo, hi):
            np.copyto(buf[r * n + lo:r * n + hi], f.view("w", lo, hi).view(np.uint16))
            f.release("w", lo, hi)

        def by_pread(f, r, lo, hi):
            f.read_into("w", lo, hi, buf[r * n + lo:r * n + hi])

        def run(how) -> float:
            t0 = time.perf_counter()
            futs = [pool.submit(how, f, r, lo, min(n, lo + piece)) for r, f in enumerate(files)
                    for lo in range(0, n, piece)]
            for fu in futs:
                fu.result()
            return time.perf_counter() - t0

        nbytes = 4 * n * 2
        run(by_pread)  # warm the page cache
        times = {"maps": [], "preadv": []}
        for _ in range(args.runs):
            for name, how in (("maps", by_maps), ("preadv", by_pread)):
                times[name].append(run(how))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{cpu_model()}, {os.cpu_count()} cpus, {native.info()['simd'] if native.available()[0] else '-'}; "
              f"{nbytes / 1e9:.2f} GB warm, {args.threads} reader threads, {args.piece_mb} MB pieces, "
              f"medians of {args.runs}")
        for k, v in med.items():
            print(f"  {k:7s} {v:.3f} s  {nbytes / v / 1e9:.2f} GB/s")
        print(f"  preadv / maps time: {med['preadv'] / med['maps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
