"""The reference implementation of every op: plain numpy, readable, exact to the contract.

This file *is* the contract the native, Triton and CUDA kernels are tested against.

Inputs are raw 1-D views of one element range of one tensor, in its storage dtype
(``uint16`` for bf16, see :mod:`relex_kernels.io.dtypes`), typically straight from
the memory maps: ``base`` (θ₀) and ``hist[i]`` (θ at history step i), all of the same
length ``n``.

Deltas (method §2-3):

* default: ``d_i = fp32(h_i) - fp32(b)`` (one fp32 subtraction);
* ``fp16_deltas``: ``d_i = fp32(fp16(fp16(h_i) - fp16(b)))``, the authors' fp16 delta
  files (conversions and the subtraction rounded to nearest even).

``gram``: ``acc[T, T] (float64) += Σ_c fp64(D_c D_cᵀ)`` where ``D_c`` is the T x len
fp32 delta block of chunk ``c = [k·GRAM_CHUNK, (k+1)·GRAM_CHUNK)`` (chunks counted from
the start of the given range), each chunk's product accumulated in fp32 and the chunk
partials added to ``acc`` in fp64 in increasing chunk order. Inside a chunk the fp32
summation order is the backend's own; across chunks it is fixed, so a backend is
bit-reproducible for any thread count, and splitting a range at multiples of
``GRAM_CHUNK`` gives the same ``acc``.

``combine``: for each output k, ``out_k = round(fp32(b) + s_k)`` with
``s_k = (((α_k0·d_0) + α_k1·d_1) + …)`` evaluated left to right in fp32, every product
and sum rounded separately (no fused multiply-add), rounded to the output dtype
(that of ``base``) to nearest even. Every backend must match this bit for bit.

The engine computes F64 tensors in fp64 instead (:mod:`.fp64`); the F64 case of this
contract is what the kernels' own F64 paths are tested against.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence

import numpy as np

from ..io import dtypes

GRAM_CHUNK = 1 << 16

#: elements per combine step: a few MB of fp32 temporaries
_COMBINE_BLOCK = 1 << 18


def deltas_fp32(base: np.ndarray, hist: Sequence[np.ndarray], dtype: str, fp16_deltas: bool = False) -> np.ndarray:
    """The (T, n) fp32 delta matrix of a range (materialised: reference and tests only)."""
    b = dtypes.to_float32(base, dtype)
    out = np.empty((len(hist), b.shape[0]), dtype=np.float32)
    if fp16_deltas:
        b16 = b.astype(np.float16)
        for i, h in enumerate(hist):
            h16 = dtypes.to_float32(h, dtype).astype(np.float16)
            out[i] = (h16.astype(np.float32) - b16.astype(np.float32)).astype(np.float16)
    else:
        for i, h in enumerate(hist):
            np.subtract(dtypes.to_float32(h, dtype), b, out=out[i])
    return out


def gram(base: np.ndarray, hist: Sequence[np.ndarray], dtype: str, acc: np.ndarray,
         fp16_deltas: bool = False) -> None:
    """``acc`` (T x T float64, C-contiguous) ``+=`` the Gram of the deltas of this range."""
    n = base.shape[0]
    for c0 in range(0, n, GRAM_CHUNK):
        c1 = min(n, c0 + GRAM_CHUNK)
        d = deltas_fp32(base[c0:c1], [h[c0:c1] for h in hist], dtype, fp16_deltas)
        acc += np.matmul(d, d.T, dtype=np.float32).astype(np.float64)


def combine(base: np.ndarray, hist: Sequence[np.ndarray], alphas: np.ndarray, dtype: str,
            outs: Sequence[np.ndarray], fp16_deltas: bool = False) -> None:
    """Write ``len(outs)`` weighted sums; ``alphas`` is (K, T) float32, ``outs[k]`` raw views of ``dtype``."""
    alphas = np.asarray(alphas, dtype=np.float32)
    n = base.shape[0]
    for c0 in range(0, n, _COMBINE_BLOCK):
        c1 = min(n, c0 + _COMBINE_BLOCK)
        b = dtypes.to_float32(base[c0:c1], dtype)
        d = deltas_fp32(base[c0:c1], [h[c0:c1] for h in hist], dtype, fp16_deltas)
        for k, out in enumerate(outs):
            s = np.zeros(c1 - c0, dtype=np.float32)
            for i in range(d.shape[0]):
                s += alphas[k, i] * d[i]
            dtypes.from_float32(b + s, dtype, out=out[c0:c1])


def nonfinite_count(x: np.ndarray, dtype: str) -> int:
    """How many NaN/Inf elements a raw view holds (error path only)."""
    return int((~np.isfinite(dtypes.to_float32(x, dtype))).sum())


def available() -> tuple[bool, str]:
    return True, "pure numpy, always available"


def identity() -> str:
    """``reference/<BLAS kernel>``: the in-chunk fp32 order is that of numpy's matmul, whose BLAS picks
    its kernel for the CPU at run time (OpenBLAS: Haswell, SkylakeX, ...)."""
    return f"reference/{_blas_core()}"


@functools.lru_cache(maxsize=1)
def _blas_core() -> str:
    import ctypes
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        libs = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                    "openblas_get_corename"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return f"openblas-{fn().decode()}"
    try:  # another BLAS: its kernel follows the CPU's vector extensions
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        flags = []
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()
    return f"blas-{isa}"


def supports(dtype: str) -> bool:
    return dtype in dtypes.FITTED
