"""The two passes over one tensor's trajectory, in bounded memory.

For each ``fit`` job the Gram is built from the mapped inputs (pass 1), the T x T
solve gives the weights, and the weighted sum is computed in staged chunks that the
writers' threads write to the output files around the page cache (pass 2,
:mod:`..io.direct`). When the tensor's T+1 versions plus its outputs fit in the
memory budget, its pages stay mapped between the passes, so every input byte is
read from storage once; otherwise the tensor is cut into element ranges (multiples
of ``GRAM_CHUNK``, so the Gram is the same bit for bit) whose pages are released
after each use, and the inputs are read twice. Mapped pages are released as soon as
a range is done, so the RSS stays within the budget whatever the model size.

The Gram of a tensor is summed in two levels (:mod:`.gramsum`), so a tensor cut at
block boundaries — into memory-budget ranges, or into pieces on several ranks — sums
to the same bits.
"""

from __future__ import annotations

import queue
import weakref
from functools import partial
from operator import itemgetter

import numpy as np

from .. import threads
from ..errors import InputError
from ..io import dtypes
from ..io.writer import ShardedWriter
from ..ops import Backend, fp64, get_backend, native
from ..ops.reference import GRAM_CHUNK, nonfinite_count
from .gramsum import GRAM_BLOCK, GramSum
from .plan import Policy
from .trajectory import Job, Trajectory

__all__ = ["GRAM_BLOCK", "Streamer"]

#: bytes of copies (widened or gathered versions) per kernel call, unless a chunk per kernel thread
#: needs more and an eighth of the memory budget allows it (:meth:`Streamer._subranges`)
COPY_BYTES = 32 << 20


