"""Whole predictions from tensors in memory: one tensor, or a state dict streamed tensor by tensor."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .. import fit as fitmath
from ..engine import apicheck
from ..engine.trajectory import EMBED_NAMES, HEAD_NAMES
from ..errors import ArgumentError, InputError, RelexError, ShapeError
from ..fit import FitOptions
from ._tensors import DTYPE_NAMES, check_versions
from .fitting import Fit
from .kernels import combine_separate, gram

__all__ = ["extrapolate_tensor", "extrapolate_state_dict"]


def extrapolate_tensor(base, history, steps, targets, options: FitOptions = FitOptions(), *,
                       backend: str | None = None) -> list[torch.Tensor]:
    """Predict one tensor at each target step from ``base`` and its versions at history ``steps``.

    The same bytes as ``relex extrapolate`` writes for this tensor (same backend): the Gram
    (:func:`gram`), the fit (:class:`Fit`), the weighted sums (:func:`combine`). Returns one
    tensor per target, of base's dtype, shape and device.
    """
    steps = apicheck.steps("steps", steps)
    targets = apicheck.targets(targets)
    options = apicheck.options(options)
    return _predict(base, history, steps, fitmath.target_weights(options, steps, targets), options, backend)


def _predict(base, history, steps: list[int], W: np.ndarray, options: FitOptions, backend) -> list[torch.Tensor]:
    """:func:`extrapolate_tensor` with the targets' weights ``W`` (K, T) already checked and computed."""
    base, history = check_versions(base, history)
    if len(steps) != len(history):
        raise ShapeError(f"{len(history)} history versions but {len(steps)} steps")
    G = gram(base, history, fp16_deltas=options.fp16_deltas, backend=backend)
    fit = Fit.from_gram(G, steps, options, numel=base.numel(), dtype=base.dtype)
    alphas = torch.from_numpy(fitmath.alphas(fit.components, W))
    # each target its own storage: a view of one (K, ...) result would keep (and torch.save would
    # write) all K of them; W passed target_weights' bound (only fp16 outputs need a check)
    return combine_separate(base, history, alphas, fp16_deltas=options.fp16_deltas, backend=backend, bounded=True)


def _lazy(m) -> bool:
    """Whether ``m`` is a lazy handle (``safetensors.safe_open``: ``get_tensor`` loads a tensor)."""
    return hasattr(m, "get_tensor") and hasattr(m, "keys")


def _getter(m, what: str):
    """``name -> tensor`` of a mapping, or of a lazy handle (:func:`_lazy`)."""
    if _lazy(m):
        return m.get_tensor
    if isinstance(m, Mapping) or (hasattr(m, "keys") and hasattr(m, "__getitem__")):
        return m.__getitem__
    raise ArgumentError(f"{what} must be a mapping of name -> tensor (a state dict, or an object with keys() "
                        f"and __getitem__ or get_tensor such as safetensors.safe_open); got {type(m).__name__}")


