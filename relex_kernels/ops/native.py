"""The ``cpu`` backend: the native kernels of :mod:`relex_kernels._C` (C++, OpenMP, SIMD).

Same functions and contract as :mod:`.reference` (bit-identical ``combine``; ``gram``
with the same chunking and fp64 chunk order, so bit-reproducible for any thread
count). The SIMD path (AVX-512, AVX2+FMA+F16C or portable scalar) is chosen at run
time from the CPU; ``RELEX_SIMD=scalar|avx2|avx512`` or :func:`set_simd` lowers it.

Threads: :func:`set_num_threads`, else ``$RELEX_NUM_THREADS``, else OpenMP's default
(``OMP_NUM_THREADS`` or the CPUs this process may use). Results do not depend on it.
Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=passive``, unless the
environment sets another policy): between two kernel calls the engine does Python and
kernel work on one thread, and spinning threads took a core from it and from the host
program embedding the kernels (220m, T = 16, 2-core EPYC: 3.25 -> 2.65 CPU seconds).

Arguments are validated here (ValueError with what was expected); the compiled
module trusts the addresses and lengths it is given.

Importing this module never fails when the extension is missing: :func:`available`
then says why, and every kernel raises :class:`~relex_kernels.errors.BackendError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

import numpy as np

from ..errors import BackendError, UsageError
from ..io import dtypes

_BUILD_HINT = "build it with `pip install -e .`"


def _import_extension():
    """Import ``_C`` with ``OMP_WAIT_POLICY`` defaulting to passive while libgomp initialises (it
    reads the variable once, when loaded); the process environment is left as it was."""
    had = os.environ.get("OMP_WAIT_POLICY")
    if had is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from .. import _C as lib
    finally:
        if had is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return lib


try:
    _C = _import_extension()
except ImportError as e:  # not built, or built for another Python / platform
    _C = None
    _IMPORT_ERROR = f"relex_kernels._C cannot be imported ({e})"
else:
    _IMPORT_ERROR = ""

_num_threads: int | None = None
#: a thread count for the calls of one Python thread only (:func:`calls_on_threads`)
_this_thread = threading.local()


def available() -> tuple[bool, str]:
    """(True, "<SIMD path, threads>") if the native kernels can run, else (False, why)."""
    if _C is None:
        return False, f"{_IMPORT_ERROR} — {_BUILD_HINT}"
    try:
        threads = f"{get_num_threads()} threads"
    except UsageError as e:  # reported when a kernel runs; probing must not fail
        threads = str(e)
    return True, f"native C++ kernels, {_C.simd_level()} path, {threads}"


def _lib():
    if _C is None:
        raise BackendError(f"the cpu backend is not available: {_IMPORT_ERROR} — {_BUILD_HINT}")
    return _C


def supports(dtype: str) -> bool:
    """Every fitted storage dtype (F32, F16, BF16, F64) has a native kernel."""
    return dtype in dtypes.DTYPE_CODES


def set_num_threads(n: int | None) -> None:
    """Threads used by every later call (``None``: back to the environment / OpenMP default)."""
    global _num_threads
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"num_threads must be a positive integer, got {n!r}")
    _num_threads = None if n is None else int(n)


@contextlib.contextmanager
def calls_on_threads(n: int):
    """Within the block, this Python thread's kernel calls use ``n`` threads unless
    :func:`set_num_threads` or ``$RELEX_NUM_THREADS`` chose a number (another Python thread's
    calls meanwhile are not affected: the torch API runs each call on its caller's torch threads)."""
    prev = getattr(_this_thread, "n", None)
    _this_thread.n = max(1, int(n))
    try:
        yield
    finally:
        _this_thread.n = prev


def get_num_threads() -> int:
    """The threads the next call uses; a bad ``$RELEX_NUM_THREADS`` is a UsageError."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("RELEX_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"RELEX_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    mine = getattr(_this_thread, "n", None)
    if mine is not None:
        return mine
    return _C.max_threads() if _C is not None else 1


def set_simd(level: str) -> str:
    """Use SIMD path ``level`` ('auto', 'scalar', 'avx2', 'avx512'); returns the previous one.

    A level the CPU cannot run is a ValueError. Meant for tests and benchmarks.
    """
    lib = _lib()
    prev = lib.simd_level()
    if not lib.set_simd_level(level):
        raise ValueError(f"SIMD level {level!r} is not usable here (best: {lib.best_simd_level()})")
    return prev


def identity() -> str:
    """``cpu/<SIMD path>``: each path orders the fp32 sums of a Gram chunk its own way."""
    return f"cpu/{_lib().simd_level()}"


def info() -> dict:
    """What the native backend runs with: SIMD path, CPU features, threads, build."""
    if _C is None:
        return {"available": False, "reason": available()[1]}
    return {
        "available": True,
        "simd": _C.simd_level(),
        "best_simd": _C.best_simd_level(),
        "cpu_features": _C.cpu_features(),
        "num_threads": get_num_threads(),
        "gram_chunk": _C.GRAM_CHUNK,
        **_C.build_info(),
    }


# ---------------------------------------------------------------- validation


def _code(dtype: str) -> int:
    try:
        return dtypes.DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no native kernel (supported: {', '.join(dtypes.DTYPE_CODES)})") from None


def _raw_input(x, dtype: str, n: int | None, what: str) -> np.ndarray:
    """A 1-D view of ``x`` with unit stride (copied only if strided); checks dtype and length."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(x).__name__}")
    want = dtypes.raw_numpy(dtype)
    if x.dtype != want:
        raise ValueError(f"{what} has numpy dtype {x.dtype}, expected {want} for {dtype}")
    if x.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{what} has {x.shape[0]} elements, base has {n}")
    if x.shape[0] > 1 and x.strides[0] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def _inputs(base, hist, dtype: str) -> tuple[int, np.ndarray, list[np.ndarray]]:
    code = _code(dtype)
    base = _raw_input(base, dtype, None, "base")
    if isinstance(hist, np.ndarray) and hist.ndim == 2:
        hist = list(hist)
    hist = [_raw_input(h, dtype, base.shape[0], f"hist[{i}]") for i, h in enumerate(hist)]
    return code, base, hist


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


