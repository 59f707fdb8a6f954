"""F64 tensors in fp64: deltas, Gram and weighted sums (numpy, one summation order everywhere).

Every kernel — native, Triton, CUDA and the fp32 contract of :mod:`.reference` they are
tested against — computes in fp32, which would round an F64 tensor to fp32 even where
nothing moved. F64 tensors are rare and small, so the engine sends every one of them
here whatever the backend (``Streamer._ops``; the device pipeline hands them to it):

* deltas ``d_i = h_i − b`` in fp64 (``fp16_deltas``: the contract's fp16 deltas, widened);
* ``gram``: the chunk structure of the contract with fp64 chunk partials, each entry a
  numpy pairwise sum (no BLAS, whose order depends on the CPU: the same bits everywhere);
* ``combine``: ``out_k = b + (((α_k0·d_0) + α_k1·d_1) + …)`` in fp64, α in fp64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import reference
from .reference import GRAM_CHUNK


def deltas(base: np.ndarray, hist: Sequence[np.ndarray], fp16_deltas: bool = False) -> np.ndarray:
    """The (T, n) fp64 delta matrix of a range of an F64 tensor."""
    if fp16_deltas:  # fp16 values: exact in fp64
        return reference.deltas_fp32(base, hist, "F64", True).astype(np.float64)
    return np.stack([np.subtract(h, base, dtype=np.float64) for h in hist])


def gram(base: np.ndarray, hist: Sequence[np.ndarray], dtype: str, acc: np.ndarray,
         fp16_deltas: bool = False) -> None:
    """``acc`` (T x T float64) ``+=`` the fp64 Gram of this range, chunk partials added in chunk order."""
    _check(dtype)
    n, T = base.shape[0], len(hist)
    for c0 in range(0, n, GRAM_CHUNK):
        d = deltas(base[c0:c0 + GRAM_CHUNK], [h[c0:c0 + GRAM_CHUNK] for h in hist], fp16_deltas)
        part = np.empty((T, T))
        for i in range(T):
            part[i, i:] = (d[i] * d[i:]).sum(axis=1)
            part[i:, i] = part[i, i:]
        acc += part


def combine(base: np.ndarray, hist: Sequence[np.ndarray], alphas: np.ndarray, dtype: str,
            outs: Sequence[np.ndarray], fp16_deltas: bool = False) -> None:
    """Write ``len(outs)`` weighted sums; ``alphas`` (K, T) is used in fp64."""
    _check(dtype)
    alphas = np.asarray(alphas, dtype=np.float64)
    n = base.shape[0]
    for c0 in range(0, n, GRAM_CHUNK):
        c1 = min(n, c0 + GRAM_CHUNK)
        d = deltas(base[c0:c1], [h[c0:c1] for h in hist], fp16_deltas)
        for k, out in enumerate(outs):
            s = np.zeros(c1 - c0)
            for i in range(d.shape[0]):
                s += alphas[k, i] * d[i]
            np.add(base[c0:c1], s, out=out[c0:c1])


def _check(dtype: str) -> None:
    if dtype != "F64":
        raise ValueError(f"the fp64 path takes F64 tensors, not {dtype}")


def available() -> tuple[bool, str]:
    return True, "numpy fp64, for F64 tensors"


def supports(dtype: str) -> bool:
    return dtype == "F64"


def identity() -> str:
    return "fp64"
