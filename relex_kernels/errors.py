"""The project's own error types.

Every problem with a user's input is raised as a :class:`RelexError` subclass whose
message names the file (and tensor and step where relevant). The CLI prints the
message on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class RelexError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class FormatError(RelexError):
    """A file that is not a valid safetensors file / index / fit file."""


class InputError(RelexError):
    """Inputs that are valid files but do not make a valid trajectory."""


class UsageError(RelexError):
    """Options that make no sense together (rank too high, bad target, ...)."""


class ArgumentError(UsageError):
    """A Python API argument of the wrong type or value; the message names the argument."""


class ShapeError(ArgumentError):
    """Tensors that must have one shape (a tensor's versions, an ``out`` buffer) do not."""


class DTypeError(ArgumentError):
    """A tensor of a dtype the operation does not take, or versions of one tensor in different dtypes."""


class DeviceError(ArgumentError):
    """Tensors on different devices, or on a device no available backend runs on."""


class NonFiniteError(InputError):
    """NaN or Inf in an input (or deltas whose squares overflow the fp32 Gram)."""


class RelexWarning(UserWarning):
    """A run that proceeds but is probably not what the user meant (the CLI prints it on one line)."""


class OutputError(RelexError):
    """The output cannot be written (exists, inside an input, disk full, locked)."""


class BackendError(RelexError):
    """A compute backend was requested explicitly and is not available."""


class DeviceMemoryError(BackendError):
    """The device ran out of memory for the pipeline's buffers (lower --device-memory-budget)."""
