"""Checking torch tensors and handing their bits to the op layer (internal to :mod:`relex_kernels.api`).

The kernels take raw 1-D storage views (bf16 and fp16 as 16-bit integers, see
:mod:`relex_kernels.io.dtypes`); a torch tensor of any float dtype and any stride becomes
one here (a non-contiguous tensor is copied once, contiguous ones are viewed in place).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ..io import dtypes

#: torch dtype -> safetensors dtype name (the op layer's names)
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
#: the integer dtype of the same width: a view of a tensor's bits that numpy can hold
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.float32,
         torch.float64: torch.float64}


def check_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_NAMES:
        raise DTypeError(f"{what} is {x.dtype}; RELEX fits float tensors: "
                         f"{', '.join(str(d) for d in DTYPE_NAMES)}")
    if x.is_complex() or x.layout != torch.strided:
        raise DTypeError(f"{what} must be a dense real tensor (layout {x.layout})")
    return x


def check_versions(base, history, what: str = "history") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``base`` and its T versions (a sequence of tensors, or one tensor stacked on dim 0): one shape,
    dtype and device for all."""
    base = check_tensor(base, "base")
    if isinstance(history, torch.Tensor):
        if history.dim() != base.dim() + 1:
            raise ShapeError(f"a stacked {what} must have one more dimension than base "
                             f"(T, *{tuple(base.shape)}); got {tuple(history.shape)}")
        history = list(history.unbind(0))
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        history = list(history)
    else:
        raise ArgumentError(f"{what} must be a sequence of tensors or a stacked tensor, got {type(history).__name__}")
    if not history:
        raise ArgumentError(f"{what} is empty: give the T >= 1 later versions of base")
    for i, h in enumerate(history):
        check_tensor(h, f"{what}[{i}]")
        if h.shape != base.shape:
            raise ShapeError(f"{what}[{i}] has shape {tuple(h.shape)}, base {tuple(base.shape)}")
        if h.dtype != base.dtype:
            raise DTypeError(f"{what}[{i}] is {h.dtype}, base {base.dtype}: every version of a tensor must "
                             "have one dtype")
        if h.device != base.device:
            raise DeviceError(f"{what}[{i}] is on {h.device}, base on {base.device}")
    return base, history


def raw(x: torch.Tensor) -> np.ndarray:
    """The 1-D raw storage view of a CPU tensor (copied once if it is not contiguous)."""
    x = x.detach()
    if x.device.type != "cpu":
        raise DeviceError(f"internal: a {x.device} tensor reached a host kernel")
    flat = x.contiguous().reshape(-1).view(_BITS[x.dtype]).numpy()
    return flat.view(dtypes.raw_numpy(DTYPE_NAMES[x.dtype]))


def empty_outputs(base: torch.Tensor, K: int, out) -> torch.Tensor:
    """The (K, *shape) output tensor: ``out`` checked, or a new one of base's dtype and device."""
    shape = (K, *base.shape)
    if out is None:
        return torch.empty(shape, dtype=base.dtype, device=base.device)
    check_tensor(out, "out")
    if tuple(out.shape) != shape or out.dtype != base.dtype or out.device != base.device:
        raise ShapeError(f"out must be a {base.dtype} tensor of shape {shape} on {base.device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ShapeError("out must be contiguous (the kernels write it in place)")
    return out
