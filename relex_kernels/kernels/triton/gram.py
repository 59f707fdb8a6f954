"""Fused delta + Gram on the device, deterministic (the ``gram`` op of ops/reference.py).

Input: a *block*, a (T+1, n) row-strided device tensor whose row 0 is the base and
rows 1..T the history, covering elements that start at a multiple of GRAM_CHUNK of
the tensor (so chunk c of the block is chunk c of the contract).

Two kernels, no atomics:

1. ``_gram_partials``: program (s, bi, bj) forms the deltas of sub-chunk s (a
   GRAM_CHUNK split into SPLIT equal parts) for row tiles bi <= bj on the fly and
   accumulates their product in fp32 into ``part[s]`` (T x T, both triangles).
   T <= 8: broadcast products and a sum (exact fp32 products); larger T: ``tl.dot``
   on BT x BD tiles with the chosen input precision.
2. ``_gram_reduce``: per entry, the SPLIT sub-partials of a chunk are added in fp32
   in order (the chunk's fp32 partial), then each chunk partial is added to the fp64
   accumulator in increasing chunk order — the reference's reduction, so the result
   depends neither on the launch nor on how a tensor was cut into blocks.
"""

import triton
import triton.language as tl

from ...errors import ArgumentError
from ._common import delta, load_f32

GRAM_CHUNK = 1 << 16  # must equal ops.reference.GRAM_CHUNK
#: sub-chunks per chunk: parallelism for tensors of few chunks; fixed so results never
#: depend on how many chunks a launch covers
SPLIT = 8
SUB = GRAM_CHUNK // SPLIT
PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _tile_deltas(x_ptr, stride, rows, row_mask, cols, col_mask, b, DT: tl.constexpr, FP16: tl.constexpr):
    # rows are history indices 0..T-1 -> block rows 1..T
    m = row_mask[:, None] & col_mask[None, :]
    h = load_f32(x_ptr, (rows[:, None] + 1).to(tl.int64) * stride + cols[None, :], m, DT)
    d = delta(h, b[None, :], FP16)
    return tl.where(m, d, 0.0)


@triton.jit(do_not_specialize=["n", "T"])
def _gram_partials(x_ptr, stride, n, T, part_ptr,
                   DT: tl.constexpr, FP16: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                   SUB_N: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    s = tl.program_id(0)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    if bi <= bj:
        ri = bi * BT + tl.arange(0, BT)
        rj = bj * BT + tl.arange(0, BT)
        mi = ri < T
        mj = rj < T
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        start32 = s * SUB_N  # < 2^31: a block holds at most 2^31 elements per row
        start = start32.to(tl.int64)
        # sub-chunks past n (the last chunk's tail) store zeros
        for k in range(0, tl.maximum(tl.minimum(n - start32, SUB_N), 0), BD):
            cols = start + k + tl.arange(0, BD)
            cm = cols < n
            b = load_f32(x_ptr, cols, cm, DT)
            di = _tile_deltas(x_ptr, stride, ri, mi, cols, cm, b, DT, FP16)
            if bi == bj:  # the diagonal tile (the only one for T <= BT): form the deltas once
                dj = di
            else:
                dj = _tile_deltas(x_ptr, stride, rj, mj, cols, cm, b, DT, FP16)
            if USE_DOT:
                acc = tl.dot(di, tl.trans(dj), acc, input_precision=PREC)
            else:
                acc += tl.sum(di[:, None, :] * dj[None, :, :], axis=2)
        base = part_ptr + s.to(tl.int64) * T * T
        m = mi[:, None] & mj[None, :]
        tl.store(base + ri[:, None] * T + rj[None, :], acc, mask=m)
        if bi != bj:
            tl.store(base + rj[None, :] * T + ri[:, None], acc, mask=m)


@triton.jit(do_not_specialize=["TT", "n_chunks"])
def _gram_reduce(part_ptr, acc_ptr, TT, n_chunks, SPLIT_N: tl.constexpr, BE: tl.constexpr):
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    m = e < TT
    acc = tl.load(acc_ptr + e, mask=m, other=0.0)
    for c in range(n_chunks):
        p = tl.load(part_ptr + c * SPLIT_N * TT + e, mask=m, other=0.0)
        for q in range(1, SPLIT_N):
            p += tl.load(part_ptr + (c * SPLIT_N + q) * TT + e, mask=m, other=0.0)
        acc += p.to(tl.float64)
    tl.store(acc_ptr + e, acc, mask=m)


def tile_config(T: int) -> dict:
    """Launch shape for T (fixed per T: the in-chunk fp32 order must not vary between runs)."""
    if T <= 8:
        bt = max(2, triton.next_power_of_2(T))
        return {"BT": bt, "BD": 4096 // (bt * bt), "USE_DOT": False, "num_warps": 4}
    bt = 16 if T <= 16 else 32 if T <= 32 else 64
    # 128-byte row segments of 2-byte data where the registers allow
    return {"BT": bt, "BD": 64 if bt <= 32 else 32, "USE_DOT": True, "num_warps": 4 if bt <= 32 else 8}


def resolve_precision(T: int, precision: str | None) -> str:
    """``auto``/None: exact fp32 products where the work is memory-bound (T <= 8), else 3xTF32."""
    if precision in (None, "auto"):
        return "ieee" if T <= 8 else "tf32x3"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown Gram precision {precision!r} (choose from auto, {', '.join(PRECISIONS)})")
    return precision


def partials_numel(T: int, n: int) -> int:
    """fp32 scratch elements ``gram_block`` needs for a block of ``n`` elements."""
    return triton.cdiv(n, GRAM_CHUNK) * SPLIT * T * T


def gram_block(x, n: int, T: int, dtype_code: int, acc, part, fp16_deltas: bool = False,
               precision: str | None = None) -> None:
    """``acc`` (T x T float64, contiguous, on x's device) ``+=`` the Gram of block ``x``.

    ``x``: (T+1, >= n) tensor, unit column stride, any row stride; 2-byte dtypes as
    int16. ``part``: fp32 scratch of at least :func:`partials_numel` elements.
    Launches on the current stream and returns without synchronising.
    """
    if n <= 0:
        return
    if not (x.stride(1) == 1 and x.shape[0] == T + 1 and acc.is_contiguous()):
        raise ArgumentError(f"gram: x must be (T+1 = {T + 1}, >= n) with unit column stride, acc contiguous")
    if not (part.numel() >= partials_numel(T, n) and partials_numel(T, n) < 2**31):
        raise ArgumentError(f"gram: part must hold partials_numel(T, n) = {partials_numel(T, n)} (< 2**31) floats")
    cfg = tile_config(T)
    prec = resolve_precision(T, precision)
    n_chunks = triton.cdiv(n, GRAM_CHUNK)
    # whole chunks of sub-chunks: those past n store zero partials, which keeps the
    # reduction uniform
    n_sub = n_chunks * SPLIT
    nb = triton.cdiv(T, cfg["BT"])
    _gram_partials[(n_sub, nb, nb)](
        x, x.stride(0), n, T, part, DT=dtype_code, FP16=bool(fp16_deltas), BT=cfg["BT"], BD=cfg["BD"],
        SUB_N=SUB, USE_DOT=cfg["USE_DOT"], PREC=prec, num_warps=cfg["num_warps"], enable_fp_fusion=True)
    BE = 256
    _gram_reduce[(triton.cdiv(T * T, BE),)](part, acc, T * T, n_chunks, SPLIT_N=SPLIT, BE=BE, num_warps=4,
                                           enable_fp_fusion=True)
