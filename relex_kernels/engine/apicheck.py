"""Up-front checks of the public API's arguments (:func:`~.run.extrapolate`, :func:`~.run.predict`).

A wrong type or value is an :class:`~relex_kernels.errors.ArgumentError` (a UsageError)
naming the argument, raised before any file is touched, never a ``TypeError`` from deep
inside. Each check returns the argument normalised (paths as ``str``, steps as ``int``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from ..errors import ArgumentError
from ..fit import FitOptions, is_int, wrong_option


def _got(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def path(name: str, v, optional: bool = False) -> str | None:
    """A file or directory path: ``str`` or ``os.PathLike`` (``None`` too when ``optional``)."""
    if v is None and optional:
        return None
    p = os.fspath(v) if isinstance(v, (str, os.PathLike)) else None
    if not isinstance(p, str) or not p:
        hint = ("; for state dicts in memory use relex_kernels.extrapolate_state_dict"
                if isinstance(v, Mapping) or hasattr(v, "get_tensor") else "")
        raise ArgumentError(f"{name} must be a path (str or os.PathLike){' or None' if optional else ''}; "
                            f"got {_got(v)}{hint}")
    return p


def checkpoints(v) -> dict[int, str]:
    """``{step (int): checkpoint directory}``."""
    if not isinstance(v, Mapping):
        raise ArgumentError(f"checkpoints must be a dict {{step (int): checkpoint directory}}; got {_got(v)}")
    if any(isinstance(d, Mapping) or hasattr(d, "get_tensor") for d in v.values()):
        raise ArgumentError("checkpoints must map steps to checkpoint directories; for state dicts in memory "
                            "use relex_kernels.extrapolate_state_dict")
    out = {}
    for k, d in v.items():
        if not is_int(k):
            raise ArgumentError(f"checkpoints: step {k!r} is a {type(k).__name__}; steps are ints, "
                                "e.g. {10: 'run/checkpoint-10'}")
        out[int(k)] = path(f"checkpoints[{int(k)}]", d)
    return out


def steps(name: str, v) -> list[int]:
    """A list (any iterable but a string or dict) of int steps; ``name`` says which."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        hint = f" (e.g. [{v}])" if is_int(v) else ""
        raise ArgumentError(f"{name} must be a list of int steps{hint}; got {_got(v)}")
    items = list(v)
    for t in items:
        if not is_int(t):
            raise ArgumentError(f"{name}: step {t!r} is a {type(t).__name__}; steps are ints")
    return [int(t) for t in items]


def targets(v) -> list[int]:
    """A list (any iterable but a string or dict) of int target steps."""
    return steps("targets", v)


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ArgumentError(f"{name} must be True or False; got {_got(v)}")
    return v


def size(name: str, v, optional: bool = False) -> int | None:
    """A byte count: an int >= 1 (``None`` too when ``optional``); see :func:`~.run.parse_size` for '4G'."""
    if v is None and optional:
        return None
    if not is_int(v) or v < 1:
        raise ArgumentError(f"{name} must be a number of bytes (an int >= 1{', or None' if optional else ''}; "
                            f"relex_kernels.engine.parse_size('4G') reads sizes); got {_got(v)}")
    return int(v)


def options(v) -> FitOptions:
    """A :class:`~relex_kernels.fit.FitOptions` whose fields have their types (values: ``fit.validate``)."""
    if not isinstance(v, FitOptions):
        raise ArgumentError(f"opts must be a relex_kernels.FitOptions; got {_got(v)}")
    bad = wrong_option(v)
    if bad is not None:
        raise ArgumentError(f"opts: FitOptions.{bad[0]} must be {bad[1]}; got {_got(getattr(v, bad[0]))}")
    return v


def resources(*, memory_budget, backend, overwrite, shard_bytes, progress, resume, device_memory_budget) -> None:
    """The keyword arguments :func:`~.run.extrapolate` and :func:`~.run.predict` share."""
    size("memory_budget", memory_budget, optional=True)
    size("device_memory_budget", device_memory_budget, optional=True)
    size("shard_bytes", shard_bytes)
    if backend is not None and not isinstance(backend, str):
        raise ArgumentError(f"backend must be a backend name (str) or None; got {_got(backend)}")
    for name, v in (("overwrite", overwrite), ("progress", progress), ("resume", resume)):
        flag(name, v)
