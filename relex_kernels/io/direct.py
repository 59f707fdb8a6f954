"""Output bytes written around the page cache: ``O_DIRECT`` writes from reused, aligned buffers,
on a writer thread, so the kernels compute the next chunk while the disk writes the last.

Why not write through the page cache (a shared map of the file, or plain ``pwrite``): every
4 KiB of output then needs a fresh page-cache page, which the OS allocates, zeroes (the file's
space is preallocated, so a first touch reads "zeros" from an unwritten extent) and later
writes back. That costs CPU on every machine, and on a VM whose host takes back the guest's
free memory (virtio-balloon free page reporting) each fresh page is also a fault on the host.
Measured there, 0.44 GB (``benchmarks/bench_write.py``, the values' stores included): through
a shared map 0.61 CPU-seconds, ``pwrite`` 1.29, direct 0.21; on the disk, with its sync, after
0.65, 1.32 and 0.45 s. An 8B model's 16 GB of output would also fill the page cache with dirty
pages the run never reads.

A range of a file is written as its aligned middle, straight from the caller's buffer by
``O_DIRECT``, and the partial blocks at its two ends (a tensor starts anywhere in its file) by
plain ``pwrite`` through the page cache: two ranges that meet inside a block (two tensors,
two chunks, two SPMD ranks) meet in the page cache, never in a direct write. A file system
that refuses ``O_DIRECT`` (older tmpfs, some network and FUSE mounts) gets plain ``pwrite`` for
everything, the same bytes. Errors of the writer thread are raised, as
:class:`~relex_kernels.errors.OutputError`, by the next call that hands it work or waits for it.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import numpy as np

from .. import threads
from ..errors import OutputError

#: the alignment of a direct write's file offset, length and memory: a page, at least 4 KiB
#: (above any disk's logical block; one page so that a direct write never covers part of a
#: page that an SPMD rank shares with another through the page cache)
ALIGN = max(4096, mmap.PAGESIZE)
#: bytes of one staged chunk: a few MiB keep the writes large and the buffers in the caches, and
#: hold a group's small tensors (an MoE expert, a 1B model's MLP) whole
CHUNK_BYTES = 8 << 20
#: chunks staged or in flight per queue: the kernels run this far ahead of the disk
DEPTH = 4
#: Linux writes at most 0x7FFFF000 bytes per write call: pieces of at most that, whole blocks
_MAX_WRITE = 0x7FFFF000 // ALIGN * ALIGN


def _env_enabled() -> bool:
    return os.environ.get("RELEX_DIRECT_WRITE", "1").strip().lower() not in ("0", "no", "off", "false")


#: file systems where the page cache path is kept: on NFS (and SMB) each switch of a file between
#: cached and direct I/O writes back and unmaps the whole file's cached pages (Linux fs/nfs/io.c),
#: and a range's partial end blocks switch it twice per chunk (read from the source, not measured)
_NO_DIRECT_FS = frozenset({"nfs", "nfs4", "cifs", "smb3"})


def fs_type(path: str) -> str | None:
    """The type of the file system ``path`` lies on (``/proc/self/mountinfo``), or None."""
    try:
        dev = os.stat(path).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 2 and fields[2] == want and right:
                    return right.split()[0]
    except (OSError, ValueError):
        pass
    return None


def open_direct(path: str) -> int | None:
    """An ``O_DIRECT`` write descriptor of ``path``; None where the file system refuses it or is one
    of :data:`_NO_DIRECT_FS` (or ``RELEX_DIRECT_WRITE=0`` turns direct writes off: every byte then
    goes through the page cache)."""
    if not _env_enabled() or not hasattr(os, "O_DIRECT") or fs_type(path) in _NO_DIRECT_FS:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while len(view):
        n = os.pwrite(fd, view[:_MAX_WRITE], at)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view, at = view[n:], at + n


def chunk_cuts(at: int, nbytes: int, chunk_bytes: int = CHUNK_BYTES, unit: int = 1) -> list[tuple[int, int]]:
    """``[0, nbytes)`` (bytes at file offset ``at``) in pieces ``[s, e)`` of at most ``chunk_bytes``,
    cut where the file offset is a multiple of :data:`ALIGN` when ``s`` and ``e`` can be multiples of
    ``unit`` (an element's size) there, so that only a range's two ends are partial blocks."""
    out, s = [], 0
    while s < nbytes:
        e = (at + s + chunk_bytes) // ALIGN * ALIGN - at
        e -= e % unit
        if e <= s:
            e = s + max(unit, (chunk_bytes // unit) * unit - ALIGN)
        e = min(nbytes, e)
        out.append((s, e))
        s = e
    return out


class Target:
    """Where one file's bytes go: its page-cache descriptor and, where allowed, its direct one.

    ``cached``: every byte through the page cache (a file holding fp16 outputs: their range check
    reads them back at once)."""

    def __init__(self, path: str, fd: int, cached: bool = False):
        self.path, self.fd, self.cached = path, fd, cached
        self._dfd: int | None = None
        self._tried = False  # the direct descriptor is opened at the first direct write

    @property
    def dfd(self) -> int | None:
        if not self._tried:
            self._tried = True
            self._dfd = open_direct(self.path)
        return self._dfd

    def write(self, data: memoryview, at: int) -> None:
        """Write ``data`` at file offset ``at``: the aligned middle directly where ``data`` is
        aligned with it in memory, the rest (and everything, without a direct descriptor, or
        :attr:`cached`) through the page cache. Runs on the writer thread."""
        lo, hi = at, at + len(data)
        mid_lo, mid_hi = -(-lo // ALIGN) * ALIGN, hi // ALIGN * ALIGN
        addr = np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0
        if self.cached or self.dfd is None or mid_hi <= mid_lo or (addr + mid_lo - lo) % ALIGN:
            _pwrite_all(self.fd, data, lo)
            return
        _pwrite_all(self.fd, data[:mid_lo - lo], lo)
        try:
            _pwrite_all(self.dfd, data[mid_lo - lo:mid_hi - lo], mid_lo)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # opened with O_DIRECT but not written so (a FUSE or network mount, a larger block):
            # this file's bytes go through the page cache from now on
            os.close(self._dfd)
            self._dfd = None
            _pwrite_all(self.fd, data[mid_lo - lo:mid_hi - lo], mid_lo)
        _pwrite_all(self.fd, data[mid_hi - lo:], mid_hi)

    def close(self) -> None:
        self._tried = True
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None


class WriteQueue:
    """A writer thread and its :data:`DEPTH` staging buffers, shared by the files of one output.

    :meth:`stage` hands out a buffer placed so that its bytes line up with their file offsets
    (a direct write needs the memory aligned as the offset is); :meth:`commit` queues it for
    writing and the buffer returns to the pool once written. :meth:`drain` waits for every
    queued write. Staging blocks while every buffer is queued: the disk sets the pace.
    """

    def __init__(self, chunk_bytes: int | None = None, depth: int | None = None):
        self.chunk_bytes = chunk_bytes = max(2 * ALIGN, chunk_bytes or CHUNK_BYTES)
        # last in, first out: a run that needs two buffers at a time touches two (RSS), still in cache
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._bufs = [mmap.mmap(-1, chunk_bytes + ALIGN) for _ in range(max(2, depth or DEPTH))]  # page-aligned
        self._addrs = [np.frombuffer(b, dtype=np.uint8).ctypes.data for b in self._bufs]
        for b in self._bufs:
            self._free.put(b)
        self._held: set[int] = set()  # ids of the buffers staged and not yet committed or discarded
        self._todo: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                # (born with Ctrl-C, SIGTERM … blocked: the main thread must see them at once)
                self._thread = threads.start(self._run, name="relex-writer")

    def _run(self) -> None:
        while True:
            task = self._todo.get()
            try:
                if task is None:
                    return
                target, buf, lo, hi, at = task
                if self._error is None:
                    try:
                        target.write(memoryview(buf)[lo:hi], at)
                    except BaseException as e:  # kept for the caller's thread (raised there)
                        self._error = OutputError(f"cannot write {target.path}: "
                                                  f"{getattr(e, 'strerror', None) or e}")
                        self._error.__cause__ = e
                self._free.put(buf)
            finally:
                self._todo.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def stage(self, at: int, nbytes: int, dtype) -> np.ndarray:
        """A writable array of ``nbytes`` bytes (``dtype`` elements) for file offset ``at``."""
        if nbytes > self.chunk_bytes:
            raise ValueError(f"a staged chunk holds at most {self.chunk_bytes} bytes, not {nbytes}")
        idle = 0.0
        while True:  # (a buffer is back once the writer thread wrote it, or failed to)
            self._check()
            try:
                buf = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                # nothing queued for seconds: every buffer is staged and held, none will come back
                idle = idle + 0.5 if self._todo.unfinished_tasks == 0 else 0.0
                if idle >= 3.0:
                    raise RuntimeError("every staging buffer is taken and none is queued: each "
                                       "stage() needs its commit() or discard()") from None
        with self._lock:
            self._held.add(id(buf))
        head = at % ALIGN
        return np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=head).view(dtype)

    def _release_hold(self, buf: mmap.mmap) -> bool:
        with self._lock:
            if id(buf) not in self._held:
                return False
            self._held.remove(id(buf))
            return True

    def _buffer_of(self, arr: np.ndarray) -> mmap.mmap:
        addr = arr.ctypes.data
        for b, lo in zip(self._bufs, self._addrs):
            if lo <= addr < lo + len(b):
                return b
        raise ValueError("takes an array that stage() returned")

    def discard(self, arr: np.ndarray) -> None:
        """Give back a staged buffer without writing it (a kernel failed before its commit); one
        already committed or given back is left alone (an interrupt may fall between the two)."""
        buf = self._buffer_of(arr)
        if self._release_hold(buf):
            self._free.put(buf)

    def commit(self, target: Target, at: int, arr: np.ndarray) -> None:
        """Queue the staged ``arr`` (from :meth:`stage` with this ``at``) for writing at ``at``."""
        buf = self._buffer_of(arr)
        self._check()  # (raised before the buffer is taken: the caller still owns it)
        if not self._release_hold(buf):
            raise ValueError("this staged buffer was committed or discarded already")
        head = at % ALIGN
        self._start()
        self._todo.put((target, buf, head, head + arr.nbytes, at))

    def write(self, target: Target, at: int, data: np.ndarray) -> None:
        """Write the bytes of ``data`` (any array) at ``at``, copied through staged chunks."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        for s, e in chunk_cuts(at, raw.nbytes, self.chunk_bytes):
            arr = self.stage(at + s, e - s, np.uint8)
            try:
                arr[...] = raw[s:e]
                self.commit(target, at + s, arr)
            except BaseException:
                self.discard(arr)
                raise

    def write_pieces(self, target: Target, pieces) -> None:
        """Write ``pieces`` (``(at, data)``, any order) of one file: neighbours that lie back to back
        share a staged buffer (a device group's thousand small tensors: a few writes, not a thousand)."""
        run: list = []  # (at, raw) of the run being gathered, back to back

        def flush() -> None:
            if not run:
                return
            lo, hi = run[0][0], run[-1][0] + run[-1][1].nbytes
            if len(run) == 1 or hi - lo > self.chunk_bytes:
                for a, r in run:
                    self.write(target, a, r)
            else:
                arr = self.stage(lo, hi - lo, np.uint8)
                try:
                    for a, r in run:
                        arr[a - lo:a - lo + r.nbytes] = r
                    self.commit(target, lo, arr)
                except BaseException:
                    self.discard(arr)
                    raise
            run.clear()

        for at, data in sorted(pieces, key=lambda p: p[0]):
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            if run and (at != run[-1][0] + run[-1][1].nbytes or at + raw.nbytes - run[0][0] > self.chunk_bytes):
                flush()
            run.append((at, raw))
        flush()

    def drain(self) -> None:
        """Wait until every queued write is done; raise the first error any of them met."""
        if self._thread is not None:
            self._todo.join()
        self._check()

    def close(self) -> None:
        """Stop the thread (after the writes queued so far; :meth:`drain` first to see their errors)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
