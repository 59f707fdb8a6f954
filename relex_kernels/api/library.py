"""``relex::gram`` and ``relex::combine`` as torch custom ops (``torch.ops.relex.*``).

Registered with ``torch.library.custom_op`` and fake (meta) implementations, so a function
calling them traces under ``torch.compile`` (the ops run as opaque calls; their shapes and
dtypes come from the fake implementations) and dispatches on the inputs' device like any
torch op. The Python functions of :mod:`.kernels` are what they run.
"""

from __future__ import annotations

import torch

from .kernels import combine, gram

__all__ = ["gram_op", "combine_op"]


@torch.library.custom_op("relex::gram", mutates_args=())
def gram_op(base: torch.Tensor, history: list[torch.Tensor], fp16_deltas: bool = False) -> torch.Tensor:
    """:func:`relex_kernels.gram` as a torch op: the (T, T) float64 Gram."""
    return gram(base, history, fp16_deltas=fp16_deltas)


@gram_op.register_fake
def _gram_fake(base, history, fp16_deltas=False):
    return base.new_empty((len(history), len(history)), dtype=torch.float64)


@torch.library.custom_op("relex::combine", mutates_args=())
def combine_op(base: torch.Tensor, history: list[torch.Tensor], alphas: torch.Tensor,
               fp16_deltas: bool = False) -> torch.Tensor:
    """:func:`relex_kernels.combine` as a torch op: (K, *base.shape) of base's dtype."""
    return combine(base, history, alphas, fp16_deltas=fp16_deltas)


@combine_op.register_fake
def _combine_fake(base, history, alphas, fp16_deltas=False):
    K = alphas.shape[0] if alphas.dim() == 2 else 1
    return base.new_empty((K, *base.shape))
