"""A validating safetensors reader over read-only memory maps.

Tensor data is never copied: :meth:`SafetensorsFile.view` returns a numpy view of
the mapped bytes. Pages that were touched count in the process RSS until they are
released, so the engine calls :meth:`SafetensorsFile.release` on every range it is
done with (the pages stay in the page cache; only our mapping lets go of them).

A run reads thousands of files (shards x checkpoints), and every map holds a file
descriptor, so only the files in use stay mapped: a header is parsed once, at open,
and the file is mapped on first use and unmapped again when it is among the least
recently used past :func:`max_maps` (never while a view of it is alive). A file
mapped again must be the one first opened (device, inode, size, mtime), so an input
replaced during a run is an error, never a mix of two files.

Every header field is checked before any byte of data is trusted (method §5).
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import resource
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from math import prod

import numpy as np

from ..errors import FormatError
from . import dtypes
from .memo import BoundedCache

MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@lru_cache(maxsize=None)
def readahead_bytes(dev: int) -> int:
    """The most bytes one read-ahead advice reads on the device ``dev`` (a file's ``st_dev``).

    Linux reads at most max(read_ahead_kb, max_sectors_kb) of the range a ``WILLNEED`` advice
    (``posix_fadvise`` or ``madvise``) names, from its start, and drops the rest: a tensor's
    whole span asked for at once was 128 KiB read ahead on a default disk (8 MiB here, of a
    1.2 GB span), the rest read page fault by page fault. Callers ask in pieces of this size.
    From sysfs; 128 KiB, the kernel's default, where it does not say (NFS, FUSE, overlay)."""
    node = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for queue in (f"{node}/queue", f"{node}/../queue"):  # a disk, or a partition's disk
        try:
            kb = []
            for key in ("read_ahead_kb", "max_sectors_kb"):
                with open(f"{queue}/{key}") as fh:
                    kb.append(int(fh.read()))
        except (OSError, ValueError):
            continue
        return max(kb + [4]) << 10
    return 128 << 10
#: buffers per ``preadv`` call at most (Linux's IOV_MAX)
_IOV_MAX = 1024
#: the soft RLIMIT_NOFILE that :func:`raise_nofile_limit` asks for at most
NOFILE_WANTED = 1 << 16


def raise_nofile_limit() -> None:
    """Raise the soft limit on open files toward the hard one (the usual 1024 is low for a run
    over many shards); the map cache below keeps a run within whatever limit it gets."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass  # keep the limit we have


def max_maps() -> int:
    """How many input files stay mapped at once: a quarter of the descriptor limit, 16 to 1024."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = NOFILE_WANTED
    return max(16, min(1024, soft // 4))


class _MapCache:
    """The mapped :class:`SafetensorsFile` s of this process, least recently used first.

    Views are created under ``lock``, so a map is never closed between being handed out
    and being viewed; a map with a live view refuses to close (``BufferError``) and is
    skipped, so the cache may briefly hold more than :func:`max_maps` files in use.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.files: OrderedDict[int, SafetensorsFile] = OrderedDict()

    def used(self, f: SafetensorsFile) -> None:
        self.files[id(f)] = f
        self.files.move_to_end(id(f))

    def discard(self, f: SafetensorsFile) -> None:
        self.files.pop(id(f), None)

    def evict(self, keep: int) -> int:
        """Unmap idle files, oldest first, until at most ``keep`` stay mapped; how many were unmapped."""
        n = 0
        for key, f in list(self.files.items()):
            if len(self.files) <= keep:
                break
            if f._unmap_idle():
                del self.files[key]
                n += 1
        return n


_MAPS = _MapCache()


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
    out = dict(pairs)  # called for every object of a header (thousands): the check is a length compare
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def parse_header(raw: bytes, data_size: int, path: str, offset: int = 0) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON bytes against a data buffer of ``data_size`` bytes.

    Returns ``(tensors, metadata)`` with offsets relative to the data buffer, plus ``offset``
    (the buffer's place in the file). Raises :class:`FormatError` naming ``path`` for any
    inconsistency.
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
    # A MoE header holds thousands of entries of a few (dtype, shape) kinds: each kind is checked
    # once. The key is the shape's repr, which tells JSON's types apart (1, 1.0, True, "1").
    kinds: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {}
    for name, e in obj.items():
        if type(e) is not dict:
            raise FormatError(f"{path}: tensor {name!r}: entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        kind = kinds.get((dt, repr(shape))) if type(dt) is str else None
        if kind is None:
            kind = _check_kind(dt, shape, f"{path}: tensor {name!r}")
            kinds[(dt, repr(shape))] = kind
        if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int:
            raise FormatError(f"{path}: tensor {name!r}: data_offsets {offs!r} is not a pair of integers")
        b, end = offs
        if not 0 <= b <= end <= data_size:
            raise FormatError(f"{path}: tensor {name!r}: data_offsets [{b}, {end}] lie outside the data buffer "
                              f"of {data_size} bytes (file truncated?)")
        if end - b != kind[1]:
            raise FormatError(f"{path}: tensor {name!r}: holds {end - b} bytes but shape {shape} x {dt} needs "
                              f"{kind[1]}")
        tensors[name] = TensorInfo(name, dt, kind[0], b + offset, end - b)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer")
    return tensors, meta


def _check_kind(dt, shape, where: str) -> tuple[tuple[int, ...], int]:
    """(shape, bytes) of a valid header dtype and shape; FormatError naming ``where`` otherwise."""
    if not isinstance(dt, str) or not dtypes.known(dt):
        raise FormatError(f"{where}: unknown dtype {dt!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    return tuple(shape), prod(shape) * dtypes.itemsize(dt)


#: headers parsed and found valid, by (sha256, data size, data start): the checkpoints of a run
#: repeat each shard's header byte for byte, and a MoE header of thousands of entries takes a
#: millisecond to parse. The same bytes over the same buffer size validate the same way. Bounded
#: by tensor entries (a header without tensors counts one), not by a number of headers: a run's
#: distinct headers hold each of the model's tensors once, in as many shards as its export has
#: (a DeepSeek-V3 export has 163). Kept by count (64), a checkpoint of 72 shards evicted each
#: header before the next checkpoint asked for it: every header of the run parsed (18,432 tensors
#: at T = 50: 8.9 of 15 s).
HEADER_ENTRIES_KEPT = 1 << 18
_HEADERS = BoundedCache(HEADER_ENTRIES_KEPT, weight=lambda parsed: max(1, len(parsed[0])))


def _parsed_header(raw: bytes, key: tuple[str, int, int], path: str):
    """:func:`parse_header` of ``raw`` (``key``: its sha256, data size and data start), or a copy of
    its result for the same header bytes parsed before."""
    tensors, metadata = _HEADERS.get(key, lambda: parse_header(raw, key[1], path, key[2]))
    return dict(tensors), dict(metadata)  # TensorInfo is frozen: shared; the dicts are each file's own


class MappedFile:
    """A validated input file mapped read-only, whose tensors (``tensors``: name -> :class:`TensorInfo`,
    ``begin`` an absolute file offset) are contiguous byte ranges: views and page releases by
    tensor element range through the process-wide map cache, read-ahead through a descriptor of
    its own (:meth:`_willneed`). Subclasses
    parse a format (:class:`SafetensorsFile`; ``torch.save`` zips in :mod:`.torchzip`) and set
    ``path``, ``size``, ``mtime_ns``, ``_identity``, ``header_sha256``, ``tensors``, ``metadata``.
    """

    _mm = None
    #: every tensor is one contiguous byte range of this file (the engine's grouped passes take addresses)
    groupable = True

    def _stat_open(self, path) -> int:
        """Open ``path`` read-only (a regular file, not a FIFO) and record its identity; returns the fd."""
        self.path = os.fspath(path)
        self._mm = None  # mapped on first use (:meth:`_map`), unmapped when idle
        try:
            # O_NONBLOCK: a FIFO in place of a file must be an error, not a hang
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{self.path}: is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return fd

    def view(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Zero-copy 1-D view of elements ``[start, stop)`` of tensor ``name`` (raw dtype)."""
        t = self.tensors[name]
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:  # never a byte of a neighbour, never past the file
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        isz = dtypes.itemsize(t.dtype)
        with _MAPS.lock:  # the view exists before any other thread may evict the map
            return np.frombuffer(self._map(), dtype=dtypes.raw_numpy(t.dtype), count=stop - start,
                                 offset=t.begin + start * isz)

    def buffer(self) -> np.ndarray:
        """The whole mapped file as uint8, for the engine's grouped passes, which take the
        addresses of many tensors (``TensorInfo.begin``) from it; the map stays while it lives."""
        with _MAPS.lock:
            return np.frombuffer(self._map(), dtype=np.uint8)

    def release_bytes(self, begin: int, end: int) -> None:
        """:meth:`release` of the file bytes ``[begin, end)`` (several tensors at once)."""
        self._dontneed(begin, end - begin)

    def prefetch_bytes(self, begin: int, end: int) -> None:
        """:meth:`prefetch` of the file bytes ``[begin, end)``."""
        self._willneed(begin, end - begin)

    def _willneed(self, begin: int, nbytes: int) -> None:
        """Ask the kernel to read file bytes ``[begin, begin + nbytes)`` into the page cache:
        ``posix_fadvise(WILLNEED)`` on a descriptor of its own (the same readahead as a map's
        ``MADV_WILLNEED``), without mapping the file and without the maps' lock (but to let idle
        maps go when out of descriptors). The call returns once the reads are queued, which on a
        cold cache takes most of their time: the engine makes it on its read-ahead thread, where
        holding the lock would stall the views of the main thread. In pieces of
        :func:`readahead_bytes`. Advice only: a file it cannot open, or one replaced since it was
        opened, is skipped (the read that follows says what is wrong)."""
        end = min(begin + nbytes, self.size)
        if end <= begin:
            return
        try:
            fd = self._open_again()
        except FormatError:
            return
        step = readahead_bytes(self._identity[0])  # (one advice reads no more: see readahead_bytes)
        try:
            for at in range(begin, end, step):
                os.posix_fadvise(fd, at, min(step, end - at), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _map(self) -> mmap.mmap:
        """The map of this file (under ``_MAPS.lock``): mapped again if it was unmapped."""
        if self._mm is None:
            _MAPS.evict(max_maps() - 1)
            for again in (False, True):
                try:
                    self._mm = self._open_map()
                    break
                except OSError as e:
                    # out of descriptors (other code holds some too): unmap every idle file, try once more
                    if again or e.errno not in (errno.EMFILE, errno.ENFILE) or not _MAPS.evict(0):
                        raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        _MAPS.used(self)
        return self._mm

    def _open_again(self) -> int:
        """A descriptor of the file this was opened as (an error if it was replaced or changed);
        out of descriptors, idle maps are let go once and the open tried again."""
        for again in (False, True):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if not again and e.errno in (errno.EMFILE, errno.ENFILE):
                    with _MAPS.lock:
                        if _MAPS.evict(0):
                            continue
                raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            os.close(fd)
            raise FormatError(f"{self.path}: changed while this run was using it (another file, size or "
                              "modification time than when it was opened); run again once the inputs stay put")
        return fd

    def _open_map(self) -> mmap.mmap:
        fd = self._open_again()
        try:
            return mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``[start, stop)`` of tensor ``name`` into the contiguous array ``out`` with
        ``preadv``: one copy out of the page cache, no page-table entries to fault in and drop
        again (the device reader fills pinned buffers this way; a map's page faults and
        ``MADV_DONTNEED`` TLB shootdowns cost more than the copy on many reader threads)."""
        t = self.tensors[name]
        if not 0 <= start <= stop <= t.numel:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        isz = dtypes.itemsize(t.dtype)
        fd = self._open_again()
        try:
            self._preadv(fd, [self._dest(out, (stop - start) * isz)], t.begin + start * isz, [name])
        finally:
            os.close(fd)

    def read_whole(self, names: list[str], outs: list[np.ndarray]) -> None:
        """Whole tensors ``names`` into the contiguous arrays ``outs``: :meth:`read_into` of each,
        with one descriptor for all and one ``preadv`` per run of tensors adjacent in the file
        (the device reader's groups of small tensors: hundreds per file, stored back to back)."""
        todo = sorted(zip((self.tensors[n] for n in names), outs), key=lambda p: p[0].begin)
        fd = self._open_again()
        try:
            i = 0
            while i < len(todo):
                at = end = todo[i][0].begin
                bufs, run = [], []
                while i < len(todo) and todo[i][0].begin == end:
                    t, out = todo[i]
                    bufs.append(self._dest(out, t.nbytes))
                    run.append(t.name)
                    end += t.nbytes
                    i += 1
                self._preadv(fd, bufs, at, run)
        finally:
            os.close(fd)

    def _dest(self, out: np.ndarray, nbytes: int) -> memoryview:
        if out.nbytes != nbytes or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: a read's destination must be a contiguous {nbytes}-byte array, "
                             f"got {out.nbytes} bytes")
        return memoryview(out.reshape(-1).view(np.uint8))

    def _preadv(self, fd: int, bufs: list[memoryview], at: int, names: list[str]) -> None:
        """Fill ``bufs`` (of tensors ``names``) from file offset ``at`` on (a short read continues
        where it stopped)."""
        keep = [i for i, b in enumerate(bufs) if len(b)]
        bufs, names = [bufs[i] for i in keep], [names[i] for i in keep]
        k = 0  # bufs[:k] are full
        while k < len(bufs):
            n = os.preadv(fd, bufs[k:k + _IOV_MAX], at)
            if n <= 0:
                raise FormatError(f"{self.path}: ends inside tensor {names[k]!r} (truncated while being read?)")
            at += n
            while k < len(bufs) and n >= len(bufs[k]):
                n -= len(bufs[k])
                k += 1
            if k < len(bufs) and n:
                bufs[k] = bufs[k][n:]

    def _unmap_idle(self) -> bool:
        """Unmap unless a view of the map is alive (under ``_MAPS.lock``); whether it is unmapped."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                return False  # in use
            self._mm = None
        return True

    def _dontneed(self, begin: int, nbytes: int) -> None:
        """Drop our mapping's pages of file bytes ``[begin, begin + nbytes)`` (not mapped: none)."""
        if nbytes <= 0:
            return
        lo = begin - begin % _PAGE
        hi = min(begin + nbytes, self.size)
        with _MAPS.lock:
            if self._mm is None:
                return  # not mapped: no page of ours to drop
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
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
        self._dontneed(b, (stop - start) * isz)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading a range ahead of use (overlaps I/O with compute)."""
        t = self.tensors[name]
        isz = dtypes.itemsize(t.dtype)
        stop = t.numel if stop is None else stop
        self._willneed(t.begin + start * isz, (stop - start) * isz)

    def unmap(self) -> None:
        """Let go of the map and its descriptor now; the next use maps the file again."""
        with _MAPS.lock:
            _MAPS.discard(self)
            if not self._unmap_idle():
                self._mm = None  # a view is still alive; the map goes with it

    def close(self) -> None:
        self.unmap()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(MappedFile):
    """One ``.safetensors`` file, validated and mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        fd = self._stat_open(path)
        try:
            if self.size < 8:
                raise FormatError(f"{self.path}: {self.size} bytes is too short for a safetensors file")
            n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
            if n > MAX_HEADER:  # (any file that is not safetensors: its first 8 bytes as a length)
                raise FormatError(f"{self.path}: not a safetensors file, or a corrupt one (its first 8 bytes "
                                  f"give a header length of {n} bytes, past the format's 100 MB limit)")
            if 8 + n > self.size:
                raise FormatError(f"{self.path}: header length {n} runs past the end of the "
                                  f"{self.size}-byte file (truncated, or not a safetensors file)")
            raw = os.pread(fd, n, 8)
            if len(raw) != n:
                raise FormatError(f"{self.path}: short read of the header")
            self.header_sha256 = hashlib.sha256(raw).hexdigest()
            self.data_start = 8 + n
            #: what the tensors' entries depend on: equal keys, equal entries (:class:`.checkpoint.Layout`)
            self.header_key = (self.header_sha256, self.size - self.data_start, self.data_start)
            self.tensors, self.metadata = _parsed_header(raw, self.header_key, self.path)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        finally:
            os.close(fd)
