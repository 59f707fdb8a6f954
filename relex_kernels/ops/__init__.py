"""The op layer: ``gram`` and ``combine`` with one reference and pluggable backends.

Every backend module exposes the same functions as :mod:`.reference` (see its
docstring for the exact contract) plus ``available() -> (bool, reason)``,
``supports(dtype) -> bool`` and ``identity() -> str`` (:attr:`Backend.identity`).
Backends are imported lazily so that a missing compiler output, GPU or Triton never breaks ``import relex_kernels``.

Choice (:func:`resolve_backend`, the one dispatcher of every run): ``auto`` (default, or
the ``RELEX_BACKEND`` environment variable) takes a device backend when an NVIDIA GPU is
present, else the fastest available CPU backend, and silently falls back; a backend
named explicitly that is not available is a :class:`~relex_kernels.errors.BackendError`
that says why. Device backends (``cuda``, ``triton``) also expose
``device_kernels()``, the packed-block ops the device pipeline (``engine/gpu.py``) runs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

from ..errors import BackendError
from . import reference

#: name -> module (relative to this package), fastest first for ``auto`` on a CPU.
_CPU_BACKENDS = {"cpu": ".native", "reference": ".reference"}
#: device backends: the device pipeline (engine/gpu.py) runs their ``device_kernels()``
_DEVICE_BACKENDS = {"cuda": ".cuda", "triton": ".triton"}
DEVICE_BACKENDS = tuple(_DEVICE_BACKENDS)
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType

    def supports(self, dtype: str) -> bool:
        return self.module.supports(dtype)

    @property
    def gram(self):
        return self.module.gram

    @property
    def combine(self):
        return self.module.combine

    @property
    def identity(self) -> str:
        """The kernel that sums the Gram: backend plus what orders its fp32 sums (SIMD path or
        BLAS core, Gram precision, device). Output bits depend on it, so the journal key and
        ``relex_report.json`` carry it and SPMD ranks must agree on it."""
        return self.module.identity()


def _probe(name: str) -> tuple[ModuleType | None, str]:
    rel = _CPU_BACKENDS.get(name) or _DEVICE_BACKENDS.get(name)
    if rel is None:
        return None, f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})"
    try:
        mod = importlib.import_module(rel, __name__)
    except ImportError as e:
        return None, f"cannot import {rel.lstrip('.')} backend: {e}"
    ok, why = mod.available()
    return (mod if ok else None), why


def availability() -> dict[str, tuple[bool, str]]:
    """Every backend with (available, reason) — what ``python -m relex_kernels`` prints."""
    out = {}
    for name in list(_CPU_BACKENDS) + list(_DEVICE_BACKENDS):
        mod, why = _probe(name)
        out[name] = (mod is not None, why)
    return out


def get_backend(name: str | None = None) -> Backend:
    """The CPU op backend for ``name`` (``None``: ``$RELEX_BACKEND`` or ``auto``)."""
    name = name or os.environ.get("RELEX_BACKEND") or "auto"
    if name == "auto":
        for cand in _CPU_BACKENDS:
            mod, _ = _probe(cand)
            if mod is not None:
                return Backend(cand, mod)
        return Backend("reference", reference)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    mod, why = _probe(name)
    if mod is None:
        raise BackendError(f"backend {name!r} is not available: {why}")
    return Backend(name, mod)


def resolve_backend(name: str | None = None) -> Backend:
    """The backend a run uses: :func:`get_backend`, except that ``auto`` takes a device backend
    when an NVIDIA GPU is present (a cheap look: no torch import on machines without one)."""
    name = name or os.environ.get("RELEX_BACKEND") or "auto"
    if name == "auto":
        from .cuda import gpu_present
        if gpu_present():
            for cand in DEVICE_BACKENDS:
                try:
                    return get_backend(cand)
                except BackendError:
                    pass
    return get_backend(name)
