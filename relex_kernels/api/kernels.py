"""``gram``, :class:`GramAccumulator` and ``combine`` on torch tensors, bit for bit the engine's.

The engine sums a tensor's Gram in fixed chunks (``GRAM_CHUNK`` elements, fp32 within,
fp64 across) and blocks (``GRAM_BLOCK``, :mod:`relex_kernels.engine.gramsum`); these
functions use the same op backends in the same order, so their bits are the engine's for
the same backend. CPU tensors run on the native kernels (``backend="cpu"``, the default
when built) or the numpy reference; CUDA tensors stay on their device and run on the
device kernels (``cuda``, or ``triton``). F64 tensors are computed in fp64, as by the engine.

Threads: the native kernels use torch's intra-op thread count (``torch.get_num_threads()``)
unless ``RELEX_NUM_THREADS`` or :func:`relex_kernels.ops.native.set_num_threads` says
otherwise, so they never start a second, oversubscribing team inside a training process;
idle kernel threads sleep (``OMP_WAIT_POLICY=passive`` unless the environment sets one).
"""

from __future__ import annotations


import numpy as np
import torch

from ..engine.gramsum import GramSum
from ..errors import ArgumentError, DeviceError, NonFiniteError, ShapeError
from ..ops import DEVICE_BACKENDS, fp64, get_backend, native, reference, resolve_backend
from ..ops.reference import GRAM_CHUNK
from ._tensors import DTYPE_NAMES, check_versions, empty_outputs, raw

__all__ = ["gram", "GramAccumulator", "combine"]


def _caller_threads():
    """The native kernels take torch's thread count for the call (of this Python thread alone),
    unless one was set for them."""
    return native.calls_on_threads(torch.get_num_threads())


class _Runner:
    """Where a tensor's ops run: host op backends over raw views, or a device's kernels."""

    def __init__(self, like: torch.Tensor, backend: str | None):
        self.dtype = DTYPE_NAMES[like.dtype]
        self.kern = self.ops = None
        if like.device.type != "cpu":
            if like.dtype == torch.float64:  # as in the engine: F64 is computed on the host in fp64
                raise DeviceError(f"float64 tensors are computed on the host in fp64; move them to the CPU "
                                  f"(they are on {like.device})")
            be = resolve_backend(backend)
        else:
            be = get_backend(backend)
        self.identity = be.identity
        if be.name in DEVICE_BACKENDS and self.dtype != "F64":
            self.kern = be.module.device_kernels()
            if self.kern.device != like.device:
                raise DeviceError(f"the {be.name} kernels run on {self.kern.device}, the tensors are on "
                                  f"{like.device}")
        elif like.device.type != "cpu":
            raise DeviceError(f"tensors on {like.device} need a device backend (cuda or triton); "
                              f"backend {be.name!r} runs on the CPU")
        elif self.dtype == "F64":
            self.ops = fp64
        else:
            self.ops = be.module if be.name not in DEVICE_BACKENDS and be.supports(self.dtype) else reference

    # -- the two ops on one element range, flattened inputs ---------------------------------
    def gram(self, base, hist, acc, fp16_deltas: bool) -> None:
        """``acc += `` the Gram of the range (one Gram block at most; GRAM_CHUNK-aligned start)."""
        if self.kern is None:
            with _caller_threads():
                self.ops.gram(raw(base), [raw(h) for h in hist], self.dtype, acc, fp16_deltas=fp16_deltas)
            return
        from ..ops.cuda import OP_GROUP, gram_precision, op_groups, storage_torch_dtype
        T, n = len(hist), base.numel()
        tdt = storage_torch_dtype(self.dtype)
        part = torch.empty(self.kern.scratch_numel(T, min(n, OP_GROUP)), dtype=torch.float32,
                           device=self.kern.device)
        for a, b in op_groups(n):  # chunk-aligned device calls: the chunk contract holds across them
            x = torch.stack([base[a:b]] + [h[a:b] for h in hist]).view(tdt)
            self.kern.gram(x, b - a, T, self.dtype, acc, part, fp16_deltas, gram_precision())

    def zeros(self, T: int):
        if self.kern is None:
            return lambda: np.zeros((T, T), dtype=np.float64)
        return lambda: torch.zeros((T, T), dtype=torch.float64, device=self.kern.device)

    def combine(self, base, hist, alphas: np.ndarray, out: torch.Tensor, fp16_deltas: bool) -> None:
        K = alphas.shape[0]
        if self.kern is None:
            outs = [raw(o.view(-1)) for o in out]  # K tensors of their own, or the rows of one
            with _caller_threads():
                self.ops.combine(raw(base), [raw(h) for h in hist], alphas, self.dtype, outs,
                                 fp16_deltas=fp16_deltas)
            return
        from ..ops.cuda import op_groups, storage_torch_dtype
        T, n = len(hist), base.numel()
        tdt = storage_torch_dtype(self.dtype)
        A = torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)).to(self.kern.device)
        flat = out.view(K, -1).view(tdt)
        for a, b in op_groups(n):
            x = torch.stack([base[a:b]] + [h[a:b] for h in hist]).view(tdt)
            self.kern.combine(x, b - a, T, self.dtype, A, flat[:, a:b], fp16_deltas)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().reshape(-1)


