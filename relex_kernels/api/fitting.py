""":class:`Fit`: one tensor's RELEX fit — its temporal components and the weights of any target step."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .. import fit as fitmath
from ..engine import apicheck
from ..errors import ArgumentError, FormatError, NonFiniteError, ShapeError
from ..fit import Components, FitOptions

__all__ = ["Fit"]

_FORMAT = "relex-tensor-fit/1"


@dataclass(frozen=True)
class Fit:
    """The fit of one tensor from its Gram: ``Fit.from_gram(G, steps, options)``.

    ``alphas(targets)`` gives the (K, T) float64 weights that :func:`~relex_kernels.combine`
    turns into the predictions (it rounds them to fp32 as the engine does).
    """

    steps: tuple[int, ...]
    options: FitOptions
    components: Components
    numel: int | None = None
    dtype: str | None = None

    @classmethod
    def from_gram(cls, G, steps, options: FitOptions = FitOptions(), *, numel: int | None = None,
                  dtype: str | torch.dtype | None = None) -> Fit:
        """Fit from a Gram over history ``steps`` (strictly increasing, one per row of G).

        ``numel`` and ``dtype`` (of the tensor the Gram sums) set the drop rule of minor
        components exactly as the engine does; without them it assumes a full chunk in fp32.
        """
        options = apicheck.options(options)
        steps = [int(s) for s in apicheck.steps("steps", steps)]
        fitmath.validate(options, steps)
        if isinstance(G, torch.Tensor):
            G = G.detach().to("cpu", torch.float64).numpy()
        G = np.asarray(G, dtype=np.float64)
        T = len(steps)
        if G.shape != (T, T):
            raise ShapeError(f"G must be ({T}, {T}) for {T} history steps, got {G.shape}")
        if not np.isfinite(G).all():
            raise NonFiniteError("G holds NaN/Inf (an input of its tensor did)")
        if isinstance(dtype, torch.dtype):
            from ._tensors import DTYPE_NAMES
            dtype = DTYPE_NAMES.get(dtype)
        comp = fitmath.components(G, options.rank, numel, dtype)
        return cls(tuple(steps), options, comp, numel, dtype)

    @property
    def explained_variance(self) -> float:
        """Share of the Gram's trace the kept components explain (rank 1: the path's straightness)."""
        return self.components.explained_variance

    @property
    def singular_values(self) -> np.ndarray:
        return self.components.singular_values

    def alphas(self, targets) -> torch.Tensor:
        """(K, T) float64 weights of the targets (an int, or a sequence of K ints)."""
        one = isinstance(targets, (int, np.integer)) and not isinstance(targets, bool)
        targets = [targets] if one else list(apicheck.targets(targets))
        W = fitmath.target_weights(self.options, list(self.steps), [int(t) for t in targets])
        return torch.from_numpy(fitmath.alphas(self.components, W))

    # -- a file of its own ----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write this fit to ``path`` (numpy ``.npz``; exactly what :meth:`load` reads back)."""
        meta = {"format": _FORMAT, "steps": list(self.steps), "options": self.options.to_dict(),
                "numel": self.numel, "dtype": self.dtype,
                "explained_variance": self.components.explained_variance}
        with open(path, "wb") as fh:
            np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), u=self.components.u,
                     s=self.components.s, singular_values=self.components.singular_values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fit:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                u, s, sv = z["u"], z["s"], z["singular_values"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise FormatError(f"{path}: not a relex tensor fit ({e})") from None
        if meta.get("format") != _FORMAT:
            raise FormatError(f"{path}: not a relex tensor fit (format {meta.get('format')!r})")
        T = len(meta["steps"])
        if u.ndim != 2 or u.shape[0] != T or s.shape != (u.shape[1],) or sv.shape != (T,):
            raise FormatError(f"{path}: arrays do not match {T} steps")
        try:
            options = FitOptions(**meta["options"])
        except TypeError as e:
            raise FormatError(f"{path}: bad options ({e})") from None
        comp = Components(u=u, s=s, singular_values=sv, explained_variance=float(meta["explained_variance"]))
        return cls(tuple(int(x) for x in meta["steps"]), options, comp, meta.get("numel"), meta.get("dtype"))

    def __post_init__(self):
        if not isinstance(self.components, Components):
            raise ArgumentError("Fit.components must be a relex_kernels.fit.Components; use Fit.from_gram")
