"""Saved fits: everything ``relex predict`` needs to write a new target with no Gram.

A fit file is a safetensors file (so our own validating reader reads it): per tensor
``<name>::u`` (T x r' float64, the kept eigenvectors) and ``<name>::sv`` (all T
singular values), and in the metadata key ``relex_fit`` a JSON document with the
options, the steps, the input paths and their fingerprint (size, mtime and header
hash of every file). A fit whose fingerprint no longer matches the files is refused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FormatError, InputError, RelexError
from ..fit import Components, FitOptions
from .reader import SafetensorsFile
from .writer import ShardedWriter, TensorSpec

FIT_VERSION = 1
_KEY = "relex_fit"


def save(path: str, meta: dict, comps: dict[str, Components]) -> None:
    """Write atomically: the file appears complete or not at all."""
    tensors = {}
    for name, c in comps.items():
        tensors[f"{name}::u"] = ("F64", np.ascontiguousarray(c.u, dtype=np.float64))
        tensors[f"{name}::sv"] = ("F64", np.ascontiguousarray(c.singular_values, dtype=np.float64))
    doc = dict(meta, version=FIT_VERSION,
               explained_variance={n: c.explained_variance for n, c in comps.items()})
    directory = os.path.dirname(os.path.abspath(path))
    tmpdir = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    os.makedirs(tmpdir, exist_ok=True)
    try:
        specs = [TensorSpec(n, dt, tuple(a.shape)) for n, (dt, a) in tensors.items()]
        w = ShardedWriter(tmpdir, specs, max_shard_bytes=1 << 62, metadata={_KEY: json.dumps(doc)})
        for n, (dt, a) in tensors.items():
            if a.size:
                w.view(n)[...] = a.reshape(-1)
        w.close()
        os.replace(os.path.join(tmpdir, "model.safetensors"), path)
    finally:
        for f in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, f))
        os.rmdir(tmpdir)


def load(path: str) -> tuple[dict, dict[str, Components]]:
    """(meta, {tensor: Components}); raises FormatError for anything that is not a valid fit."""
    try:
        f = SafetensorsFile(path)
    except FormatError as e:  # (a fit is a safetensors file: anything else is not a fit)
        if not os.path.isfile(path):
            raise
        raise FormatError(f"{path}: not a relex fit file (those 'relex extrapolate --save-fit' writes): "
                          f"{str(e).removeprefix(f'{path}: ')}") from None
    try:
        raw = f.metadata.get(_KEY)
        if raw is None:
            raise FormatError(f"{path}: not a relex fit file (no '{_KEY}' metadata)")
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{path}: the fit's metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("version") != FIT_VERSION:
            raise FormatError(f"{path}: unsupported fit version {meta.get('version') if isinstance(meta, dict) else None!r}")
        try:
            _check_meta(path, meta)
            T = len(meta["steps"])
            ev = meta["explained_variance"]
            comps = {}
            for name in meta["fitted"]:
                u = np.array(f.view(f"{name}::u"), dtype=np.float64).reshape(f.tensors[f"{name}::u"].shape)
                sv = np.array(f.view(f"{name}::sv"), dtype=np.float64)
                if u.ndim != 2 or u.shape[0] != T or sv.shape != (T,):
                    raise FormatError(f"{path}: tensor {name} has a fit of the wrong shape")
                # a damaged fit must not turn into a silently wrong model: u orthonormal, sv >= 0
                if (not np.isfinite(u).all() or not np.isfinite(sv).all() or (sv < 0).any()
                        or np.abs(u.T @ u - np.eye(u.shape[1])).max(initial=0.0) > 1e-6):
                    raise FormatError(f"{path}: the fit of tensor {name} is corrupted (not orthonormal "
                                      "or not finite)")
                comps[name] = Components(u=u, s=sv[:u.shape[1]], singular_values=sv,
                                         explained_variance=float(ev[name]))
        except RelexError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise FormatError(f"{path}: the fit file is incomplete or corrupted ({type(e).__name__}: {e})") from None
        return meta, comps
    finally:
        f.close()


def _check_meta(path: str, meta: dict) -> None:
    """Types and consistency of a fit's JSON document (it is user-editable text)."""
    from .. import fit as fitmath

    steps = meta["steps"]
    if not isinstance(steps, list) or not all(type(s) is int for s in steps):
        raise TypeError("'steps' is not a list of integers")
    opts = meta["options"]
    if not isinstance(opts, dict):
        raise TypeError("'options' is not an object")
    fo = FitOptions(**opts)
    bad = fitmath.wrong_option(fo)
    if bad is not None:
        raise TypeError(f"option {bad[0]!r} has the wrong type (must be {bad[1]})")
    try:
        fitmath.validate(fo, steps)
    except RelexError as e:
        raise ValueError(f"its options do not fit its steps: {e}") from None
    if not isinstance(meta["base"], str):
        raise TypeError("'base' is not a path")
    ck = meta["checkpoints"]
    if not isinstance(ck, dict) or sorted(int(k) for k in ck) != steps or \
            not all(isinstance(v, str) for v in ck.values()):
        raise ValueError("'checkpoints' does not map its steps to paths")
    fp = meta["fingerprint"]
    files = list(fp["base"]) + [e for v in fp["checkpoints"].values() for e in v]
    for e in files:
        if not (isinstance(e["path"], str) and type(e["size"]) is int and type(e["mtime_ns"]) is int
                and isinstance(e["header_sha256"], str)):
            raise TypeError("'fingerprint' entries are malformed")
    if not isinstance(meta["fitted"], list) or not all(isinstance(n, str) for n in meta["fitted"]):
        raise TypeError("'fitted' is not a list of tensor names")
    if not isinstance(meta["explained_variance"], dict):
        raise TypeError("'explained_variance' is not an object")


def check_fingerprint(path: str, saved: dict, current: dict) -> None:
    """Refuse a fit whose input files changed since it was made."""
    def flat(fp):
        out = {}
        for e in fp["base"]:
            out[e["path"]] = e
        for files in fp["checkpoints"].values():
            for e in files:
                out[e["path"]] = e
        return out

    a, b = flat(saved), flat(current)
    for p, e in a.items():
        now = b.get(p)
        if now is None:
            raise InputError(f"fit {path} was made from {p}, which is no longer part of the inputs")
        for key in ("size", "mtime_ns", "header_sha256"):
            if e[key] != now[key]:
                raise InputError(f"fit {path} does not match {p} on disk ({key} changed since the fit "
                                 "was saved); run 'relex extrapolate --save-fit' again")
    extra = sorted(set(b) - set(a))
    if extra:
        raise InputError(f"fit {path} does not cover {extra[0]}, which the inputs now hold")
