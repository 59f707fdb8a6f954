"""Tensors assembled from pieces in several files (FSDP rank files, DCP chunks), read by element range.

:class:`AssembledTensors` has the reading interface of :class:`~.reader.MappedFile` (``view``,
``release``, ``prefetch`` by tensor element range) over ``segments``: per tensor, the flat
element ranges ``[s0, s1)`` that each piece (a contiguous tensor ``local`` of a mapped file)
holds. A range inside one piece is a zero-copy view; a range across pieces is gathered into a
new array (a few chunks per tensor), so a kernel sees the values of the whole tensor, bit for
bit. There is no one address per tensor, so the engine's grouped passes leave these tensors
alone (``groupable`` False).
"""

from __future__ import annotations

import numpy as np

from . import dtypes
from ..errors import FormatError
from .reader import MappedFile, TensorInfo


class AssembledTensors:
    groupable = False
    path: str
    files: list[MappedFile]
    tensors: dict[str, TensorInfo]
    #: name -> [(s0, s1, file, local name)], in element order, covering [0, numel)
    segments: dict[str, list[tuple[int, int, MappedFile, str]]]

    #: names a checkpoint is read under (the base's) -> the names stored here (DCP prefixes)
    alias: dict[str, str] = {}

    def _pieces(self, name: str, a: int, b: int):
        for s0, s1, f, local in self.segments[self.alias.get(name, name)]:
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                yield lo, hi, s0, f, local

    def view(self, name: str, start: int = 0, stop: int | None = None, scratch=None) -> np.ndarray:
        """Elements ``[start, stop)`` of ``name`` (raw dtype): a view of the file that holds them, or
        for a range across pieces a copy — into ``scratch(nbytes)`` when given (a reusable uint8
        buffer of at least ``nbytes``, valid until the caller's next use of it: a fresh array per
        call costs its page faults, ~7x the copy), else into a new array."""
        t = self.tensors[self.alias.get(name, name)]
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        pieces = list(self._pieces(name, start, stop))
        if len(pieces) == 1 and pieces[0][0] == start and pieces[0][1] == stop:
            lo, hi, s0, f, local = pieces[0]
            return f.view(local, lo - s0, hi - s0)
        raw = dtypes.raw_numpy(t.dtype)  # a range across pieces (or empty)
        nbytes = (stop - start) * raw.itemsize
        out = np.empty(stop - start, dtype=raw) if scratch is None else scratch(nbytes)[:nbytes].view(raw)
        for lo, hi, s0, f, local in pieces:
            out[lo - start:hi - start] = f.view(local, lo - s0, hi - s0)
        return out

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``[start, stop)`` into ``out``: each file's piece read with ``preadv``
        (:meth:`MappedFile.read_into`); pieces that are no byte range of one file (columns of
        a ``Shard(d > 0)`` tensor) are gathered from the maps."""
        t = self.tensors[self.alias.get(name, name)]
        if not 0 <= start <= stop <= t.numel:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        pieces = list(self._pieces(name, start, stop))
        if sum(hi - lo for lo, hi, *_ in pieces) != stop - start:  # a gap would leave a recycled buffer's bytes
            raise FormatError(f"{self.path}: tensor {name!r} is not covered by its pieces over [{start}, {stop})")
        if any(f is None for *_, f, _ in pieces):
            np.copyto(out, self.view(name, start, stop))
            self.release(name, start, stop)
            return
        for lo, hi, s0, f, local in pieces:
            f.read_into(local, lo - s0, hi - s0, out[lo - start:hi - start])

    def _local_ranges(self, name: str, a: int, b: int):
        """(file, local name, lo, hi): the element ranges of the files that hold ``[a, b)`` of ``name``."""
        for lo, hi, s0, f, local in self._pieces(name, a, b):
            yield f, local, lo - s0, hi - s0

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        stop = self.tensors[self.alias.get(name, name)].numel if stop is None else stop
        for f, local, lo, hi in self._local_ranges(name, start, stop):
            f.release(local, lo, hi)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        stop = self.tensors[self.alias.get(name, name)].numel if stop is None else stop
        for f, local, lo, hi in self._local_ranges(name, start, stop):
            f.prefetch(local, lo, hi)

    def close(self) -> None:
        for f in self.files:
            f.close()