# ---------------------------------------------------------------- kernels


def _check_acc(acc, T: int) -> None:
    if not isinstance(acc, np.ndarray) or acc.dtype != np.float64 or acc.shape != (T, T):
        got = f"{acc.dtype} {acc.shape}" if isinstance(acc, np.ndarray) else type(acc).__name__
        raise ValueError(f"acc must be a float64 array of shape ({T}, {T}), got {got}")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError("acc must be C-contiguous and writable")


def _alphas(alphas, K: int, T: int) -> np.ndarray:
    alphas = np.ascontiguousarray(alphas, dtype=np.float32)
    if alphas.shape != (K, T):
        raise ValueError(f"alphas must have shape ({K}, {T}) (outputs x history), got {alphas.shape}")
    return alphas


def gram(base: np.ndarray, hist: Sequence[np.ndarray], dtype: str, acc: np.ndarray,
         fp16_deltas: bool = False) -> None:
    """``acc += Gram`` of the deltas of one range (contract: :func:`.reference.gram`).

    base, hist[i]: 1-D raw views (``dtypes.raw_numpy(dtype)``), all of length n; any
    alignment; read-only is fine. acc: (T, T) float64, C-contiguous, writable.
    """
    lib = _lib()
    code, base, hist = _inputs(base, hist, dtype)
    T = len(hist)
    _check_acc(acc, T)
    n = base.shape[0]
    if n == 0 or T == 0:
        return
    lib.gram(_addr(base), [_addr(h) for h in hist], n, code, _addr(acc), bool(fp16_deltas), get_num_threads())


