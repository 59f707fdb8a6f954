"""relex_kernels: streaming RELEX extrapolation of RLVR checkpoints.

The public API:

* :func:`extrapolate` / :func:`predict`: whole checkpoint directories, streamed in bounded
  memory (:mod:`relex_kernels.engine`); needs numpy only;
* the torch-native API (:mod:`relex_kernels.api`, loaded with torch on first use):
  :func:`gram`, :class:`GramAccumulator`, :func:`combine`, :class:`Fit`,
  :func:`extrapolate_tensor`, :func:`extrapolate_state_dict` on tensors and state dicts in
  memory, CPU or CUDA, and the torch ops ``torch.ops.relex.gram`` / ``torch.ops.relex.combine``;
* :class:`FitOptions`, :class:`RelexError` (every error raised on purpose is a subclass).

Importing this package never needs torch, a compiler output, a GPU or Triton.
"""

from ._version import __version__  # noqa: E402

from .errors import RelexError  # noqa: E402
from .engine import extrapolate, predict  # noqa: E402
from .fit import FitOptions  # noqa: E402

#: names served by relex_kernels.api, imported (with torch) on first access
_TORCH_API = ("Fit", "GramAccumulator", "combine", "extrapolate_state_dict", "extrapolate_tensor", "gram")

__all__ = ["RelexError", "FitOptions", "extrapolate", "predict", "__version__", *_TORCH_API]


def __getattr__(name: str):
    if name in _TORCH_API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'relex_kernels' has no attribute {name!r}")
