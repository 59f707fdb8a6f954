"""Planning and running the two passes over a trajectory (see :mod:`.streaming`)."""

from .run import RunResult, default_memory_budget, extrapolate, parse_size, predict
from .trajectory import Job, Trajectory

__all__ = ["RunResult", "default_memory_budget", "extrapolate", "parse_size", "predict", "Job", "Trajectory"]