def combine(base: np.ndarray, hist: Sequence[np.ndarray], alphas: np.ndarray, dtype: str,
            outs: Sequence[np.ndarray], fp16_deltas: bool = False) -> None:
    """Write ``len(outs)`` weighted sums (contract: :func:`.reference.combine`, bit for bit).

    base, hist[i]: 1-D raw views of length n. alphas: (K, T) float32 (converted).
    outs[k]: 1-D writable raw views of length n (e.g. writable memory maps, any
    alignment); a strided one is written through a temporary.
    """
    lib = _lib()
    code, base, hist = _inputs(base, hist, dtype)
    T, n = len(hist), base.shape[0]
    outs = list(outs)
    alphas = _alphas(alphas, len(outs), T)
    targets, direct = [], []
    for k, o in enumerate(outs):
        if not isinstance(o, np.ndarray) or o.dtype != dtypes.raw_numpy(dtype) or o.shape != (n,):
            got = f"{o.dtype} {o.shape}" if isinstance(o, np.ndarray) else type(o).__name__
            raise ValueError(f"outs[{k}] must be a {dtypes.raw_numpy(dtype)} array of shape ({n},), got {got}")
        if not o.flags.writeable:
            raise ValueError(f"outs[{k}] is read-only")
        d = o if (n <= 1 or o.strides[0] == o.itemsize) else np.empty(n, dtype=o.dtype)
        targets.append(o)
        direct.append(d)
    if n == 0 or not outs:
        return
    lib.combine(_addr(base), [_addr(h) for h in hist], n, code, _addr(alphas),
                [_addr(d) for d in direct], bool(fp16_deltas), get_num_threads())
    for o, d in zip(targets, direct):
        if d is not o:
            o[...] = d


