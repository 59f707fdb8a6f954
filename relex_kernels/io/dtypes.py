"""safetensors dtype names, their sizes and the raw numpy types we view them as.

numpy has no bfloat16, so bf16 tensors are viewed as ``uint16`` and widened by
the ops (bf16 is the top half of an fp32). The native kernels take the small
integer codes below instead of names so the compiled module needs no torch.
"""

from __future__ import annotations

import numpy as np

# name -> (itemsize, raw numpy dtype used for zero-copy views)
_TABLE = {
    "F64": (8, np.float64),
    "F32": (4, np.float32),
    "F16": (2, np.float16),
    "BF16": (2, np.uint16),
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "I64": (8, np.int64),
    "I32": (4, np.int32),
    "I16": (2, np.int16),
    "I8": (1, np.int8),
    "U64": (8, np.uint64),
    "U32": (4, np.uint32),
    "U16": (2, np.uint16),
    "U8": (1, np.uint8),
    "BOOL": (1, np.bool_),
}

#: dtypes the engine fits (method §4: every floating-point tensor).
FITTED = ("F32", "F16", "BF16", "F64")

#: quantised floats: meaningful only with their scales (refused, see engine.trajectory)
FP8 = ("F8_E4M3", "F8_E5M2")

#: Codes shared with the native kernels (csrc/cpu/dtype.h). Keep in sync.
DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2, "F64": 3}


def known(name: str) -> bool:
    return name in _TABLE


def itemsize(name: str) -> int:
    return _TABLE[name][0]


def raw_numpy(name: str) -> np.dtype:
    return np.dtype(_TABLE[name][1])


def is_fitted(name: str) -> bool:
    return name in FITTED


def to_float32(raw: np.ndarray, name: str) -> np.ndarray:
    """Widen a raw view of dtype ``name`` to a new fp32 array (exact for all fitted types)."""
    if name == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def from_float32(x: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Round fp32 ``x`` to ``name`` with round-to-nearest-even; returns the raw view type.

    NaN stays NaN (quiet); overflow in fp16 gives inf like every IEEE conversion.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if name == "F32":
        r = x
    elif name == "F64":
        r = x.astype(np.float64)
    elif name == "F16":
        r = x.astype(np.float16)
    elif name == "BF16":
        u = x.view(np.uint32)
        # round-to-nearest-even on the 16 dropped bits; NaNs keep a set mantissa bit
        rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
        nan = np.isnan(x)
        r = rounded.astype(np.uint16)
        if nan.any():
            r[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    else:
        raise ValueError(f"cannot round to {name}")
    if out is not None:
        out[...] = r
        return out
    return r
