"""The torch-native API: RELEX on tensors and state dicts in memory, CPU or CUDA.

``relex_kernels.gram`` / :class:`GramAccumulator` / ``combine`` (the kernels, the engine's
bits), :class:`Fit` (the T x T mathematics of one tensor), ``extrapolate_tensor`` and
``extrapolate_state_dict`` (whole predictions), and the torch ops ``torch.ops.relex.gram``
and ``torch.ops.relex.combine`` (registered when this package is imported). Errors are
:class:`~relex_kernels.errors.RelexError` subclasses. Importing this package imports torch;
``import relex_kernels`` alone does not.
"""

from .fitting import Fit
from .kernels import GramAccumulator, combine, gram
from .library import combine_op, gram_op
from .state_dict import extrapolate_state_dict, extrapolate_tensor

__all__ = ["Fit", "GramAccumulator", "combine", "combine_op", "extrapolate_state_dict", "extrapolate_tensor",
           "gram", "gram_op"]
