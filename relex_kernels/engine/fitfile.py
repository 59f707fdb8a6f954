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
from ..io.reader import SafetensorsFile
from ..io.writer import ShardedWriter, TensorSpec

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
    f = SafetensorsFile(path)
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
            T = len(meta["steps"])
            ev = meta["explained_variance"]
            comps = {}
            for name in meta["fitted"]:
                u = np.array(f.view(f"{name}::u"), dtype=np.float64).reshape(f.tensors[f"{name}::u"].shape)
                sv = np.array(f.view(f"{name}::sv"), dtype=np.float64)
                if u.ndim != 2 or u.shape[0] != T or sv.shape != (T,):
                    raise FormatError(f"{path}: tensor {name} has a fit of the wrong shape")
                comps[name] = Components(u=u, s=sv[:u.shape[1]], singular_values=sv,
                                         explained_variance=float(ev[name]))
            FitOptions(**meta["options"])
        except RelexError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: the fit file is incomplete or corrupted ({type(e).__name__}: {e})") from None
        return meta, comps
    finally:
        f.close()


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
