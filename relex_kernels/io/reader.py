"""A validating safetensors reader over read-only memory maps.

Tensor data is never copied: :meth:`SafetensorsFile.view` returns a numpy view of
the mapped bytes. Pages that were touched count in the process RSS until they are
released, so the engine calls :meth:`SafetensorsFile.release` on every range it is
done with (the pages stay in the page cache; only our mapping lets go of them).

Every header field is checked before any byte of data is trusted (SPEC §5).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from math import prod

import numpy as np

from ..errors import FormatError
from . import dtypes

MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``begin`` is an absolute file offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, data_size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON bytes against a data buffer of ``data_size`` bytes.

    Returns ``(tensors, metadata)`` with offsets relative to the data buffer. Raises
    :class:`FormatError` naming ``path`` for any inconsistency.
    """
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, e in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise FormatError(f"{where}: entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dt, str) or not dtypes.known(dt):
            raise FormatError(f"{where}: unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs)):
            raise FormatError(f"{where}: data_offsets {offs!r} is not a pair of integers")
        b, end = offs
        if not 0 <= b <= end <= data_size:
            raise FormatError(f"{where}: data_offsets [{b}, {end}] lie outside the data buffer "
                              f"of {data_size} bytes (file truncated?)")
        want = prod(shape) * dtypes.itemsize(dt)
        if end - b != want:
            raise FormatError(f"{where}: holds {end - b} bytes but shape {shape} x {dt} needs {want}")
        tensors[name] = TensorInfo(name, dt, tuple(shape), b, end - b)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer")
    return tensors, meta


class SafetensorsFile:
    """One ``.safetensors`` file, validated and mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm = None
        try:
            # O_NONBLOCK: a FIFO in place of a file must be an error, not a hang
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{self.path}: is not a regular file")
            self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            if self.size < 8:
                raise FormatError(f"{self.path}: {self.size} bytes is too short for a safetensors file")
            n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
            if n > MAX_HEADER:
                raise FormatError(f"{self.path}: header length {n} exceeds the 100 MB limit")
            if 8 + n > self.size:
                raise FormatError(f"{self.path}: header length {n} runs past the end of the "
                                  f"{self.size}-byte file (truncated?)")
            raw = os.pread(fd, n, 8)
            if len(raw) != n:
                raise FormatError(f"{self.path}: short read of the header")
            self.header_sha256 = hashlib.sha256(raw).hexdigest()
            self.data_start = 8 + n
            rel, self.metadata = parse_header(raw, self.size - self.data_start, self.path)
            self.tensors = {k: TensorInfo(t.name, t.dtype, t.shape, t.begin + self.data_start, t.nbytes)
                            for k, t in rel.items()}
            self._mm = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        finally:
            os.close(fd)

    def view(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Zero-copy 1-D view of elements ``[start, stop)`` of tensor ``name`` (raw dtype)."""
        t = self.tensors[name]
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:  # never a byte of a neighbour, never past the file
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        isz = dtypes.itemsize(t.dtype)
        return np.frombuffer(self._mm, dtype=dtypes.raw_numpy(t.dtype), count=stop - start,
                             offset=t.begin + start * isz)

    def _advise(self, advice: int, begin: int, nbytes: int) -> None:
        if nbytes <= 0 or self._mm is None:
            return
        lo = begin - begin % _PAGE
        hi = min(begin + nbytes, self.size)
        try:
            self._mm.madvise(advice, lo, hi - lo)
        except (OSError, ValueError):
            pass  # advice only: never fatal

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop our mapping's pages of a tensor element range (they stay in the page cache).

        The range is widened to whole pages; a neighbour's page dropped that way is
        harmless: its next access maps it again from the page cache.
        """
        t = self.tensors[name]
        isz = dtypes.itemsize(t.dtype)
        stop = t.numel if stop is None else stop
        b = t.begin + start * isz
        self._advise(mmap.MADV_DONTNEED, b, (stop - start) * isz)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading a range ahead of use (overlaps I/O with compute)."""
        t = self.tensors[name]
        isz = dtypes.itemsize(t.dtype)
        stop = t.numel if stop is None else stop
        self._advise(mmap.MADV_WILLNEED, t.begin + start * isz, (stop - start) * isz)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view is still alive; the map goes with it
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
