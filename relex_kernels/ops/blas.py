"""numpy's BLAS held to one thread around the engine's LAPACK eigen-solves (:func:`one_thread`).

The T x T Grams above the extension's ``EIGH_MAX_T`` rows (T = 49 and up: the runs this tool is
for have T = 50-100) are solved by numpy's LAPACK. With OpenBLAS, numpy's own, every such call
wakes the library's worker threads, which then spin for a while waiting for more work, on every
core, beside the Gram and combine kernels' threads. At T = 64 on a 2-core machine that spinning
was 17 % of the run's CPU samples, and the run took 17 % longer than with one BLAS thread
(benchmarks/results/e2e_cpu_epyc_T64.md). A solve of a few hundred rows at most gains nothing
from more threads, and its results do not depend on the count (checked: the same bits).

OpenBLAS's thread count is the process's (its ``openblas_set_num_threads_local`` is process-wide
too in the pthreads builds numpy ships), so the limit holds for every thread while any solve
runs: the first solve to start saves each loaded OpenBLAS's count and sets 1, the last to end
puts the saved counts back (a lock and a depth, so that solves on several threads never leave
the count at 1). A host process that embeds the engine gets its BLAS threads back between the
engine's solves, each a few milliseconds. Every OpenBLAS loaded is held (numpy's, and one that
scipy or another library brought), as which one numpy calls is not known here. Another BLAS
(MKL, Accelerate) is left as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from functools import lru_cache

#: (set, get) names of OpenBLAS's process-wide thread count, as the builds export them
_NAMES = (("openblas_set_num_threads", "openblas_get_num_threads"),
          ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
          ("openblas_set_num_threads64_", "openblas_get_num_threads64_"))

_lock = threading.Lock()
_depth = 0
_saved: list[tuple] = []


def mapped_libraries(maps: str) -> list[str]:
    """The paths of the OpenBLAS libraries in a ``/proc/<pid>/maps`` text (a path may hold spaces;
    a file deleted since it was loaded is skipped: it cannot be opened again)."""
    paths = set()
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
            continue
        if "openblas" in os.path.basename(parts[5]).lower():
            paths.add(parts[5])
    return sorted(paths)


@lru_cache(maxsize=1)
def thread_counts() -> tuple:
    """((set, get), ...) of every OpenBLAS this process has loaded; empty where there is none. (Looked
    up once, by a caller that has imported numpy, which loads its BLAS.)"""
    try:
        with open("/proc/self/maps") as fh:
            paths = mapped_libraries(fh.read())
    except OSError:  # (not Linux)
        return ()
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.restype, setter.argtypes = None, [ctypes.c_int]
                getter.restype, getter.argtypes = ctypes.c_int, []
                found.append((setter, getter))
                break
    return tuple(found)


@contextlib.contextmanager
def one_thread():
    """Every loaded OpenBLAS on one thread while the block runs, on any thread (module docstring)."""
    global _depth, _saved
    counts = thread_counts()
    if not counts:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = [(setter, getter()) for setter, getter in counts]
            for setter, _ in counts:
                setter(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for setter, n in _saved:
                    setter(n)
