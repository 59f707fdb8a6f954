"""Fused delta + weighted sum on the device (the ``combine`` op of ops/reference.py).

``out[k] = round(fp32(b) + s_k)``, ``s_k = ((0 + α_k0·d_0) + α_k1·d_1) + …`` left to
right in fp32 with every product and sum rounded on its own: the kernel is compiled
with ``enable_fp_fusion=False`` (no FMA contraction), and the K sums of one element
block are carried together so each delta is formed once. The rounding to the output
dtype is bit-exact to :func:`relex_kernels.io.dtypes.from_float32`.
"""

import triton
import triton.language as tl

from ...errors import ArgumentError
from ._common import delta, load_f32, store_rounded


@triton.jit(do_not_specialize=["n", "T", "K"])
def _combine(x_ptr, stride, n, T, a_ptr, K, out_ptr, out_stride,
             DT: tl.constexpr, FP16: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < n
    ks = tl.arange(0, KP)
    km = ks < K
    b = load_f32(x_ptr, cols, cm, DT)
    s = tl.zeros((KP, BLOCK), dtype=tl.float32)
    row = cols + stride  # int64 like cols: (T+1) rows may pass 2^31 elements
    for i in range(T):
        h = load_f32(x_ptr, row, cm, DT)
        row += stride
        d = delta(h, b, FP16)
        a = tl.load(a_ptr + ks * T + i, mask=km, other=0.0)
        s = s + a[:, None] * d[None, :]
    out = b[None, :] + s
    store_rounded(out_ptr, ks[:, None].to(tl.int64) * out_stride + cols[None, :], km[:, None] & cm[None, :],
                  out, DT)


def combine_block(x, n: int, T: int, dtype_code: int, alphas, out, fp16_deltas: bool = False) -> None:
    """Write ``out[k, :n]`` for each of the K rows of ``alphas`` from block ``x``.

    ``x``: (T+1, >= n) device tensor (base, then history), unit column stride, 2-byte
    dtypes as int16. ``alphas``: (K, T) float32 contiguous on the same device.
    ``out``: (K, >= n) tensor of the storage dtype (2-byte as int16), unit column
    stride. Launches on the current stream and returns without synchronising.
    """
    if n <= 0:
        return
    K = alphas.shape[0]
    if not (x.stride(1) == 1 and x.shape[0] == T + 1 and alphas.shape == (K, T) and alphas.is_contiguous()):
        raise ArgumentError(f"combine: x must be (T+1 = {T + 1}, >= n) with unit column stride, alphas a "
                            f"contiguous ({K}, {T})")
    if not (out.stride(1) == 1 and out.shape[0] == K):
        raise ArgumentError(f"combine: out must have K = {K} rows and unit column stride")
    kp = max(1, triton.next_power_of_2(K))
    block = max(128, 1024 // kp)
    _combine[(triton.cdiv(n, block),)](x, x.stride(0), n, T, alphas, K, out, out.stride(0), DT=dtype_code,
                                       FP16=bool(fp16_deltas), KP=kp, BLOCK=block, num_warps=4,
                                       enable_fp_fusion=False)