class GramAccumulator:
    """The Gram of one tensor fed in pieces, in element order, with the bits of one :func:`gram`.

    >>> acc = GramAccumulator()
    >>> for a in range(0, n, piece):          # any piece sizes
    ...     acc.add(base_flat[a:a + piece], [h[a:a + piece] for h in history_flat])
    >>> G = acc.result()                      # float64 (T, T), on the inputs' device

    Pieces are 1-D (or are flattened); every piece holds the same T versions, dtype and
    device. The accumulator keeps at most one partial ``GRAM_CHUNK`` of each version, so the
    sum is chunked exactly as the engine chunks the whole tensor whatever the piece sizes.
    """

    def __init__(self, *, fp16_deltas: bool = False, backend: str | None = None):
        if not isinstance(fp16_deltas, bool):
            raise ArgumentError(f"fp16_deltas must be a bool, got {type(fp16_deltas).__name__}")
        self.fp16_deltas, self.backend = fp16_deltas, backend
        self.numel = 0  # elements summed so far (carried ones included)
        self._runner = self._sum = None
        self._carry: list[torch.Tensor] = []  # base + history of the open partial chunk
        self._like = None
        self._done = False
        self._fed = 0  # elements summed into the Gram (the carried ones are not yet)

    @property
    def T(self) -> int | None:
        return None if self._like is None else self._like[0]

    def add(self, base, history) -> None:
        """Add elements of ``base`` and its T versions (the next ones, in element order)."""
        if self._done:
            raise ArgumentError("this GramAccumulator already returned its result; start a new one")
        base, history = check_versions(base, history)
        like = (len(history), base.dtype, base.device)
        if self._like is None:
            self._like = like
            self._runner = _Runner(base, self.backend)
            self._sum = GramSum(-1, self._runner.zeros(len(history)))
        elif like != self._like:
            raise ShapeError(f"pieces must keep T, dtype and device: first (T={self._like[0]}, {self._like[1]}, "
                             f"{self._like[2]}), now (T={like[0]}, {like[1]}, {like[2]})")
        rows = [_flat(base)] + [_flat(h) for h in history]
        n = rows[0].numel()
        pos = 0
        if self._carry:  # complete the open chunk first
            have = self._carry[0].numel()
            take = min(n, GRAM_CHUNK - have)
            self._carry = [torch.cat([c, r[:take]]) for c, r in zip(self._carry, rows)]
            pos = take
            if self._carry[0].numel() == GRAM_CHUNK:
                self._feed(self._carry)
                self._carry = []
        full = pos + (n - pos) // GRAM_CHUNK * GRAM_CHUNK
        if full > pos:
            self._feed([r[pos:full] for r in rows])
        if full < n:
            self._carry = [r[full:].clone() for r in rows]
        self.numel += n

    def _feed(self, rows: list[torch.Tensor]) -> None:
        """Sum whole chunks (or the tensor's last, partial one) starting at a chunk boundary."""
        start = self._fed
        n = rows[0].numel()
        for c0, c1, blk in self._sum.pieces(start, start + n):
            self._runner.gram(rows[0][c0 - start:c1 - start], [r[c0 - start:c1 - start] for r in rows[1:]], blk,
                              self.fp16_deltas)
        self._fed = start + n

    def result(self) -> torch.Tensor:
        """The Gram (T, T) float64 on the inputs' device; the accumulator is then spent."""
        if self._like is None:
            raise ArgumentError("nothing was added to this GramAccumulator")
        if self._done:
            raise ArgumentError("this GramAccumulator already returned its result")
        if self._carry:
            self._feed(self._carry)
            self._carry = []
        self._done = True
        G = self._sum.result()
        return torch.from_numpy(G) if isinstance(G, np.ndarray) else G


def _check_finite(G: torch.Tensor, base: torch.Tensor, history: list[torch.Tensor]) -> None:
    if bool(torch.isfinite(G).all()):
        return
    for label, x in [("base", base)] + [(f"history[{i}]", h) for i, h in enumerate(history)]:
        bad = int((~torch.isfinite(x.detach())).sum())
        if bad:
            raise NonFiniteError(f"{label} holds {bad} NaN/Inf values")
    raise NonFiniteError("the deltas' squares overflow the fp32 Gram (values too large to fit)")


