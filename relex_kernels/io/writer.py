"""Writing safetensors checkpoints in place.

The layout (shards, headers, offsets) is planned from names, dtypes and shapes
before any value exists; every file is then created at its final size with its
space reserved up front (``posix_fallocate``), so a full disk is a clean
``OSError`` at creation and never a SIGBUS halfway through a mapped write.
Large outputs are written in chunks: a kernel writes into a staged buffer
(:meth:`ShardedWriter.stage`) that a writer thread writes to the file around the
page cache (:mod:`.direct`). Small tensors, written many at a time by addresses,
go through writable memory maps (:meth:`ShardedWriter.view`, :meth:`_OutFile.buffer`);
each finished range is released (its write-back started) so dirty pages never pile up
in our RSS. :meth:`ShardedWriter.sync` makes what was written durable, both ways.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from math import prod

import numpy as np

from . import dtypes
from .direct import Target, WriteQueue, chunk_cuts
from .checkpoint import INDEX_NAME, SINGLE_NAME

DEFAULT_SHARD_BYTES = 5 * 1000**3
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    # a plain attribute, computed once: asked for per tensor by the planner, the writer and each
    # group (thousands; a functools.cached_property takes a lock at each first access)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", prod(self.shape) * dtypes.itemsize(self.dtype))


def merged_spans(spans) -> list[tuple[int, int]]:
    """Byte ranges ``[lo, hi)`` of a file, sorted and merged where they touch or overlap; empty
    ones dropped (what a rank or a writer thread wrote, released or read back once per run)."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    obj: dict = {"__metadata__": dict(metadata)}
    offsets = {}
    pos = 0
    for s in specs:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # keep the data buffer 8-byte aligned
    return raw, offsets