def _kind(base, get, name: str) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of ``base``'s tensor ``name``: from a lazy handle's header where it has one
    (``safe_open``'s ``get_slice``: nothing read), else from the tensor."""
    if _lazy(base) and hasattr(base, "get_slice"):
        sl = base.get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()
    t = get(name)
    return tuple(t.shape), t.dtype


def _same_kind(pair: tuple[str, str], base, get) -> tuple[str, str]:
    """``pair`` (head, embedding) of ``base``, checked to be of one shape and dtype: the head is
    written as the predicted embedding."""
    (hs, hd), (es, ed) = _kind(base, get, pair[0]), _kind(base, get, pair[1])
    if hs != es or hd != ed:
        raise ArgumentError(f"tied: head {pair[0]} ({hd}, {hs}) and embedding {pair[1]} ({ed}, {es}) differ, "
                            "so they cannot be one tensor")
    return pair


def _tied_pair(base, get, names: list[str], tied) -> tuple[str, str] | None:
    """(head, embedding) written as one tensor, or None. ``tied``: None (auto: the base's head *is*
    its embedding — one storage, as ``model.state_dict()`` of a tied model gives), False, or a pair."""
    if tied is False:
        return None
    if tied is not None and tied is not True:
        if (not isinstance(tied, tuple) or len(tied) != 2 or not all(isinstance(x, str) for x in tied)):
            raise ArgumentError(f"tied must be None, False, or a (head name, embedding name) pair; got {tied!r}")
        missing = [x for x in tied if x not in names]
        if missing:
            raise ArgumentError(f"tied names {missing} are not in the base state dict")
        if tied[0] == tied[1]:
            raise ArgumentError(f"tied names a head and an embedding: two tensors, got {tied[0]!r} twice")
        return _same_kind(tied, base, get)
    if tied is None and _lazy(base):  # (tensors loaded one by one share no storage: never one tensor)
        return None
    for head in HEAD_NAMES:
        for emb in EMBED_NAMES:
            if head in names and emb in names:
                if tied is True:
                    return _same_kind((head, emb), base, get)
                h, e = get(head), get(emb)
                if (isinstance(h, torch.Tensor) and isinstance(e, torch.Tensor) and h.shape == e.shape
                        and h.dtype == e.dtype and h.device == e.device and h.data_ptr() == e.data_ptr()):
                    return head, emb
    if tied is True:
        raise ArgumentError(f"tied=True but the base has no (head, embedding) pair of known names (heads "
                            f"{', '.join(HEAD_NAMES)}; embeddings {', '.join(EMBED_NAMES)}); give "
                            "tied=(head name, embedding name)")
    return None


def extrapolate_state_dict(base, checkpoints, targets, options: FitOptions = FitOptions(), *, tied=None,
                           backend: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Predict a whole state dict at each target step, tensor by tensor.

    ``base``: the state dict the deltas start from; ``checkpoints``: ``{step: state dict}`` of
    the history (steps strictly increasing once sorted). Each may be lazy — any object with
    ``keys()`` and ``__getitem__`` or ``get_tensor`` (``safetensors.safe_open`` handles): only
    one tensor's T+1 versions are held at a time. Float tensors are fitted (the bytes of
    ``relex extrapolate``), others are copied from the base; a head tied to the embedding
    (``tied``: None = when the base's head and embedding, under the Hugging Face names of
    :data:`~relex_kernels.engine.trajectory.HEAD_NAMES` and ``EMBED_NAMES``, share storage; True:
    that pair by name; or a ``(head name, embedding name)`` pair of the same shape and dtype) is
    written as the predicted embedding, the same tensor object in the result. NaN/Inf in an input and fp16
    predictions past ±65504 are errors naming the tensor.

    Returns ``{target: {name: tensor}}`` in the base's key order.
    """
    get_base = _getter(base, "base")
    if not isinstance(checkpoints, Mapping) or not checkpoints:
        raise ArgumentError("checkpoints must be a non-empty mapping {step (int): state dict}")
    steps = sorted(apicheck.steps("checkpoints' steps", list(checkpoints)))
    getters = [_getter(checkpoints[s], f"checkpoints[{s}]") for s in steps]
    keysets = [set(checkpoints[s].keys()) for s in steps]
    targets = apicheck.targets(targets)
    options = apicheck.options(options)
    W = fitmath.target_weights(options, steps, targets)  # once for every tensor
    names = list(base.keys())
    pair = _tied_pair(base, get_base, names, tied)
    out: dict[int, dict[str, torch.Tensor]] = {t: {} for t in targets}
    for name in names:
        if pair is not None and name == pair[0]:
            continue  # written with its embedding
        x = get_base(name)
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(f"base[{name!r}] is a {type(x).__name__}, not a tensor")
        if x.dtype not in DTYPE_NAMES:  # integer / bool buffers: unchanged
            for t in targets:
                out[t][name] = x.detach().clone()
            continue
        for s, keys in zip(steps, keysets):
            if name not in keys:
                raise InputError(f"tensor {name}: missing from the checkpoint of step {s}")
        try:
            preds = _predict(x, [g(name) for g in getters], steps, W, options, backend)
        except RelexError as e:
            raise type(e)(f"tensor {name}: {e}") from None
        for t, p in zip(targets, preds):
            out[t][name] = p
    if pair is not None:
        for t in targets:
            out[t] = {n: (out[t][pair[1]] if n == pair[0] else out[t][n]) for n in names}
    return out
