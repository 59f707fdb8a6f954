"""numpy's BLAS held to one thread around the engine's LAPACK eigen-solves (:func:`one_thread`).

The T x T Grams above the extension's ``EIGH_MAX_T`` rows (T = 49 and up: the runs this tool is
for have T = 50-100) are solved by numpy's LAPACK. With OpenBLAS, numpy's own, every such call
wakes the library's worker threads, which then spin for a while waiting for more work, on every
core, beside the Gram and combine kernels' threads. At T = 64 on a 2-core machine that spinning
was 17 % of the run's CPU samples, and the run took 15 % longer than with one BLAS thread
(benchmarks/results/e2e_cpu_epyc_T64.md). A solve of a few hundred rows at most gains nothing
from more threads, and its results do not depend on the count (checked: the same bits).

The limit is OpenBLAS's thread-local one (``openblas_set_num_threads_local``, OpenBLAS 0.3.27 on,
in numpy's wheels since numpy 2.0): only the thread that solves is held, and only during the
solve, so a host process that embeds the engine keeps its BLAS threads for its own work. Another
BLAS (MKL, Accelerate), or an OpenBLAS without that function, is left as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def thread_local_setter():
    """``openblas_set_num_threads_local`` of the OpenBLAS this process has loaded (numpy's): sets
    the calling thread's count and returns the previous one; None where there is none. (Looked up
    once, by a caller that has imported numpy, which loads its BLAS.)"""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({parts[-1] for parts in map(str.split, fh)
                            if len(parts) >= 6 and "openblas" in os.path.basename(parts[-1]).lower()})
    except OSError:  # (not Linux)
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        except OSError:
            continue
        fn = getattr(lib, "openblas_set_num_threads_local", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
            return fn
    return None


@contextlib.contextmanager
def one_thread():
    """numpy's BLAS on one thread for the calling thread while the block runs (module docstring)."""
    setter = thread_local_setter()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)