class _OutFile:
    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str], reuse: bool = False):
        self.path = path
        self._target: Target | None = None
        raw, rel = _header(specs, metadata)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + sum(s.nbytes for s in specs)
        self.offsets = {k: v + self.data_start for k, v in rel.items()}
        self.specs = {s.name: s for s in specs}
        self._mm = None
        self._fd = None
        head = struct.pack("<Q", len(raw)) + raw
        if reuse:  # a resumed run: the file must be exactly the one this plan creates
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != self.size or os.pread(fd, len(head), 0) != head:
                os.close(fd)
                raise FileExistsError(f"{path} does not have the planned layout")
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if not reuse:
                os.posix_fallocate(fd, 0, self.size)
                os.pwrite(fd, head, 0)
            self._mm = mmap.mmap(fd, self.size, access=mmap.ACCESS_WRITE) if self.size else None
            # (a file of fp16 outputs through the page cache: check_f16_range reads them back)
            self._target = Target(path, fd, cached=any(s.dtype == "F16" for s in specs))
        except BaseException:
            if self._mm is not None:
                self._mm.close()
            os.close(fd)
            raise
        self._fd = fd  # kept for write-back hints and syncs of pages no longer mapped

    def at(self, name: str, start: int) -> int:
        """The file offset of element ``start`` of tensor ``name``."""
        return self.offsets[name] + start * dtypes.itemsize(self.specs[name].dtype)

    def view(self, name: str, start: int, stop: int) -> np.ndarray:
        s = self.specs[name]
        isz = dtypes.itemsize(s.dtype)
        return np.frombuffer(self._mm, dtype=dtypes.raw_numpy(s.dtype), count=stop - start,
                             offset=self.offsets[name] + start * isz)

    def release(self, name: str, start: int, stop: int) -> None:
        self.release_bytes(self.at(name, start), self.at(name, stop))

    def release_bytes(self, b: int, end: int) -> None:
        """:meth:`release` of the file bytes ``[b, end)`` (several tensors at once)."""
        lo = b - b % _PAGE
        hi = min(end, self.size)
        if hi > lo:
            # Dropping a shared mapping's pages keeps their data: dirty pages stay in the
            # page cache. The fadvise starts their write-back now, in the background, so
            # the disk works while the next tensor computes (an msync here would wait for it).
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            os.posix_fadvise(self._fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def buffer(self) -> np.ndarray:
        """The whole mapped file as writable uint8 (the engine's grouped passes take addresses from it)."""
        return np.frombuffer(self._mm, dtype=np.uint8)

    def sync(self) -> None:
        """Make everything written so far durable (mapped or already released; the staged writes
        must be done: :meth:`ShardedWriter.sync` waits for them)."""
        if self._mm is not None:
            self._mm.flush()
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self, sync: bool) -> None:
        if sync:
            self.sync()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
        if self._target is not None:
            self._target.close()
            self._target = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedWriter:
    """A checkpoint being written into ``directory`` (which must exist and be private to us).

    ``specs`` gives the tensors in file order. Large ranges are written by :meth:`chunks`,
    :meth:`stage` and :meth:`commit` (or :meth:`write` from any array); views are writable
    raw-dtype numpy arrays over memory maps. Call :meth:`close` (``sync=True``) once every
    tensor is complete. ``reuse``: open the files a previous writer with the same arguments
    created (a resumed run) instead of creating them; any difference in size or header raises
    ``FileExistsError``.
    """

    def __init__(self, directory: str, specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, reuse: bool = False):
        self.directory = directory
        meta = {"format": "pt", **(metadata or {})}
        groups = plan_shards(specs, max_shard_bytes)
        names = shard_names(len(groups))
        self.files: list[_OutFile] = []
        self._where: dict[str, _OutFile] = {}
        self.writes = WriteQueue()
        try:
            for fname, group in zip(names, groups):
                f = _OutFile(os.path.join(directory, fname), group, meta, reuse)
                self.files.append(f)
                for s in group:
                    self._where[s.name] = f
        except BaseException:
            self.close(sync=False)
            raise
        self.weight_map = {s.name: os.path.basename(f.path) for f in self.files for s in f.specs.values()}
        self.total_size = sum(s.nbytes for s in specs)

    def chunks(self, name: str, start: int, stop: int) -> list[tuple[int, int]]:
        """Elements ``[start, stop)`` of ``name`` in the pieces :meth:`stage` takes: at most a staging
        buffer each, cut where this writer's file offset is block-aligned. (Another writer's data
        may start elsewhere, its header being longer: the same pieces are as right for it, each
        with a partial block at its ends.)"""
        f = self._where[name]
        isz = dtypes.itemsize(f.specs[name].dtype)
        at = f.at(name, start)
        return [(start + s // isz, start + e // isz)
                for s, e in chunk_cuts(at, (stop - start) * isz, self.writes.chunk_bytes, isz)]

    def stage(self, name: str, start: int, stop: int) -> np.ndarray:
        """A writable raw-dtype array for elements ``[start, stop)`` of ``name`` (a piece of
        :meth:`chunks`), to fill and hand to :meth:`commit` (or :meth:`discard`)."""
        f = self._where[name]
        dt = f.specs[name].dtype
        return self.writes.stage(f.at(name, start), (stop - start) * dtypes.itemsize(dt), dtypes.raw_numpy(dt))

    def commit(self, name: str, start: int, arr: np.ndarray) -> None:
        """Queue the staged ``arr`` as elements ``[start, start + len(arr))`` of ``name``."""
        f = self._where[name]
        self.writes.commit(f._target, f.at(name, start), arr)

    def stage_bytes(self, at: int, nbytes: int) -> np.ndarray:
        """:meth:`stage` of the bytes ``[at, at + nbytes)`` of a file (several whole tensors that lie
        back to back: a group's outputs), as uint8; :meth:`commit_bytes` names the file."""
        return self.writes.stage(at, nbytes, np.uint8)

    def commit_bytes(self, f: _OutFile, at: int, arr: np.ndarray) -> None:
        self.writes.commit(f._target, at, arr)

    def write_pieces(self, f: _OutFile, pieces) -> None:
        """Write raw bytes ``pieces`` (``(at, data)``) of ``f``, neighbours in shared staged buffers (a
        device's pinned downloads of a group)."""
        pieces = list(pieces)
        for at, data in pieces:
            if not f.data_start <= at <= at + data.nbytes <= f.size:
                raise ValueError(f"{f.path}: bytes [{at}, {at + data.nbytes}) outside its data "
                                 f"[{f.data_start}, {f.size})")
        self.writes.write_pieces(f._target, pieces)

    def discard(self, arr: np.ndarray) -> None:
        self.writes.discard(arr)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write the raw elements ``data`` at element ``start`` of ``name`` (copied through staging)."""
        f = self._where[name]
        n, isz = prod(f.specs[name].shape), dtypes.itemsize(f.specs[name].dtype)
        if data.itemsize != isz:
            raise ValueError(f"{name}: {data.dtype} elements are not {f.specs[name].dtype} ones")
        if not 0 <= start <= start + data.size <= n:
            raise ValueError(f"{name}: elements [{start}, {start + data.size}) outside its {n}")
        self.writes.write(f._target, f.at(name, start), data)

    def drain(self) -> None:
        """Wait for every staged write (raises the first error one met)."""
        self.writes.drain()

    def view(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        self.writes.drain()  # a view sees every staged write before it
        f = self._where[name]
        stop = prod(f.specs[name].shape) if stop is None else stop
        return f.view(name, start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        f = self._where[name]
        stop = prod(f.specs[name].shape) if stop is None else stop
        f.release(name, start, stop)

    def locate(self, name: str) -> tuple[_OutFile, int]:
        """The file holding tensor ``name`` and the tensor's byte offset in it."""
        f = self._where[name]
        return f, f.offsets[name]

    def sync(self) -> None:
        """Make every byte written so far durable (the run journal's records follow this)."""
        self.writes.drain()
        for f in self.files:
            f.sync()

    def close(self, sync: bool = True, index: bool = True) -> None:
        """Close every file (``sync``: durable first); ``index``: then write the shard index (an
        SPMD rank other than 0 leaves it to rank 0). Every file is closed even when one fails."""
        err = None
        try:
            if sync:
                self.writes.drain()
        except BaseException as e:
            err = e
        self.writes.close()  # the staged writes are done (or failed) before their files close
        for f in self.files:
            try:
                f.close(sync and err is None)
            except BaseException as e:
                err = err or e
        if err is not None:
            raise err
        if sync and index and len(self.files) > 1:
            with open(os.path.join(self.directory, INDEX_NAME), "w") as fh:
                fh.write(index_text(self.total_size, self.weight_map))
                fh.flush()
                os.fsync(fh.fileno())


def index_text(total_size: int, weight_map: dict[str, str]) -> str:
    """``model.safetensors.index.json``'s text: ``json.dumps(doc, indent=2)`` and a newline, byte for
    byte, with the names written by json's C string encoder (Python's indenting encoder took ~20 ms
    for a MoE model's thousands of names)."""
    enc = json.encoder.encode_basestring_ascii  # json.dumps's (ensure_ascii)
    entries = ",\n".join(map("    {}: {}".format, map(enc, weight_map), map(enc, weight_map.values())))
    return ('{\n  "metadata": {\n    "total_size": %d\n  },\n  "weight_map": %s\n}\n'
            % (total_size, "{\n" + entries + "\n  }" if weight_map else "{}"))


def write_checkpoint(directory: str, tensors: dict[str, tuple[str, np.ndarray]],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``{name: (dtype, raw array)}`` as a checkpoint (small inputs: tests, the generator)."""
    write_tensors(directory, [TensorSpec(n, dt, tuple(a.shape)) for n, (dt, a) in tensors.items()],
                  ((n, a) for n, (_, a) in tensors.items()), max_shard_bytes)


def write_tensors(directory: str, specs: list[TensorSpec], arrays, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a checkpoint of ``specs``, each tensor's values taken from ``arrays`` ((name, array) in
    the specs' order, e.g. a generator making one at a time) as it is written."""
    dts = {s.name: s.dtype for s in specs}
    w = ShardedWriter(directory, specs, max_shard_bytes)
    try:
        for n, a in arrays:
            if a.size:
                w.view(n)[...] = np.ascontiguousarray(a, dtype=dtypes.raw_numpy(dts[n])).reshape(-1)
                w.release(n)
    except BaseException:
        w.close(sync=False)
        raise
    w.close()
