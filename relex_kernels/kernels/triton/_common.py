"""Element loads and exact roundings shared by the Triton kernels.

Storage dtype codes are those of :data:`relex_kernels.io.dtypes.DTYPE_CODES`
(0 F32, 1 F16, 2 BF16, 3 F64). 2-byte storage is passed to the kernels as int16
and reinterpreted bit for bit here, so the kernels behave the same compiled and
under ``TRITON_INTERPRET=1`` (whose numpy has no bfloat16).

This module imports nothing from the package: the tests load fresh copies of
the kernel modules under the interpreter (see ``tests/test_triton_kernels.py``).
"""

import triton
import triton.language as tl


@triton.jit
def load_f32(ptr, offs, mask, DT: tl.constexpr):
    """fp32 values of a raw storage row (exact widening; F64 rounds to nearest even)."""
    if DT == 2:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        x = (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DT == 1:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        x = raw.to(tl.float16, bitcast=True).to(tl.float32)
    elif DT == 0:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def round_f16(x):
    """fp32 -> fp16 -> fp32 (round to nearest even), the fp16_deltas rounding."""
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def delta(h, b, FP16: tl.constexpr):
    """One delta from fp32 values: ``h - b``, or the authors' fp16 delta."""
    if FP16:
        d = round_f16(round_f16(h) - round_f16(b))
    else:
        d = h - b
    return d


@triton.jit
def store_rounded(ptr, offs, mask, x, DT: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype (nearest even, NaN kept quiet) and store it.

    bf16 and the fp16 NaN case use integer arithmetic so the bits are those of
    :func:`relex_kernels.io.dtypes.from_float32` on every device.
    """
    if DT == 2:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, (u >> 16) | 0x40, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif DT == 1:
        u = x.to(tl.uint32, bitcast=True)
        nan = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
        h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.uint16, bitcast=True).to(tl.uint32)
        r = tl.where(x != x, nan, h)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif DT == 0:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x.to(tl.float64), mask=mask)
