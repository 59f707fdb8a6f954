"""The overlapped disk -> pinned host -> device pipeline of the device backends (triton, cuda).

:class:`DeviceStreamer` is a drop-in for :class:`~.streaming.Streamer` (same ``gram``,
``combine``, ``copy``; the same :class:`~.gramsum.GramSum` and ``on_range`` journal
points; the device range rule of :class:`~.plan.Policy`), so the one
:class:`~.executor.Executor` runs it with the journal, resume and output logic of
every run.

Data path, per *group* of elements (a power-of-two number of GRAM_CHUNKs that divides
GRAM_BLOCK, so groups never straddle a Gram block):

* a reader thread fills a pinned buffer with the group's T+1 rows by ``preadv`` into it
  (:meth:`~..io.reader.MappedFile.read_into`: large sequential reads, rows in parallel,
  no page of a map faulted in and dropped again); it reads ahead along the run's plan
  (:meth:`DeviceStreamer.follow`), bounded by the pinned pool — through tensor
  boundaries and while the device computes;
* the H2D copy runs on its own stream into a device stage slot (ring of
  ``N_STAGE``) or, for a tensor whose whole trajectory fits the device budget, into
  its resident buffer — then pass 2 reads nothing; before the engine waits for the
  device (a tensor's or a group's Grams, then the solve on the host), the plan's next
  group goes up into the next stage slot if the reader has it (:meth:`_look_ahead`), so
  that copy overlaps the wait and the solve instead of following them;
* the Gram kernels run on the compute stream as each group lands; the combine
  kernel writes the outputs of a group into a device slot, a D2H copy on a third
  stream brings them to a pinned buffer, and writer threads copy them into the
  output writers' staging buffers (written around the page cache, :mod:`..io.direct`)
  while the next groups compute.

Small tensors (a MoE model's thousands of experts) run in groups (``group`` items of the
plan): one read into a pinned buffer, one upload into a stage slot, each tensor's Gram
kernels into a stack of Grams brought back with one wait, one batched solve on the host,
each tensor's combine into one output slot and one download — the device waits on the
host once per group, not once per tensor, with the bits of the per-tensor path.

``combine`` returns once a range's outputs are on their way to the output files, not once
they are there: the journal's records of written ranges and finished tensors (``on_range``,
:meth:`~.streaming.Streamer.after_writes`) run on the engine's thread when the writer threads
have landed them, at the pipeline's next step or at :meth:`~.streaming.Streamer.drain`. The
outputs of tensor k are thus written while tensor k+1 is read and computes; the pinned output
buffers bound what is in flight (a run killed before the records resumes from the last ones:
work redone, never bytes lost). Waiting for the writes at each tensor's end instead left the
device idle while a tensor's outputs went to the files, and the reader only a few pinned
buffers ahead.

On a CPU (``--backend triton`` with ``TRITON_INTERPRET=1``, tests only) the same code
runs with synchronous stand-ins for the streams (:class:`_NoStream`); the tests also run
it with asynchronous ones (copies on worker threads after random delays) to check the
event and buffer ordering the CUDA streams rely on.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from .. import threads
from ..errors import DeviceMemoryError, UsageError
from ..io import dtypes
from ..ops import DEVICE_BACKENDS, Backend
from ..ops.cuda import gram_precision
from ..ops.reference import GRAM_CHUNK
from .gramsum import GRAM_BLOCK, GramSum
from . import plan
from .plan import GROUP_ALIGN, KERNEL_SCRATCH, MIN_BUDGET, Policy, aligned
from .streaming import Streamer
from .trajectory import Job

N_PINNED = 3  # pinned input buffers: one being filled, one in flight, one ahead
N_STAGE = 2  # device stage slots of streamed tensors (>= 2: a group uploaded ahead takes the next one)
N_OUT = 3  # pinned output buffers (and 2 device output slots)
MAX_STAGE = 256 << 20
#: the pipeline's stages as timed in ``relex_report.json`` (``device_stages``): ``read`` is the
#: reader thread's busy time, ``write`` the writer threads' (added up over them); the others are
#: the engine thread's: waiting for the reader, issuing copies, launching kernels, waiting for
#: the device to finish a tensor's Gram (``wait_gram``: on a GPU most of the Gram kernels' time
#: shows here) or to free a pinned output buffer (``wait_out``), and waiting for the writers
STAGES = ("read", "wait_read", "h2d", "gram", "wait_gram", "combine", "d2h", "wait_out", "write", "wait_write")
#: bytes per read task: rows are read in pieces so that all reader threads stay busy
READ_PIECE = 16 << 20


def stage_bytes(T: int, memory_budget: int) -> int:
    """Bytes of one pinned input buffer / device stage slot: a few per host budget, >= one chunk."""
    budget = max(memory_budget - KERNEL_SCRATCH, MIN_BUDGET)
    return max(min(budget // 8, MAX_STAGE), (T + 1) * 8 * GRAM_CHUNK)


def out_slot_bytes(T: int, stage: int, K: int) -> int:
    """Bytes of an output slot: K outputs of a stage's inputs, with the aligned places of a
    group's tensors (a group's inputs fill at most a stage, aligned alike)."""
    return -(-stage * K // (T + 1)) + 64 + GROUP_ALIGN * plan.device_group_max(T, stage)


def device_overhead(T: int, memory_budget: int) -> int:
    """Device bytes the pipeline holds besides resident tensors (stage and output slots, the Gram
    kernel's scratch, a group's Grams)."""
    stage = stage_bytes(T, memory_budget)
    out = out_slot_bytes(T, stage, T + 1)  # K <= T+1 outputs assumed here
    scratch = (stage // ((T + 1) * 2) // GRAM_CHUNK + 1) * 8 * T * T * 4
    grams = plan.device_group_max(T, stage) * 8 * T * T
    return N_STAGE * stage + 2 * out + scratch + grams + (1 << 20)


def make_streamer(traj, backend: Backend, memory_budget: int, fp16_deltas: bool = False,
                  device_memory_budget: int | None = None) -> Streamer:
    if backend.name in DEVICE_BACKENDS:
        return DeviceStreamer(traj, backend, memory_budget, fp16_deltas, device_memory_budget=device_memory_budget)
    return Streamer(traj, backend, memory_budget, fp16_deltas=fp16_deltas)


def close_streamer(streamer, drain: bool = False) -> None:
    """Stop a streamer's threads: a :class:`Streamer`'s read-ahead thread, a :class:`DeviceStreamer`'s
    readers and writers too (None: nothing).

    ``drain``: first let the outputs in flight land and make their journal records — a graceful
    interrupt keeps every finished tensor for the resume; an error drops them (its outputs go)."""
    if streamer is None:
        return
    try:
        if drain:
            streamer.drain()
    except Exception as e:  # (the interrupt is what the caller reports; the resume redoes what was not recorded)
        print(f"relex: while stopping, outputs in flight were not all recorded ({e})", file=sys.stderr)
    finally:
        streamer.close()


def stage_fields(streamer) -> dict:
    """The report's ``device_stages``: the device pipeline's seconds per stage (nothing on the host)."""
    timed = getattr(streamer, "stage_seconds", None)
    return {"device_stages": timed()} if timed is not None else {}


def _wait_all(futures) -> None:
    """Wait for every one of ``futures``, then raise the first error: a buffer goes back to its pool
    only once no task writes into it any more."""
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e


class _NoStream:
    """Stream and event stand-ins on the CPU, where every copy is synchronous.

    The interface the pipeline needs of a host stand-in: ``submit(fn)`` runs an operation in
    stream order, ``wait_event``/``synchronize``, ``event()`` makes an event (``record(stream)``,
    ``synchronize()``). Tests put asynchronous ones in (worker threads, random delays) to check
    the event and slot ordering the CUDA streams rely on.
    """

    def submit(self, fn) -> None:
        fn()

    def wait_event(self, ev) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def event(self):
        return self


class _Pool:
    """Pinned host buffers; a returned buffer carries the event after which it is free."""

    def __init__(self, torch, n: int, nbytes: int, pin: bool):
        self.nbytes = nbytes
        self.q: queue.Queue = queue.Queue()
        for _ in range(n):
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            self.q.put((t, t.numpy(), None))

    def get(self, stop: threading.Event | None = None):
        while True:
            try:
                t, arr, ev = self.q.get(timeout=0.1)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
        if ev is not None:
            ev.synchronize()
        return t, arr

    def put(self, item, ev=None) -> None:
        self.q.put((item[0], item[1], ev))


class _Reader:
    """Fills pinned buffers with groups in a predicted order, ahead of the engine's requests."""

    def __init__(self, owner: "DeviceStreamer", pool: _Pool, rows: ThreadPoolExecutor):
        self.owner, self.pool, self.rows = owner, pool, rows
        self.thread = self.q = self.stop = None
        self.peeked = None  # the queue's head, taken off by a take(wait=False) that did not answer with it

    def _run(self, keys, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for key in keys:
                buf = self.pool.get(stop)
                if buf is None:
                    return
                if stop.is_set():
                    self.pool.put(buf)
                    return
                try:
                    with self.owner._timed("read"):
                        self.owner._fill(key, buf[1])
                except BaseException as e:  # handed to the engine's thread
                    q.put((key, buf, e))
                    return
                q.put((key, buf, None))
        finally:
            q.put(None)

    def _start(self, key) -> None:
        self.q, self.stop = queue.Queue(), threading.Event()
        self.thread = threads.start(self._run, (self.owner._plan_from(key), self.q, self.stop), name="relex-reader")

    def cancel(self) -> None:
        if self.peeked is not None:
            self.pool.put(self.peeked[1])
            self.peeked = None
        if self.thread is None:
            return
        self.stop.set()
        while True:  # return what it read; it exits at its next look at `stop`
            item = self.q.get()
            if item is None:
                break
            self.pool.put(item[1])
        self.thread.join()
        self.thread = None

    def take(self, key, wait: bool = True):
        """The pinned buffer (torch, numpy) holding group ``key``; raises the reader's error.

        ``wait=False``: the buffer if the reader has it ready now, else None, at once: it starts no
        reader, and what it finds instead (another group, the group's read error) stays at the
        head of the queue for the next take, which answers or raises as it would have."""
        restarted = False
        while True:
            if self.thread is None:
                if not wait:
                    return None
                self._start(key)
                restarted = True
            if self.peeked is not None:
                item, self.peeked = self.peeked, None
            else:
                try:
                    item = self.q.get(block=wait)
                except queue.Empty:
                    return None
            if item is None:  # the plan ran out
                self.thread.join()
                self.thread = None
                if restarted:  # even the requested key was not read: the reader thread failed
                    raise RuntimeError(f"internal: the reader stopped before group {key}")
                continue
            if not wait and (item[0] != key or item[2] is not None):
                self.peeked = item
                return None
            if item[0] == key or restarted:  # a fresh plan starts with the key itself
                if item[2] is not None:
                    self.pool.put(item[1])
                    self.cancel()
                    raise item[2]
                return item[1]
            self.pool.put(item[1])
            self.cancel()  # the engine asked out of the predicted order (a resumed run)


class DeviceStreamer(Streamer):
    """Runs the passes of a :class:`~.trajectory.Trajectory` on a device backend (module docstring).

    F64 tensors are computed on the host in fp64 (:mod:`..ops.fp64`), as by :class:`Streamer`, and
    so are tensors whose versions or output differ in dtype (fp32 masters beside a bf16 base).
    """

    def __init__(self, traj, backend: Backend, memory_budget: int, fp16_deltas: bool = False,
                 device_memory_budget: int | None = None):
        super().__init__(traj, backend, memory_budget, fp16_deltas)
        import torch
        self.torch = torch
        self.kern = backend.module.device_kernels()
        self.dev = self.kern.device
        self.cuda = self.dev.type == "cuda"
        self.precision = gram_precision()
        T = traj.T
        self.stage = stage_bytes(T, memory_budget)
        if device_memory_budget is None:
            if self.cuda:
                free, _ = torch.cuda.mem_get_info(self.dev)
                device_memory_budget = int(free * 0.9) - (256 << 20)
            else:
                device_memory_budget = memory_budget
        self.device_budget = device_memory_budget
        self.out_bytes = None  # per output buffer, fixed at the first combine (needs K)
        fixed = device_overhead(T, memory_budget)
        self.resident_cap = self.device_budget - fixed
        if self.resident_cap < 0:
            raise UsageError(f"device memory budget (--device-memory-budget) {self.device_budget / 2**20:.0f} MiB "
                             f"is below the {fixed / 2**20:.0f} MiB the pipeline needs for T={T}")
        self.policy = Policy(T, memory_budget, self.resident_cap, stage=self.stage)
        self.jobs = {j.name: j for j in traj.jobs}
        self.keys: list = []  # the group keys of the plan being run, in order (follow)
        self.key_at: dict = {}  # each key's place in keys
        self.on_arena: set = set()  # the tensors whose pass-1 groups go into the arena (follow)
        self.next_key = 0  # the place in keys after the group uploaded last
        self.ahead = None  # (key, slot, event of the copy) of the group uploaded ahead (_look_ahead)
        self.uploads_ahead = 0  # how many were used (tests)
        if self.cuda:
            self.h2d, self.compute, self.d2h = (torch.cuda.Stream(self.dev) for _ in range(3))
        else:
            self.h2d, self.compute, self.d2h = self._host_streams()
        self.slots = [self._device_empty(self.stage, torch.uint8, "a stage slot") for _ in range(N_STAGE)]
        self.slot_free = [None] * N_STAGE
        self.next_slot = 0
        self.read_threads = min(8, os.cpu_count() or 1)
        self.rows = threads.pool(self.read_threads, "relex-read")
        self.writes = threads.pool(2, "relex-write")
        self.pool = _Pool(torch, N_PINNED, self.stage, self.cuda)  # pinned when there is a device
        self.reader = _Reader(self, self.pool, self.rows)
        self.res = None  # (job name, device buffer, end of the covered prefix) of the resident tensor
        # one device buffer for every resident trajectory, sized once from the plan (follow): no
        # allocation per tensor, no fragmentation of the device's free memory over thousands of them
        self.arena = None
        self.arena_free = None  # event: the compute stream is done with the last resident tensor
        self.arena_bytes = 0
        self.closed = False
        self.out_pool = self.out_slots = None
        self.scratch = None
        self.grams = None  # a group's Grams, (k, T, T) fp64 (gram_group)
        self.inflight: list = []  # writes submitted since the last after_writes
        self.later: deque = deque()  # (writes, what runs once they landed), in submission order
        self.seconds = dict.fromkeys(STAGES, 0.0)  # per stage (stage_seconds)
        self._seconds_lock = threading.Lock()

    # -- stage timers and NVTX ranges ----------------------------------------------------
    @contextlib.contextmanager
    def _timed(self, stage: str):
        """Time ``stage`` (added up over threads) and mark it as an NVTX range for a profiler."""
        nvtx = self.torch.cuda.nvtx if self.cuda else None
        if nvtx is not None:
            nvtx.range_push(stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            if nvtx is not None:
                nvtx.range_pop()
            with self._seconds_lock:
                self.seconds[stage] += dt

    def stage_seconds(self) -> dict:
        """Seconds per pipeline stage (``relex_report.json`` ``device_stages``; :data:`STAGES`)."""
        with self._seconds_lock:
            return {k: round(v, 6) for k, v in self.seconds.items()}

    # -- sizes and plans ---------------------------------------------------------------
    def group_len(self, job: Job) -> int:
        """Elements per group: 2^k GRAM_CHUNKs filling at most a stage buffer, at most GRAM_BLOCK."""
        per_chunk = (self.traj.T + 1) * dtypes.itemsize(job.dtype) * GRAM_CHUNK
        k = max(1, self.stage // per_chunk)
        return min(GRAM_BLOCK, GRAM_CHUNK << (k.bit_length() - 1))

    def groups(self, job: Job, a: int, b: int):
        g = self.group_len(job)
        while a < b:
            c = min(b, (a // g + 1) * g)
            yield a, c
            a = c

    def follow(self, items) -> None:
        """Read ahead along ``items`` (a :mod:`.plan`): the group keys (name, pass, a, b) each item
        will ask for, in order. A pass-2 read is planned unless pass 1 leaves the tensor on the device."""
        keys = []
        for it in items:
            job = it.job
            if it.kind == "group":
                keys.append(self._tensors_key(it.jobs))
                continue
            if it.reused or it.kind not in ("fit", "gram", "combine") or job.on_host:
                continue
            if it.needs_gram:
                keys += [(job.name, 1, ga, gb) for a, b in it.gram_ranges for ga, gb in self.groups(job, a, b)]
            if it.combine_ranges and (it.kind == "combine" or it.reread or not it.needs_gram):
                keys += [(job.name, 2, ga, gb) for a, b in it.combine_ranges for ga, gb in self.groups(job, a, b)]
        self.keys = keys
        self.key_at = {}
        for i, key in enumerate(keys):
            self.key_at.setdefault(key, i)
        self.next_key = 0
        self.ahead = None  # (one left from another plan is not used: its slot is the next one written, in h2d order)
        T = self.traj.T
        arena = [it.job for it in items if it.kind == "fit" and it.resident and not it.reused and not it.job.on_host]
        self.on_arena = {job.name for job in arena}
        self.arena_bytes = max([(T + 1) * job.nbytes for job in arena], default=0)

    def _plan_from(self, key):
        """Group keys: ``key``, then those the plan asks for after it."""
        yield key
        i = self.key_at.get(key)
        if i is None:
            return  # asked out of the plan (a caller driving the passes itself): no read-ahead
        yield from self.keys[i + 1:]

    # -- data movement -----------------------------------------------------------------
    def _fill(self, key, arr: np.ndarray) -> None:
        """Reader thread: the T+1 rows of group ``key`` into pinned bytes ``arr``."""
        if key[1] == 0:
            return self._fill_tensors(key[0], arr)
        job = self.jobs[key[0]]
        a, b = key[2], key[3]
        m = b - a
        dst = arr[:self._range_bytes(job, a, b)].view(dtypes.raw_numpy(job.dtype))
        locs = list(self._locs(job))
        step = max(1, READ_PIECE // dtypes.itemsize(job.dtype))

        def piece(r: int, lo: int, hi: int) -> None:  # a large sequential read of one input file
            locs[r].file.read_into(job.name, lo, hi, dst[r * m + lo - a:r * m + hi - a])

        tasks = [(r, lo, min(b, lo + step)) for r in range(len(locs)) for lo in range(a, b, step)]
        _wait_all([self.rows.submit(piece, *t) for t in tasks])

    def _fill_tensors(self, names, arr: np.ndarray) -> None:
        """Reader thread: a group of whole small tensors into pinned bytes ``arr``, laid out as
        :meth:`_layout` says; one task per version, one ``preadv`` per run of tensors adjacent in
        a file (a tensor assembled from rank files: its own ``read_into``)."""
        jobs = [self.jobs[n] for n in names]
        T1 = self.traj.T + 1
        offs, _ = self._layout(jobs, T1)
        rows = [arr[o:o + T1 * j.nbytes].view(dtypes.raw_numpy(j.dtype)).reshape(T1, j.numel)
                for j, o in zip(jobs, offs)]
        versions = [self.traj.base, *self.traj.ckpts]

        def version(r: int, lo: int, hi: int) -> None:  # tensors [lo, hi) of the group in version r
            files: dict = {}  # per input file: (file, tensor names, destinations)
            for job, dst in zip(jobs[lo:hi], rows[lo:hi]):
                f = versions[r].tensors[job.name].file
                if f.groupable:  # a file holding whole tensors: one read_whole for all of its tensors
                    entry = files.setdefault(id(f), (f, [], []))
                    entry[1].append(job.name)
                    entry[2].append(dst[r])
                else:  # assembled from rank files or chunks
                    f.read_into(job.name, 0, job.numel, dst[r])
            for f, ns, outs in files.values():
                f.read_whole(ns, outs)

        # a task per version, and per part of the group when there are fewer versions than threads
        cuts = np.linspace(0, len(jobs), min(len(jobs), -(-self.read_threads // T1)) + 1).astype(int).tolist()
        _wait_all([self.rows.submit(version, r, lo, hi) for r in range(T1) for lo, hi in zip(cuts, cuts[1:])])

    @staticmethod
    def _tensors_key(jobs) -> tuple:
        """The reader's key of a group of small tensors (pass 0: read once for both passes)."""
        return tuple(j.name for j in jobs), 0, 0, 0

    @staticmethod
    def _layout(jobs, rows: int) -> tuple[list[int], int]:
        """Byte offsets of each tensor's ``rows`` x numel block in a group's buffer, each aligned
        (:func:`~.plan.aligned`), and the bytes they span."""
        offs, at = [], 0
        for j in jobs:
            offs.append(at)
            at += aligned(rows * j.nbytes)
        return offs, at

    def _device_empty(self, numel: int, dtype, what: str):
        """``torch.empty`` on the device; running out of device memory is a clear error, not a raw
        ``torch.OutOfMemoryError`` from deep inside the pipeline."""
        try:
            return self.torch.empty(numel, dtype=dtype, device=self.dev)
        except (getattr(self.torch, "OutOfMemoryError", None) or self.torch.cuda.OutOfMemoryError) as e:
            nbytes = numel * dtype.itemsize
            raise DeviceMemoryError(
                f"{self.dev} ran out of memory allocating {nbytes / 2**20:.0f} MiB for {what} "
                f"(device budget {self.device_budget / 2**20:.0f} MiB): lower --device-memory-budget, "
                f"free the device, or use another one ({str(e).splitlines()[0] if str(e) else 'out of memory'})"
            ) from None

    def gram_precision(self) -> str:
        """The device Gram's product precision at this T, resolved: ``auto`` picks 3xTF32 above a
        T that differs between the CUDA and Triton kernels, so the report names what ran."""
        return self.kern.precision(self.traj.T, self.precision)

    @staticmethod
    def _host_streams():
        """(h2d, compute, d2h) without a device: synchronous stand-ins (tests swap in asynchronous ones)."""
        return _NoStream(), _NoStream(), _NoStream()

    def _event(self):
        return self.torch.cuda.Event() if self.cuda else self.compute.event()

    def _on(self, stream):
        return self.torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _copy(self, stream, dst, src) -> None:
        """``dst[:] = src`` in ``stream``'s order (returns before the copy is done)."""
        if self.cuda:
            with self._on(stream):
                dst.copy_(src, non_blocking=True)
        else:
            stream.submit(lambda: dst.copy_(src))

    def _upload(self, key, nbytes: int, dst, read: int | None = None):
        """The ``nbytes`` the reader filled for ``key`` into device bytes ``dst``; the compute
        stream waits for them. ``read``: input bytes they hold (default: all)."""
        with self._timed("wait_read"):
            buf = self.reader.take(key)
        self._uploaded(key, self._h2d(buf, dst, nbytes), nbytes if read is None else read)

    def _h2d(self, buf, dst, nbytes: int):
        """Issue the copy of the first ``nbytes`` of pinned ``buf`` into device bytes ``dst``; the
        buffer goes back to the reader once it is done. Returns the copy's event."""
        ev = self._event()
        with self._timed("h2d"):
            self._copy(self.h2d, dst[:nbytes], buf[0][:nbytes])
            ev.record(self.h2d)
        self.pool.put(buf, ev)  # the reader refills it after the copy (a synchronous stand-in's event: done)
        return ev

    def _uploaded(self, key, ev, read: int) -> None:
        """The group ``key`` copied in by ``ev`` is used next: the compute stream waits for the copy."""
        self.compute.wait_event(ev)
        self._tick(read)
        at = self.key_at.get(key)
        if at is not None:
            self.next_key = at + 1

    def _range_bytes(self, job: Job, a: int, b: int) -> int:
        return (self.traj.T + 1) * (b - a) * dtypes.itemsize(job.dtype)

    def _block(self, job: Job, dst, m: int):
        tdt = self.kern_dtype(job.dtype)
        isz = dtypes.itemsize(job.dtype)
        return dst[:(self.traj.T + 1) * m * isz].view(tdt).view(self.traj.T + 1, m)

    def kern_dtype(self, dtype: str):
        from ..ops.cuda import storage_torch_dtype
        return storage_torch_dtype(dtype)

    def _stage(self, job: Job, pas: int, a: int, b: int):
        """Streamed group: H2D into the next stage slot (after its last user finished)."""
        s = self._upload_staged((job.name, pas, a, b), self._range_bytes(job, a, b))
        return s, self._block(job, self.slots[s], b - a)

    def _upload_staged(self, key, nbytes: int, read: int | None = None) -> int:
        """:meth:`_upload` into the next stage slot, once its last user finished; returns the slot
        (the one uploaded ahead, if it holds ``key``)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == key:
            self.uploads_ahead += 1
            self._uploaded(key, ahead[2], nbytes if read is None else read)
            return ahead[1]
        # (a group uploaded ahead and not asked for: its slot is simply the next one written; the
        # copies into it are in the order of the h2d stream)
        s = self._next_stage_slot()
        self._upload(key, nbytes, self.slots[s], read)
        return s

    def _next_stage_slot(self) -> int:
        """The next stage slot of the ring; the h2d stream's next copy into it waits for its last user."""
        s = self.next_slot
        self.next_slot = (s + 1) % N_STAGE
        if self.slot_free[s] is not None:
            self.h2d.wait_event(self.slot_free[s])
        return s

    def _look_ahead(self) -> None:
        """Upload the plan's next group into the next stage slot now, if the reader has it ready,
        before the engine waits for the device (a group's or a tensor's Grams) and solves on the
        host: the copy then overlaps that wait and the solve instead of following them. The compute
        stream waits for it only where the group is used (:meth:`_upload_staged`). Needs two stage
        slots at least (:data:`N_STAGE`): the group in use keeps its own. Not for the pass-1 groups of
        a tensor resident on the device: those go into the arena (:meth:`gram`), which the tensor
        computing now may still be reading — a run of resident tensors gets no such overlap."""
        if self.ahead is not None or self.next_key >= len(self.keys):
            return
        key = self.keys[self.next_key]
        if key[1] == 1 and key[0] in self.on_arena:
            return
        buf = self.reader.take(key, wait=False)
        if buf is None:
            return
        if key[1] == 0:
            nbytes = self._layout([self.jobs[n] for n in key[0]], self.traj.T + 1)[1]
        else:
            nbytes = self._range_bytes(self.jobs[key[0]], key[2], key[3])
        s = self._next_stage_slot()
        self.ahead = (key, s, self._h2d(buf, self.slots[s], nbytes))

    def _release_slot(self, s: int) -> None:
        ev = self._event()
        ev.record(self.compute)
        self.slot_free[s] = ev

    def _resident_view(self, job: Job, a: int, b: int):
        if self.res is None or self.res[0] != job.name or b > self.res[2]:
            return None
        off = (self.traj.T + 1) * a * dtypes.itemsize(job.dtype)
        return self._block(job, self.res[1][off:], b - a)

    # -- writes in flight ----------------------------------------------------------------
    def after_writes(self, fn) -> None:
        """Run ``fn`` on this thread once the writes submitted so far have landed (module docstring)."""
        self.later.append((self.inflight, fn))
        self.inflight = []
        self._landed()

    def drain(self) -> None:
        if self.inflight:
            self.after_writes(lambda: None)
        self._landed(wait=True)

    def _landed(self, wait: bool = False) -> None:
        """Run, in order, what waited for writes that have landed (``wait``: for all of them);
        a writer thread's error is raised here."""
        while self.later:
            futures, fn = self.later[0]
            if not wait and not all(f.done() for f in futures):
                return
            with self._timed("wait_write"):
                for f in futures:
                    f.result()
            self.later.popleft()
            fn()

    # -- pass 1 ----------------------------------------------------------------------
    def gram(self, job: Job, ranges, resident: bool, acc: np.ndarray | None = None, on_range=None,
             then=None) -> np.ndarray:
        """The Gram over ``ranges`` (the sum and journal points of :meth:`Streamer.gram`)."""
        torch, T = self.torch, self.traj.T
        self._landed()
        self._release_resident()
        if job.on_host:  # (module docstring)
            return Streamer.gram(self, job, ranges, resident, acc, on_range, then)
        if then is not None:  # (the device's readers follow the plan: only an F64 host job is helped)
            then()
        f64 = dict(dtype=torch.float64, device=self.dev)
        with self._on(self.compute):
            dev_acc = None if acc is None else torch.from_numpy(np.array(acc, dtype=np.float64)).to(self.dev)
            gs = GramSum(job.numel, lambda: torch.zeros((T, T), **f64), ranges[0][0] if ranges else 0, dev_acc,
                         job.name)
            if resident and ranges and ranges[0][0] == 0:
                self.res = [job.name, self._resident_buffer((T + 1) * job.nbytes, job.name), 0]
            scratch = self._scratch(T, self.group_len(job))
            for a, b in ranges:
                for ga, gb in self.groups(job, a, b):  # a group never straddles a block: one piece
                    if self.res is not None:
                        dst = self.res[1][(T + 1) * ga * dtypes.itemsize(job.dtype):]
                        self._upload((job.name, 1, ga, gb), self._range_bytes(job, ga, gb), dst)
                        x, s = self._block(job, dst, gb - ga), None
                        self.res[2] = gb
                    else:
                        s, x = self._stage(job, 1, ga, gb)
                    with self._timed("gram"):
                        for _, _, blk in gs.pieces(ga, gb):
                            self.kern.gram(x, gb - ga, T, job.dtype, blk, scratch, self.fp16_deltas, self.precision)
                    if s is not None:
                        self._release_slot(s)
                if on_range is not None and gs.resumable(b):
                    on_range(b, gs.state().cpu().numpy())
            total = gs.result()
            self._look_ahead()
            with self._timed("wait_gram"):
                G = total.cpu().numpy()
        if not np.isfinite(G).all():
            self._release_resident()
            self._raise_nonfinite(job)
        return G

    def _release_resident(self) -> None:
        """Done with the resident tensor: its arena bytes are free once the compute stream passes
        this point, and the next upload into the arena waits for that (:meth:`_resident_buffer`),
        not only for the host waits that happen to come between."""
        if self.res is not None:
            self.arena_free = self._event()
            self.arena_free.record(self.compute)
        self.res = None

    def _resident_buffer(self, nbytes: int, name: str):
        """``nbytes`` of the arena for a resident trajectory (the arena grows only for a tensor
        the plan did not announce: a caller driving the passes itself)."""
        if self.arena is None or self.arena.numel() < nbytes:
            self.arena = None  # the old one goes back before the larger one is taken
            self.arena = self._device_empty(max(nbytes, self.arena_bytes), self.torch.uint8,
                                            f"the resident trajectories (first {name})")
        if self.arena_free is not None:
            self.h2d.wait_event(self.arena_free)
        return self.arena[:nbytes]

    def _scratch(self, T: int, g: int):
        need = self.kern.scratch_numel(T, g)
        if self.scratch is None or self.scratch.numel() < need:
            self.scratch = self._device_empty(need, self.torch.float32, "the Gram kernel's scratch")
        return self.scratch

    # -- pass 2 ----------------------------------------------------------------------
    def _outputs(self, K: int) -> None:
        """Output slots and pinned buffers for ``K`` outputs (:func:`out_slot_bytes`), made at the first
        combine (a run's K does not change)."""
        nbytes = out_slot_bytes(self.traj.T, self.stage, K)
        if self.out_bytes is not None and self.out_bytes >= nbytes:
            return
        self.drain()  # (nothing in flight from the buffers and slots replaced here)
        # allocated before any field changes: a device OOM here leaves the old slots consistent
        slots = [self._device_empty(nbytes, self.torch.uint8, "an output slot") for _ in range(2)]
        self.out_pool = _Pool(self.torch, N_OUT, nbytes, self.cuda)
        self.out_bytes, self.out_slots, self.out_free = nbytes, slots, [None, None]
        self.next_out = 0

    def _write(self, pieces, buf, ev, writers, also) -> None:
        """Writer thread: pinned outputs to the output files; ``pieces``: ``(job, a, b, offset)``,
        the K outputs of elements [a, b) of ``job`` at byte ``offset`` of ``buf``, copied into the
        writers' staging buffers (written around the page cache by their threads, io/direct.py)."""
        try:  # (the buffer goes back whatever fails: the engine may be waiting for it)
            if ev is not None:
                ev.synchronize()
            with self._timed("write"):
                # per writer and file, every piece at once: a group's tensors lie side by side and
                # share staged buffers
                for k, w in enumerate(writers):
                    per_file: dict = {}
                    for job, a, b, off in pieces:
                        isz = dtypes.itemsize(job.dtype)
                        n = (b - a) * isz
                        src = buf[1][off + k * n:off + (k + 1) * n]
                        for name in (job.name, also) if also is not None else (job.name,):
                            f, at = w.locate(name)
                            per_file.setdefault(id(f), (f, []))[1].append((at + a * isz, src))
                    for f, segs in per_file.values():
                        w.write_pieces(f, segs)
        finally:
            self.out_pool.put(buf)

    def combine(self, job: Job, ranges, resident: bool, alphas: np.ndarray, writers, also: str | None = None,
                count_read: bool = True, on_range=None, then=None) -> None:
        """Write ``len(writers)`` outputs (see :meth:`Streamer.combine`); returns once they are on their
        way, ``on_range`` runs once they are with the writers (module docstring)."""
        self._landed()
        if job.on_host:
            return Streamer.combine(self, job, ranges, resident, alphas, writers, also, count_read, on_range, then)
        if then is not None:
            then()
        torch, T, K = self.torch, self.traj.T, len(writers)
        self._outputs(K)
        tdt = self.kern_dtype(job.dtype)
        isz = dtypes.itemsize(job.dtype)
        with self._on(self.compute):
            A = torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)).to(self.dev)
            for a, b in ranges:
                for ga, gb in self.groups(job, a, b):
                    m = gb - ga
                    x, s = self._resident_view(job, ga, gb), None
                    if x is None:
                        s, x = self._stage(job, 2, ga, gb)
                    o = self._out_slot()
                    out = self.out_slots[o][:K * m * isz].view(tdt).view(K, m)
                    with self._timed("combine"):
                        self.kern.combine(x, m, T, job.dtype, A, out, self.fp16_deltas)
                    self._download(o, K * m * isz, s, [(job, ga, gb, 0)], writers, also)
                if on_range is not None:
                    self.after_writes(partial(on_range, b))
        self._release_resident()

    def _out_slot(self) -> int:
        """The next device output slot, once the compute stream may write it (its D2H is done)."""
        o = self.next_out
        self.next_out = 1 - o
        if self.out_free[o] is not None:
            self.compute.wait_event(self.out_free[o])
        return o

    def _download(self, o: int, nbytes: int, s: int | None, pieces, writers, also) -> None:
        """After the combine kernels just launched: stage slot ``s`` (None: none) free, the first
        ``nbytes`` of output slot ``o`` to a pinned buffer, and a writer thread puts ``pieces``
        (:meth:`_write`) to the output files."""
        done = self._event()
        done.record(self.compute)
        if s is not None:
            self.slot_free[s] = done
        with self._timed("wait_out"):
            pbuf = self.out_pool.get()
        copied = self._event()
        with self._timed("d2h"):
            self.d2h.wait_event(done)
            self._copy(self.d2h, pbuf[0][:nbytes], self.out_slots[o][:nbytes])
            copied.record(self.d2h)
        self.out_free[o] = copied
        self.inflight.append(self.writes.submit(self._write, pieces, pbuf, copied, writers, also))

    # -- groups of small tensors ---------------------------------------------------------
    # A MoE model has thousands of small tensors. Alone, each is a read, an upload, its Gram
    # kernels, a wait for the device and a host solve, its combine and a download: the device
    # idles while the host solves, once per tensor. A group (:func:`.plan.build`) is read into
    # one pinned buffer and uploaded into one stage slot; its Grams are summed on the device
    # and brought back together (one wait), solved in one batch on the host, and its outputs
    # come back in one download. Each tensor gets the kernel calls it gets alone (one Gram
    # call into a zeroed block, added to a zeroed total; one combine call), so the same bits.
    def groupable(self, job: Job) -> bool:
        """Whether ``job`` may run in a group: a device tensor that alone is one upload, one
        Gram call and one combine call (at most :meth:`group_len` elements)."""
        return not job.on_host and 0 < job.numel <= self.group_len(job)

    def prefetch_group(self, jobs: list[Job]) -> None:
        """Nothing: the device's reader threads read the groups ahead along the plan (:meth:`follow`),
        and the next group goes up before the device wait (:meth:`_look_ahead`)."""

    def prefetch_ahead(self, job: Job) -> None:
        """The host's read-ahead of the next tensor for a tensor computed on the host (F64); a
        device tensor's bytes are read ahead by the device's reader threads (:meth:`follow`)."""
        if job.on_host:
            super().prefetch_ahead(job)

    def open_group(self, jobs: list[Job]):
        """Upload the T+1 versions of ``jobs``: (the group on the device, no host spans)."""
        self._landed()
        self._release_resident()
        T1 = self.traj.T + 1
        offs, nbytes = self._layout(jobs, T1)
        if nbytes > self.stage:  # (the plan's group_bytes is the stage: never)
            raise RuntimeError(f"internal: a group of {nbytes} bytes for a stage of {self.stage}")
        s = self._upload_staged(self._tensors_key(jobs), nbytes, read=T1 * sum(j.nbytes for j in jobs))
        xs = [self._block(job, self.slots[s][o:], job.numel) for job, o in zip(jobs, offs)]
        return (s, xs), {}

    def gram_group(self, jobs: list[Job], group) -> np.ndarray:
        """The Grams (k, T, T) of a group: :meth:`gram` of each, bit for bit; one wait for all."""
        torch, T, (_, xs) = self.torch, self.traj.T, group
        self._landed()
        k = len(jobs)
        with self._on(self.compute):
            if self.grams is None or self.grams.shape[0] < k:
                self.grams = None
                self.grams = self._device_empty(k * T * T, torch.float64, "a group's Grams").view(k, T, T)
            blocks = self.grams[:k]
            blocks.zero_()
            scratch = self._scratch(T, max(self.group_len(j) for j in jobs))
            with self._timed("gram"):
                for job, x, blk in zip(jobs, xs, blocks):
                    self.kern.gram(x, job.numel, T, job.dtype, blk, scratch, self.fp16_deltas, self.precision)
                # GramSum adds each tensor's one block to a zeroed total: 0 + x, which is x + 0 bit for
                # bit (a -0.0 becomes +0.0 either way)
                blocks.add_(0.0)
            self._look_ahead()
            with self._timed("wait_gram"):
                Gs = blocks.cpu().numpy()
        self._check_finite(jobs, Gs)
        return Gs

    def combine_group(self, jobs: list[Job], group, alphas: np.ndarray, writers, count_read: bool) -> dict:
        """Write the outputs of a group (:meth:`combine` of each, bit for bit; ``alphas``: (k, K, T));
        returns once they are on their way (:meth:`after_writes` runs what waits for them)."""
        s, xs = group
        T, K = self.traj.T, len(writers)
        self._landed()
        offs, nbytes = self._layout(jobs, K)
        self._outputs(K)
        if nbytes > self.out_bytes:  # (out_bytes holds any group the plan makes: never)
            raise RuntimeError(f"internal: a group's {nbytes} output bytes for a slot of {self.out_bytes}")
        with self._on(self.compute):
            A = self.torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)).to(self.dev)
            o = self._out_slot()
            with self._timed("combine"):
                for job, x, a, off in zip(jobs, xs, A, offs):
                    out = self.out_slots[o][off:off + K * job.nbytes].view(self.kern_dtype(job.dtype))
                    self.kern.combine(x, job.numel, T, job.dtype, a, out.view(K, job.numel), self.fp16_deltas)
            self._download(o, nbytes, s, [(job, 0, job.numel, off) for job, off in zip(jobs, offs)], writers, None)
        return {}

    def close(self) -> None:
        """Stop the reader, writer and read-ahead threads and wait for the device (idempotent). What still waits
        for writes (:meth:`after_writes`) is dropped: a finished run drained it, an error's outputs
        go, and a graceful interrupt drains first (:func:`close_streamer`)."""
        if self.closed:
            return
        self.closed = True
        super().close()
        self.reader.cancel()
        self.rows.shutdown(wait=True)
        self.writes.shutdown(wait=True)
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)
        else:
            for stream in (self.h2d, self.compute, self.d2h):
                stream.synchronize()
        self.res = self.arena = self.slots = self.out_slots = self.scratch = self.grams = self.ahead = None