def _pieces_table(starts: np.ndarray, rows: np.ndarray, n: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.ascontiguousarray(starts, dtype=np.uint64)
    rows = np.ascontiguousarray(rows, dtype=np.uint64)
    if starts.ndim != 1 or rows.shape != (starts.shape[0] - 1, T + 1):
        raise ValueError(f"pieces: starts (count + 1,) and rows (count, {T + 1}), got {starts.shape} and {rows.shape}")
    if starts[0] != 0 or starts[-1] != n or (starts.shape[0] > 1 and not (np.diff(starts.astype(np.int64)) > 0).all()):
        raise ValueError(f"piece starts must rise from 0 to n = {n}")
    return starts, rows


def gram_pieces(starts: np.ndarray, rows: np.ndarray, n: int, dtype: str, acc: np.ndarray,
                fp16_deltas: bool = False) -> None:
    """:func:`gram` of a range of ``n`` elements held in pieces, with the bits of one contiguous
    call: piece ``p`` is elements ``[starts[p], starts[p + 1])`` (every start a multiple of
    ``GRAM_CHUNK``: a chunk across two files is gathered by the caller), its base at
    ``rows[p, 0]`` and history ``i`` at ``rows[p, 1 + i]`` (addresses of raw elements, kept alive
    by the caller). acc: (T, T) float64, C-contiguous, writable."""
    T = int(np.shape(rows)[1]) - 1 if np.ndim(rows) == 2 else -1
    _check_acc(acc, T)
    starts, rows = _pieces_table(starts, rows, n, T)
    _lib().gram_pieces(starts.ctypes.data, rows.ctypes.data, rows.shape[0], T, n, _code(dtype), _addr(acc),
                       bool(fp16_deltas), get_num_threads())


def combine_pieces(starts: np.ndarray, rows: np.ndarray, n: int, alphas: np.ndarray, dtype: str,
                   outs: Sequence[np.ndarray], fp16_deltas: bool = False) -> None:
    """:func:`combine` of a range held in pieces (as :func:`gram_pieces`; pieces may start
    anywhere: each element is computed alone) into ``outs``: 1-D unit-stride writable raw arrays of ``n``."""
    T = int(np.shape(rows)[1]) - 1 if np.ndim(rows) == 2 else -1
    starts, rows = _pieces_table(starts, rows, n, T)
    alphas = _alphas(alphas, len(outs), T)
    for k, o in enumerate(outs):
        if not (isinstance(o, np.ndarray) and o.dtype == dtypes.raw_numpy(dtype) and o.shape == (n,)
                and o.flags.writeable and (n <= 1 or o.strides[0] == o.itemsize)):
            raise ValueError(f"outs[{k}] must be a writable unit-stride {dtypes.raw_numpy(dtype)} array of ({n},)")
    _lib().combine_pieces(starts.ctypes.data, rows.ctypes.data, rows.shape[0], T, n, _code(dtype), _addr(alphas),
                          [_addr(o) for o in outs], bool(fp16_deltas), get_num_threads())


# Unchecked entry points for the engine's grouped passes (engine/streaming.py): a run over
# thousands of small tensors would spend more time validating numpy views, taking their
# addresses and entering the kernels' thread team than in the kernels. The engine takes the
# addresses from maps it validated (reader/writer) and keeps alive for the call; each
# tensor's sums are those of its own gram / combine call.


def gram_table(table: np.ndarray, fp16_deltas: bool) -> None:
    """:func:`gram` of many tensors: ``table`` (k, T + 4) uint64, a row per tensor: n, dtype code
    (``dtypes.DTYPE_CODES``), address of its (T, T) float64 acc, base address, T history addresses."""
    table = np.ascontiguousarray(table, dtype=np.uint64)
    if table.ndim != 2 or table.shape[1] < 4:
        raise ValueError(f"gram table must have shape (k, T + 4), got {table.shape}")
    _lib().gram_table(table.ctypes.data, table.shape[0], table.shape[1] - 4, bool(fp16_deltas), get_num_threads())


def combine_table(table: np.ndarray, T: int, K: int, fp16_deltas: bool) -> None:
    """:func:`combine` of many tensors: ``table`` (k, T + K + 4) uint64, a row per tensor: n,
    dtype code, address of its (K, T) float32 alphas, base address, T history addresses, K
    output addresses (unit stride, writable)."""
    table = np.ascontiguousarray(table, dtype=np.uint64)
    if table.ndim != 2 or table.shape[1] != T + K + 4:
        raise ValueError(f"combine table must have shape (k, {T + K + 4}), got {table.shape}")
    _lib().combine_table(table.ctypes.data, table.shape[0], T, K, bool(fp16_deltas), get_num_threads())


# Host helpers of the engine beside the kernels (the same extension and threads): the T x T
# eigen-solves of a group of tensors and the report's numbers as text.


def eigh_max_t() -> int:
    """The largest T :func:`eigh_small` solves; 0 without the extension."""
    return int(_C.EIGH_MAX_T) if _C is not None else 0


def eigh_small(Gs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.linalg.eigh`` of a (k, T, T) stack of symmetric float64 matrices (the lower triangle
    is read), T <= :func:`eigh_max_t`: ``(w, V, ok)``, w (k, T) ascending, V (k, T, T) with the
    eigenvectors as columns, ok (k,) False where a matrix is not finite or did not converge
    (its w and V are then undefined). A matrix's bits depend neither on the stack nor on the
    thread count (csrc/cpu/eigh.cpp)."""
    lib = _lib()
    Gs = np.ascontiguousarray(Gs, dtype=np.float64)
    if Gs.ndim != 3 or Gs.shape[1] != Gs.shape[2] or not 1 <= Gs.shape[1] <= lib.EIGH_MAX_T:
        raise ValueError(f"eigh_small needs a (k, T, T) stack with 1 <= T <= {lib.EIGH_MAX_T}, got {Gs.shape}")
    k, T = Gs.shape[0], Gs.shape[1]
    w, V, ok = np.empty((k, T)), np.empty((k, T, T)), np.empty(k, dtype=np.uint8)
    lib.eigh_small(Gs.ctypes.data, k, T, w.ctypes.data, V.ctypes.data, ok.ctypes.data, get_num_threads())
    return w, V, ok.view(bool)


def float_text_available() -> bool:
    """Whether :func:`float_rows_text` runs: the extension, built with a standard library that has
    floating-point ``std::to_chars`` (GCC >= 11's; not every libc++)."""
    return _C is not None and bool(getattr(_C, "FLOAT_TEXT", False))


def float_rows_text(a: np.ndarray) -> list[str]:
    """Each row of a 2-D float64 array as ``", ".join(map(json.dumps, row))`` (Python's repr of
    each value; NaN, Infinity, -Infinity), at C speed; where :func:`float_text_available`."""
    if not float_text_available():
        raise BackendError("float_rows_text needs the extension built with floating-point std::to_chars")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"float_rows_text needs a 2-D array, got shape {a.shape}")
    return _lib().float_rows_text(a.ctypes.data, a.shape[0], a.shape[1])


def read_bandwidth_probe(buffers: Sequence[np.ndarray]) -> int:
    """Read every byte of equally sized 1-D buffers with the kernels' threads (benchmarks)."""
    lib = _lib()
    bufs = [np.ascontiguousarray(b).reshape(-1).view(np.uint8) for b in buffers]
    if len({b.nbytes for b in bufs}) > 1:
        raise ValueError("read_bandwidth_probe needs buffers of equal size")
    nbytes = bufs[0].nbytes if bufs else 0
    return lib.read_probe([_addr(b) for b in bufs], nbytes, get_num_threads())
