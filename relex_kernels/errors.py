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


class RelexWarning(UserWarning):
    """A run that proceeds but is probably not what the user meant (the CLI prints it on one line)."""


class OutputError(RelexError):
    """The output cannot be written (exists, inside an input, disk full, locked)."""


class BackendError(RelexError):
    """A compute backend was requested explicitly and is not available."""
