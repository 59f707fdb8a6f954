"""relex_kernels: streaming RELEX extrapolation of RLVR checkpoints.

The public API is small: :func:`extrapolate` / :func:`predict` (whole checkpoints,
see :mod:`relex_kernels.engine`), the op layer :mod:`relex_kernels.ops` (``gram``,
``combine``) for embedding in other tools, and :mod:`relex_kernels.fit` (the T x T
mathematics). Importing this package never needs a compiler output, a GPU or Triton.
"""

from ._version import __version__  # noqa: E402

from .errors import RelexError  # noqa: E402
from .engine import extrapolate, predict  # noqa: E402
from .fit import FitOptions  # noqa: E402

__all__ = ["RelexError", "FitOptions", "extrapolate", "predict", "__version__"]