def gram(base, history, *, fp16_deltas: bool = False, backend: str | None = None) -> torch.Tensor:
    """The T x T Gram (float64) of the deltas ``history[i] - base``, with the engine's bits.

    ``base``: a tensor of any float dtype and stride; ``history``: its T later versions (a
    sequence, or one tensor stacked on dim 0), same shape, dtype and device. CUDA tensors
    stay on the device. NaN/Inf in an input is a :class:`~relex_kernels.errors.NonFiniteError`.
    """
    base, history = check_versions(base, history)
    acc = GramAccumulator(fp16_deltas=fp16_deltas, backend=backend)
    acc.add(base, history)
    G = acc.result()
    _check_finite(G, base, history)
    return G


def _alphas(alphas, K_T: tuple[int, int] | None = None) -> np.ndarray:
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.detach().to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(alphas, dtype=np.float64)
    except (TypeError, ValueError):
        raise ArgumentError(f"alphas must be numbers, (K, T) or (T,); got {type(alphas).__name__}") from None
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0 or (K_T is not None and a.shape[1] != K_T[1]):
        raise ShapeError(f"alphas must be (K, T) with K >= 1, or (T,), with T = "
                         f"{K_T[1] if K_T else 'len(history)'}; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise NonFiniteError("alphas hold NaN/Inf")
    with np.errstate(over="ignore"):  # (the kernels take them in fp32, as the engine does)
        in_fp32 = np.isfinite(a.astype(np.float32)).all()
    if not in_fp32:
        raise NonFiniteError("alphas past the fp32 range (|a| > 3.4e38)")
    return a


def combine(base, history, alphas, out=None, *, fp16_deltas: bool = False, backend: str | None = None) -> torch.Tensor:
    """The K weighted sums ``base + Σ_i alphas[k, i]·(history[i] − base)``, rounded as the engine rounds.

    Computed in fp32 (fp64 for float64 tensors), no fused multiply-add, rounded to base's
    dtype to nearest even: the bytes ``relex extrapolate`` writes. ``alphas``: (K, T) or
    (T,), any float type (converted to fp32 as the engine converts them). Returns a
    (K, *base.shape) tensor of base's dtype on base's device, or writes ``out`` (same
    shape, contiguous). An fp16 result past ±65504 is a NonFiniteError, as in the engine, and so
    is any result that overflows its dtype with alphas of |α|₁ > 1e6 (below, an overflow would
    need inputs past 1e32).
    """
    base, history = check_versions(base, history)
    a = _alphas(alphas, (0, len(history)))
    out = empty_outputs(base, a.shape[0], out)
    return _combine_into(base, history, a, out, fp16_deltas, backend)


def combine_separate(base, history, alphas, *, fp16_deltas: bool = False, backend: str | None = None,
                     bounded: bool = False) -> list[torch.Tensor]:
    """:func:`combine`, each of the K results a tensor with storage of its own (kept or saved
    alone, a view of one (K, ...) result would keep all K); on the host written in place.
    ``bounded``: the alphas come from weights :func:`~relex_kernels.fit.target_weights` accepted,
    which keep bf16/fp32/fp64 results in range: only fp16 results are checked."""
    base, history = check_versions(base, history)
    a = _alphas(alphas, (0, len(history)))
    K = a.shape[0]
    if base.device.type == "cpu":
        outs = [torch.empty_like(base, memory_format=torch.contiguous_format) for _ in range(K)]
        return _combine_into(base, history, a, outs, fp16_deltas, backend, bounded)
    out = _combine_into(base, history, a, empty_outputs(base, K, None), fp16_deltas, backend, bounded)
    return [out[0]] if K == 1 else [o.clone() for o in out.unbind(0)]  # (a device writes one (K, n) block)


def _combine_into(base, history, a: np.ndarray, out, fp16_deltas: bool, backend, bounded: bool = False):
    """Run the K sums into ``out`` and return it: a (K, ...) tensor, or (host) a list of K contiguous
    tensors."""
    runner = _Runner(base, backend)
    runner.combine(_flat(base), [_flat(h) for h in history], a, out, fp16_deltas)
    # Finite inputs: a sum past the dtype's range is inf. fp16's range is within reach of a real
    # prediction: always checked. bf16/fp32/fp64 (to 3.4e38) only with large alphas not known to be
    # bounded: with |α|₁ <= 1e6 an overflow needs inputs past 1e32, far beyond any model's weights;
    # the pass over the outputs is skipped (it cost as much as the kernel).
    check = base.dtype == torch.float16 or (not bounded and float(np.abs(a).sum(axis=1).max()) > 1e6)
    for o in (out if check else []):
        bad = int((~torch.isfinite(o)).sum())
        if bad:
            f16 = base.dtype == torch.float16
            what = "leaves the F16 range (|x| > 65504)" if f16 else f"overflows {base.dtype}"
            raise NonFiniteError(f"the prediction {what} at {bad} of {o.numel()} elements; predict a nearer step"
                                 + (", or compute in bf16 or fp32" if f16 else " (the alphas are too large)"))
    return out