class Streamer:
    """Runs the passes of :class:`Job` s of one :class:`Trajectory` with one op backend."""

    def __init__(self, traj: Trajectory, backend: Backend, memory_budget: int, fp16_deltas: bool = False):
        self.traj = traj
        self.backend = backend
        self.reference = get_backend("reference")
        self.fp64 = Backend("fp64", fp64)
        self.policy = Policy(traj.T, memory_budget)
        self.budget = self.policy.budget
        self.fp16_deltas = fp16_deltas
        self.progress = None  # a progress bar, set by the run
        self.bytes_read = 0
        self._ahead = None  # (jobs, places) of the group read ahead last (prefetch_group)
        self._wide = None  # combine's scratch for outputs in another dtype (_combine_chunk)
        self._gathers: list = []  # per version, its buffer for ranges gathered across files (views)
        self._ahead_q: queue.SimpleQueue | None = None  # the read-ahead thread's requests

    def gram_precision(self) -> str:
        """How the Gram's products are computed (``relex_report.json``): the host kernels multiply
        and add chunk partials in fp32 (fp64 for F64 tensors) and sum the partials in fp64. (A
        device backend runs on a :class:`.gpu.DeviceStreamer`, which says its own.)"""
        return "ieee"

    # -- ranges and pages ------------------------------------------------------------
    def _locs(self, job: Job):
        yield self.traj.base.tensors[job.name]
        for ck in self.traj.ckpts:
            yield ck.tensors[job.name]

    def _subranges(self, job: Job, a: int, b: int) -> list[tuple[int, int]]:
        """``[a, b)`` in the pieces the kernels take one at a time. Where a version assembled from
        several files passes from one file to the next inside a chunk (the only ranges gathered
        from two files): on the native kernels, pieces gathering at most ``COPY_BYTES`` (or an
        eighth of the memory budget) of such chunks; elsewhere the chunk alone. Where every element
        is copied (a version in another dtype, columns of a ``Shard(d > 0)`` tensor): pieces of
        ``COPY_BYTES`` of copies, widened to a chunk per kernel thread within an eighth of the
        memory budget. Every piece starts on a ``GRAM_CHUNK`` edge, so the Gram's chunks, and bits,
        are unchanged."""
        locs = list(self._locs(job))
        assembled = [(loc, loc.file.segments[loc.file.alias.get(job.name, job.name)])
                     for loc in locs if not loc.file.groupable]
        if not job.mixed and not assembled:
            return [(a, b)]
        C = GRAM_CHUNK
        points = {a, b}
        # the versions whose every element is copied (stored in another dtype, or columns gathered
        # across files): bounded pieces, each still wide enough to keep the kernels' threads busy (a
        # thread per chunk at most). Counted per copied version: verl's fp32 masters beside a bf16
        # base copy the base alone, and pieces sized as if all T+1 were copied were 2 chunks wide
        copied = sum(map(partial(_copied, job), locs))
        if copied:
            per_chunk = copied * 8 * C
            threads = native.get_num_threads() if native.available()[0] else 1
            step = max(1, COPY_BYTES // per_chunk, min(threads, self.budget // 8 // per_chunk)) * C
            points |= set(range(a, b, step))
        # row blocks are read in place; only the chunks across a boundary are copied. The native
        # kernels take a range held in pieces in one call (:meth:`pieces`), as long as the chunks it
        # gathers (every assembled version's) stay within the copy allowance above; the other
        # backends take a piece at a time
        edges = {x for _, segs in assembled for s0, s1, _, _ in segs for x in (s0, s1) if a < x < b}
        if self.in_pieces(job):
            shared = sorted({x // C for x in edges if x % C})
            most = max(1, max(COPY_BYTES, self.budget // 8) // (len(assembled) * dtypes.itemsize(job.dtype) * C))
            points |= {k * C for k in shared[most::most]}
        else:
            points |= {p for x in edges for p in (max(a, x // C * C), min(b, x // C * C + C))}
        pts = sorted(points)
        return list(zip(pts, pts[1:])) or [(a, b)]

    def views(self, job: Job, a: int, b: int):
        """Elements ``[a, b)`` of the base and of each checkpoint, in ``job.dtype``. A version
        assembled from several files (rank files, DCP chunks) is gathered where the range crosses
        from one file to the next, into a buffer of this streamer kept for that version: the
        rows are valid until the next call."""
        rows = [self._row(i, loc, job, a, b) for i, loc in enumerate(self._locs(job))]
        return rows[0], rows[1:]

    def _row(self, i: int, loc, job: Job, a: int, b: int) -> np.ndarray:
        """Version ``i``'s elements ``[a, b)`` in ``job.dtype`` (:meth:`views`)."""
        f = loc.file
        r = f.view(job.name, a, b) if f.groupable else f.view(job.name, a, b, scratch=partial(self._gather_buffer, i))
        # a version stored in another dtype: read exactly into the computed one
        return _widen(r, loc.info.dtype, job.dtype) if job.mixed else r

    def in_pieces(self, job: Job) -> bool:
        """Whether ``job``'s ranges go to the native kernels in pieces (:meth:`pieces`): a version is
        assembled from several files. One call per range then spreads every chunk over the
        threads; a call per file's piece ran each piece on at most its chunks' count of threads
        (one for the chunk across two files), and its views cost Python per version and piece."""
        return (self.backend.name == "cpu" and self._ops(job) is self.backend
                and not all(loc.file.groupable for loc in self._locs(job)))

    def pieces(self, job: Job, a: int, b: int, gather: bool):
        """Elements ``[a, b)`` of every version as pieces for :func:`~..ops.native.gram_pieces` /
        ``combine_pieces``: ``(starts, rows, keep)``, starts relative to ``a``, rows the addresses
        of each piece's versions, ``keep`` the arrays behind them (valid until the next call, like
        :meth:`views`). A version assembled from files in ``job.dtype`` is read in place, piece by
        file; the others as :meth:`views` reads them. ``gather`` (the Gram: ``a`` on a chunk edge):
        a chunk across two files of a version is gathered into its buffer, so pieces start on chunk
        edges, as the Gram's bits need; the weighted sum takes pieces anywhere."""
        C, isz, n = GRAM_CHUNK, dtypes.itemsize(job.dtype), b - a
        versions = []  # per version: sorted [(start, end, array)] covering [0, n)
        for i, loc in enumerate(self._locs(job)):
            f = loc.file
            if f.groupable or _copied(job, loc):
                segs = [(0, n, self._row(i, loc, job, a, b))]
            else:
                segs = [(lo - a, hi - a, pf.view(local, lo - s0, hi - s0)) for lo, hi, s0, pf, local in
                        f._pieces(job.name, a, b)]
                cut = sorted({s0 // C for s0, _, _ in segs[1:] if s0 % C}) if gather else []
                if cut:  # each chunk across two files gathered (AssembledTensors.view) into the version's buffer
                    buf = self._gather_buffer(i, len(cut) * C * isz)
                    holes = [(k * C, min(n, k * C + C)) for k in cut]
                    parts = [(h0, h1, f.view(job.name, a + h0, a + h1, scratch=lambda m, o=j * C * isz: buf[o:o + m]))
                             for j, (h0, h1) in enumerate(holes)]
                    segs = sorted(parts + [(x0, x1, arr[x0 - s0:]) for s0, s1, arr in segs
                                           for x0, x1 in _minus(s0, s1, holes)], key=itemgetter(0))
            versions.append(segs)
        starts = np.array(sorted({s0 for segs in versions for s0, _, _ in segs} | {n}), dtype=np.int64)
        rows = np.empty((len(starts) - 1, len(versions)), dtype=np.uint64)
        for v, segs in enumerate(versions):
            s0 = np.array([s for s, _, _ in segs], dtype=np.int64)
            addr = np.array([arr.ctypes.data for _, _, arr in segs], dtype=np.int64)
            j = np.searchsorted(s0, starts[:-1], side="right") - 1
            rows[:, v] = (addr[j] + (starts[:-1] - s0[j]) * isz).astype(np.uint64)
        return starts.astype(np.uint64), rows, versions

    def _gather_buffer(self, i: int, nbytes: int) -> np.ndarray:
        """Version ``i``'s reusable gather buffer, of at least ``nbytes`` (:meth:`views`,
        :meth:`pieces`; :meth:`_subranges` bounds what one call gathers)."""
        bufs = self._gathers
        bufs.extend([None] * (i + 1 - len(bufs)))
        if bufs[i] is None or bufs[i].nbytes < nbytes:
            bufs[i] = np.empty(nbytes, dtype=np.uint8)
        return bufs[i]

    def release(self, job: Job, a: int, b: int) -> None:
        for loc in self._locs(job):
            loc.file.release(job.name, a, b)

    def prefetch(self, job: Job, a: int = 0, b: int | None = None) -> None:
        """Page-cache read-ahead of elements [a, b) of every version, at most the memory budget's
        worth: a tensor resident on a device can be far larger than host RAM (an 8B embedding at
        T = 100 is 124 GB), and asking for all of it would evict what is being read now."""
        b = job.numel if b is None else b
        b = min(b, a + max(1, self.budget // ((self.traj.T + 1) * dtypes.itemsize(job.dtype))))
        for loc in self._locs(job):
            loc.file.prefetch(job.name, a, b)

    def _read_ahead(self, job: Job, ranges, i: int, resident: bool, then=None) -> None:
        """Before range ``i`` of a tensor cut into ranges, start the storage reads of range ``i+1``
        (page-cache read-ahead, asynchronous): on a cold cache they overlap this range's kernels.
        A resident tensor was read ahead whole, while the tensor before it computed. Before the
        last range, ``then()``: the caller's read-ahead of the work after this tensor, asked for
        no earlier (an 8B embedding at T = 100 is 124 GB: its own stream would evict it)."""
        if not resident and i + 1 < len(ranges):
            self.read_ahead(self.prefetch, job, *ranges[i + 1])
        if then is not None and i == len(ranges) - 1:
            then()

    # The read-ahead calls run on a thread of their own, in the order asked. Asking the kernel
    # for a tensor's pages (posix_fadvise WILLNEED) returns only once every read is queued on
    # the device: on a cold cache, for most of the time the reads take. On this thread the kernels
    # of the work at hand run meanwhile; on the main thread they waited for the asking (a 31 GB
    # run larger than RAM read at 0.56x the rate of one reader thread per file).
    def read_ahead(self, fn, *args) -> None:
        """Run ``fn(*args)`` (a prefetch: advice, never an error) on the read-ahead thread."""
        if self._ahead_q is None:
            q = self._ahead_q = queue.SimpleQueue()
            # its end registered first: an interrupt raised as the thread starts still finds it
            self._ahead_end = weakref.finalize(self, _stop_read_ahead, q)  # (also a streamer never closed)
            threads.start(_read_ahead_loop, (q,), name="relex-read-ahead")
        self._ahead_q.put((fn, args))

    def prefetch_ahead(self, job: Job) -> None:
        """:meth:`prefetch` of the next whole tensor, on the read-ahead thread."""
        self.read_ahead(self.prefetch, job)

    def close(self) -> None:
        """Close the progress bar and stop the read-ahead thread; what it was given and has not asked
        for yet is dropped (the reads already asked for go on in the kernel)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self._ahead_q is not None:
            self._ahead_q = None
            self._ahead_end()

    def after_writes(self, fn) -> None:
        """Run ``fn`` on this thread once every output asked for so far is handed to the writers (the
        journal's records of written ranges and tensors wait for that, and sync the writers before
        they are written): here at once, since the host passes stage and commit before they return;
        a device pipeline runs it later (:meth:`drain`)."""
        fn()

    def drain(self) -> None:
        """Wait for the outputs still being written and run what waits for them (:meth:`after_writes`)."""

    def _tick(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if self.progress is not None:
            self.progress.update(nbytes)

    def _ops(self, job: Job) -> Backend:
        if job.dtype == "F64":  # every kernel computes in fp32: F64 tensors take the fp64 path
            return self.fp64
        return self.backend if self.backend.supports(job.dtype) else self.reference

    # -- pass 1 ----------------------------------------------------------------------
    def gram(self, job: Job, ranges, resident: bool, acc: np.ndarray | None = None, on_range=None,
             then=None) -> np.ndarray:
        """The Gram over ``ranges``, added to ``acc`` (a resumed partial sum) when given.

        Two-level sum (:class:`.gramsum.GramSum`). ``on_range(b, acc)`` is called
        after each range ``[a, b)`` that ends where ``acc`` alone is the whole state — at
        a block boundary or inside block 0 — so a run resumed from it (the journal) sums
        the same bits. Ranges that start inside a block must start inside block 0. ``then()``
        runs before the last range (:meth:`_read_ahead`).
        """
        T = self.traj.T
        gs = GramSum(job.numel, lambda: np.zeros((T, T), dtype=np.float64), ranges[0][0] if ranges else 0,
                     None if acc is None else acc.copy(), job.name)
        ops, isz, in_pieces = self._ops(job), dtypes.itemsize(job.dtype), self.in_pieces(job)
        for i, (a, b) in enumerate(ranges):
            self._read_ahead(job, ranges, i, resident, then)
            for p0, p1 in self._subranges(job, a, b):
                if in_pieces:
                    starts, rows, keep = self.pieces(job, p0, p1, gather=True)
                    for c0, c1, blk in gs.pieces(p0, p1):
                        native.gram_pieces(*_clip(starts, rows, isz, c0 - p0, c1 - p0), c1 - c0, job.dtype, blk,
                                           fp16_deltas=self.fp16_deltas)
                    del keep
                    continue
                base, hist = self.views(job, p0, p1)
                for c0, c1, blk in gs.pieces(p0, p1):
                    ops.gram(base[c0 - p0:c1 - p0], [h[c0 - p0:c1 - p0] for h in hist], job.dtype, blk,
                             fp16_deltas=self.fp16_deltas)
                del base, hist
            if not resident:
                self.release(job, a, b)
            self._tick((T + 1) * (b - a) * dtypes.itemsize(job.dtype))
            if on_range is not None and gs.resumable(b):
                on_range(b, gs.state())
        total = gs.result()
        if not np.isfinite(total).all():
            self._raise_nonfinite(job)
        return total

    def _raise_nonfinite(self, job: Job) -> None:
        """Name the first input holding NaN/Inf in this tensor (error path: a plain scan)."""
        labelled = [("the base checkpoint", self.traj.base.tensors[job.name])]
        labelled += [(f"checkpoint step {ck.step}", ck.tensors[job.name]) for ck in self.traj.ckpts]
        for label, loc in labelled:
            n = job.numel
            step = 1 << 24
            bad = sum(nonfinite_count(loc.file.view(job.name, a, min(n, a + step)), loc.info.dtype)
                      for a in range(0, n, step))
            loc.file.release(job.name)
            if bad:
                raise InputError(f"{label} tensor {job.name} holds {bad} NaN/Inf values ({loc.file.path})")
        # finite values whose deltas (or their squares in the fp32 Gram) overflow: name the largest
        base = self.traj.base.tensors[job.name]
        worst = (0.0, None)
        for ck in self.traj.ckpts:
            loc = ck.tensors[job.name]
            n, step, big = job.numel, 1 << 24, 0.0
            for a in range(0, n, step):
                b = min(n, a + step)
                d = (dtypes.to_float32(loc.file.view(job.name, a, b), loc.info.dtype).astype(np.float64)
                     - dtypes.to_float32(base.file.view(job.name, a, b), base.info.dtype))
                big = max(big, float(np.abs(d).max(initial=0.0)))
            loc.file.release(job.name)
            if big >= worst[0]:
                worst = (big, ck)
        base.file.release(job.name)
        big, ck = worst
        where = f"checkpoint step {ck.step} ({ck.tensors[job.name].file.path})" if ck is not None else "the inputs"
        raise InputError(f"tensor {job.name}: deltas from the base reach {big:.3g} in {where}; their squares "
                         "overflow the fp32 Gram (values too large to fit)")

    # -- pass 2 ----------------------------------------------------------------------
    def combine(self, job: Job, ranges, resident: bool, alphas: np.ndarray, writers: list[ShardedWriter],
                also: str | None = None, count_read: bool = True, on_range=None, then=None) -> None:
        """Write ``len(writers)`` outputs; ``also`` names a tied head written with the same values.

        ``count_read``: whether this pass reads the inputs anew (False when pass 1 left
        them resident), for the progress bar and the bytes-read figure. ``on_range(b)``
        is called once the outputs of each range ``[a, b)`` are written (here at once; a
        device pipeline's writer threads land them later: :meth:`after_writes`). ``then``: as
        for :meth:`gram` (:meth:`_read_ahead`).
        """
        T = self.traj.T
        # (each op converts the fp64 alphas: to fp32, but on the fp64 path)
        ops, isz, in_pieces = self._ops(job), dtypes.itemsize(job.dtype), self.in_pieces(job)
        for i, (a, b) in enumerate(ranges):
            self._read_ahead(job, ranges, i, resident or not count_read, then)
            for p0, p1 in self._subranges(job, a, b):
                if in_pieces:
                    starts, rows, keep = self.pieces(job, p0, p1, gather=False)

                    def compute(c0, c1, o):
                        native.combine_pieces(*_clip(starts, rows, isz, c0 - p0, c1 - p0), c1 - c0, alphas, job.dtype,
                                              o, fp16_deltas=self.fp16_deltas)
                else:
                    keep = self.views(job, p0, p1)

                    def compute(c0, c1, o, base=keep[0], hist=keep[1]):
                        ops.combine(base[c0 - p0:c1 - p0], [h[c0 - p0:c1 - p0] for h in hist], alphas, job.dtype, o,
                                    fp16_deltas=self.fp16_deltas)
                # in staged chunks of a few MiB (cut on the first writer's blocks), written around
                # the page cache by the writers' threads while the next chunk computes (io/direct.py)
                for c0, c1 in writers[0].chunks(job.name, p0, p1) if writers else ():
                    outs = [w.stage(job.name, c0, c1) for w in writers]
                    done = 0  # (a committed buffer is the writer's; the others go back on failure)
                    try:
                        self._combine_chunk(job, partial(compute, c0, c1), c1 - c0, outs)
                        for w, o in zip(writers, outs):
                            if also is not None:
                                w.write(also, c0, o)
                            w.commit(job.name, c0, o)
                            done += 1
                    except BaseException:
                        for w, o in zip(writers[done:], outs[done:]):
                            w.discard(o)
                        raise
                del keep, compute
            self.release(job, a, b)
            if count_read:
                self._tick((T + 1) * (b - a) * dtypes.itemsize(job.dtype))
            if on_range is not None:
                on_range(b)

    def _combine_chunk(self, job: Job, compute, n: int, outs: list[np.ndarray]) -> None:
        """``compute(targets)`` (the weighted sums of ``n`` elements into ``targets``) into ``outs``."""
        if job.out_dtype == job.dtype:
            compute(outs)
            return
        # computed in job.dtype, rounded to the output's dtype to nearest even (in a scratch
        # buffer kept for the run: fresh pages per chunk would cost more than the chunk)
        raw = np.dtype(dtypes.raw_numpy(job.dtype))
        row = n * raw.itemsize
        if self._wide is None or self._wide.nbytes < row * len(outs):
            self._wide = np.empty(row * len(outs), dtype=np.uint8)
        wide = [self._wide[k * row:(k + 1) * row].view(raw) for k in range(len(outs))]
        compute(wide)
        for o, x in zip(outs, wide):
            dtypes.from_float32(x.astype(np.float32, copy=False), job.out_dtype, out=o)

    # -- groups of small tensors -------------------------------------------------------
    # A MoE model has thousands of small tensors; per tensor and per input file, a view, its
    # validation, a release and a prefetch cost more than the tensor's bytes. A group of
    # whole, resident tensors is mapped once (addresses into one buffer per file), each
    # tensor's Gram and weighted sum run on the same native kernels with the same sums as
    # alone (same bits), and the pages are released once per file span.
    def groupable(self, job: Job) -> bool:
        """Whether ``job`` may run in a group (:func:`.plan.build` checks its size): on the native
        kernels only (the reference and the fp64 path keep the per-tensor passes), stored and
        written in the dtype it is computed in."""
        return self.backend.name == "cpu" and self._ops(job) is self.backend and not job.on_host

    def _group_places(self, jobs: list[Job]):
        """The input files of a group's versions (distinct, in order met) and, job-major ((k, T+1)
        flattened, like the tables of the native calls), each version's file index and bytes
        [begin, end); with the per-file span [lo, hi) it uses and its bytes in use."""
        # per checkpoint, over numpy arrays; checkpoints sharing a layout (the usual run: the same
        # index and headers in each) are looked into once (a MoE group has thousands of tensors)
        names, memo = [job.name for job in jobs], {}
        versions = [v.places(names, memo) for v in (self.traj.base, *self.traj.ckpts)]
        fobjs = list(dict.fromkeys(f for files, _, _ in versions for f in files))  # distinct, in the order met
        number = {f: i for i, f in enumerate(fobjs)}
        fi = np.stack([np.array([number[f] for f in files], dtype=np.int64)[local] for files, local, _ in versions])
        fi = fi.T.ravel()  # job-major: (k, T+1)
        begin = np.stack([b for _, _, b in versions]).T.ravel()
        end = begin + np.repeat([job.nbytes for job in jobs], len(versions))
        lo = np.full(len(fobjs), np.iinfo(np.int64).max)
        hi = np.zeros(len(fobjs), dtype=np.int64)
        np.minimum.at(lo, fi, begin)
        np.maximum.at(hi, fi, end)
        used = np.bincount(fi, weights=end - begin, minlength=len(fobjs))
        return fobjs, fi, begin, lo, hi, used

    @staticmethod
    def _prefetch_spans(fobjs, lo, hi, used) -> None:
        """Page-cache read-ahead of each file's span of a group, unless the span is mostly other
        tensors (a checkpoint stored in another order than the base): that would read bytes no one asked for."""
        for f, l, h, u in zip(fobjs, lo.tolist(), hi.tolist(), used.tolist()):
            if h - l <= 2 * u + (1 << 20):
                f.prefetch_bytes(l, h)

    def prefetch_group(self, jobs: list[Job]) -> None:
        """Start the storage reads of the group ``jobs`` (the next one, on the read-ahead thread)
        while the work before it computes, as for the next tensor: a group that asked for its
        bytes only when it opened waited for all of them on a cold cache. :meth:`open_group` of
        the same list takes the places found here and asks no more."""
        places = self._group_places(jobs)
        fobjs, _, _, lo, hi, used = places
        self.read_ahead(self._prefetch_spans, fobjs, lo, hi, used)
        self._ahead = (jobs, places)

    def open_group(self, jobs: list[Job]):
        """Map the inputs of ``jobs``: per job the addresses of its T+1 versions, and per file
        ``[file, buffer, address, lo, hi]`` (the buffer keeps the map; ``[lo, hi)`` the bytes used)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is jobs:  # read ahead while the work before it ran
            fobjs, fi, begin, lo, hi, used = ahead[1]
        else:
            fobjs, fi, begin, lo, hi, used = self._group_places(jobs)
            self._prefetch_spans(fobjs, lo, hi, used)
        bufs = [f.buffer() for f in fobjs]
        base = np.array([b.ctypes.data for b in bufs], dtype=np.int64)
        files = {id(f): [f, buf, int(a), int(l), int(h)] for f, buf, a, l, h in zip(fobjs, bufs, base, lo, hi)}
        rows = (base[fi] + begin).reshape(len(jobs), self.traj.T + 1)
        return rows, files

    def gram_group(self, jobs: list[Job], rows) -> np.ndarray:
        """The Grams (k, T, T) of a group (:meth:`gram` of each whole tensor, bit for bit: one
        block, summed from zero), in one native call."""
        T, k = self.traj.T, len(jobs)
        Gs = np.zeros((k, T, T), dtype=np.float64)
        table = np.empty((k, T + 4), dtype=np.uint64)
        table[:, :2] = [(job.numel, dtypes.DTYPE_CODES[job.dtype]) for job in jobs]
        table[:, 2] = Gs.ctypes.data + np.arange(k, dtype=np.uint64) * (T * T * 8)
        table[:, 3:] = rows
        native.gram_table(table, self.fp16_deltas)
        self._tick((T + 1) * sum(job.nbytes for job in jobs))
        self._check_finite(jobs, Gs)
        return Gs

    def _check_finite(self, jobs: list[Job], Gs: np.ndarray) -> None:
        """The error of the first tensor of a group whose Gram (``Gs[i]``) is not finite."""
        finite = np.isfinite(Gs).all(axis=(1, 2))
        if not finite.all():
            self._raise_nonfinite(jobs[int(np.argmin(finite))])

    def combine_group(self, jobs: list[Job], rows, alphas: np.ndarray, writers: list[ShardedWriter],
                      count_read: bool) -> dict:
        """Write the outputs of a group (:meth:`combine` of each, bit for bit) in one native call;
        returns the output files' spans like :meth:`open_group`. ``count_read``: as for :meth:`combine`."""
        T, K, k = self.traj.T, len(writers), len(jobs)
        if count_read:
            self._tick((T + 1) * sum(job.nbytes for job in jobs))
        A = np.ascontiguousarray(alphas, dtype=np.float32)  # (k, K, T), as combine converts them
        outs: dict[int, list] = {}
        table = np.zeros((k, T + K + 4), dtype=np.uint64)
        table[:, :2] = [(job.numel, dtypes.DTYPE_CODES[job.dtype]) for job in jobs]
        table[:, 2] = A.ctypes.data + np.arange(k, dtype=np.uint64) * (K * T * 4)
        table[:, 3:T + 4] = rows
        if not writers:
            return outs
        # runs of tensors whose outputs lie back to back and fit a staging buffer: each run in one
        # native call into staged buffers, written around the page cache (io/direct.py) while the
        # next run computes; a tensor larger than a buffer is written through the output's map
        for i0, i1, lo, hi in _staging_runs(jobs, writers[0]):
            # (the targets' headers differ in length, so each writer has its own offsets: the
            # same run starts at its own byte lo in each)
            where = [w.locate(jobs[i0].name) for w in writers]
            staged = [w.stage_bytes(at, hi - lo) for w, (_, at) in zip(writers, where)] if hi > lo else []
            done = 0
            try:
                for j in range(i0, i1):
                    job = jobs[j]
                    if not job.numel:
                        continue  # an empty tensor has no place to write (address 0)
                    for o, w in enumerate(writers):
                        f, at = w.locate(job.name)
                        table[j, T + 4 + o] = (staged[o].ctypes.data + at - where[o][1] if staged
                                               else _address(outs, f, at, job.nbytes))
                native.combine_table(table[i0:i1], T, K, self.fp16_deltas)
                for w, (f, at), arr in zip(writers, where, staged):
                    w.commit_bytes(f, at, arr)
                    done += 1
            except BaseException:
                for w, arr in zip(writers[done:], staged[done:]):
                    w.discard(arr)
                raise
        return outs

    @staticmethod
    def release_group(*spans: dict) -> None:
        """Release the pages of every file span of a group (inputs and outputs), once per file."""
        for files in spans:
            for f, _, _, lo, hi in files.values():
                f.release_bytes(lo, hi)

    def copy(self, job: Job, writers: list[ShardedWriter]) -> None:
        loc = self.traj.base.tensors[job.name]
        n = job.numel
        step = max(1, self.budget // (dtypes.itemsize(job.dtype) * (1 + len(writers))))
        for a in range(0, n, step):
            b = min(n, a + step)
            src = loc.file.view(job.name, a, b)
            for w in writers:
                w.write(job.name, a, src)
            del src
            loc.file.release(job.name, a, b)
            self._tick((b - a) * dtypes.itemsize(job.dtype))


def _read_ahead_loop(q: queue.SimpleQueue) -> None:
    """The read-ahead thread: runs the prefetches put on ``q`` until None. A prefetch is advice:
    one that fails (a file gone, out of descriptors) is skipped, and the read that follows it
    reports what is wrong. (It keeps no reference to a finished task: the streamer it names must
    be free to go.)"""
    while (task := q.get()) is not None:
        try:
            task[0](*task[1])
        except Exception:
            pass
        del task


def _stop_read_ahead(q: queue.SimpleQueue) -> None:
    """End the read-ahead thread of ``q``: the tasks not begun are dropped (after an error or an
    interrupt, no budget's worth of reads goes on in the background), then None."""
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    q.put(None)


def _staging_runs(jobs: list[Job], writer: ShardedWriter) -> list[tuple[int, int, int, int]]:
    """``jobs`` (a group, in order) as runs ``(i0, i1, lo, hi)``: jobs ``[i0, i1)`` whose outputs are
    the bytes ``[lo, hi)`` of one file of ``writer``, back to back, at most a staging buffer; a
    run with ``lo == hi`` is written through the maps (one tensor larger than a buffer, or only
    empty ones). Another writer of the same specs has the same layout but for where its data
    starts (its header's length): the same runs, each at that writer's offset of its first job."""
    cap = writer.writes.chunk_bytes
    runs: list[list] = []
    for i, job in enumerate(jobs):
        f, at = writer.locate(job.name)
        last = runs[-1] if runs else None
        if last and (not job.numel or (last[4] is f and at == last[3] and at + job.nbytes - last[2] <= cap)):
            last[1] = i + 1
            last[3] += job.nbytes if job.numel else 0
        elif job.nbytes > cap:
            runs.append([i, i + 1, at, at, None])  # through the map
        else:
            runs.append([i, i + 1, at, at + job.nbytes, f])
    return [(i0, i1, lo, hi) for i0, i1, lo, hi, _ in runs]


def _address(files: dict, f, b: int, nbytes: int) -> int:
    """The address of byte ``b`` of ``f`` (a reader or writer file, mapped once per group);
    ``files[id(f)]`` is ``[file, buffer, address, lo, hi]``, its span widened to ``[b, b + nbytes)``."""
    e = files.get(id(f))
    if e is None:
        buf = f.buffer()
        e = files[id(f)] = [f, buf, buf.ctypes.data, b, b + nbytes]
    else:
        e[3], e[4] = min(e[3], b), max(e[4], b + nbytes)
    return e[2] + b


def _copied(job: Job, loc) -> bool:
    """Whether every element of this version of ``job`` is copied before the kernels read it: stored
    in another dtype (widened), or the columns of a ``Shard(d > 0)`` tensor (gathered across files)."""
    f = loc.file
    return loc.info.dtype != job.dtype or (not f.groupable and any(
        seg[2] is None for seg in f.segments[f.alias.get(job.name, job.name)]))


def _minus(s0: int, s1: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[s0, s1)`` less the sorted, disjoint ``holes``, as intervals."""
    out, x = [], s0
    for h0, h1 in holes:
        if h1 <= x or h0 >= s1:
            continue
        if h0 > x:
            out.append((x, h0))
        x = max(x, h1)
    if x < s1:
        out.append((x, s1))
    return out


def _clip(starts: np.ndarray, rows: np.ndarray, isz: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Pieces (:meth:`Streamer.pieces`) of ``[lo, hi)`` of their range, with starts relative to ``lo``."""
    st = starts.astype(np.int64)
    i0 = int(np.searchsorted(st, lo, side="right")) - 1
    i1 = int(np.searchsorted(st, hi, side="left"))
    out = np.concatenate([st[i0:i1], [hi]]) - lo
    out[0] = 0
    r = rows[i0:i1].copy()
    r[0] += np.uint64((lo - int(st[i0])) * isz)
    return out.astype(np.uint64), r


def _widen(raw: np.ndarray, stored: str, dtype: str) -> np.ndarray:
    """Raw elements stored as ``stored`` as raw elements of the wider ``dtype`` (exact)."""
    if stored == dtype:
        return raw
    x = raw if stored == "F64" else dtypes.to_float32(raw, stored)
    return x.astype(dtypes.raw_numpy(dtype), copy=False)
