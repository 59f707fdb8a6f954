"""One rank's part of an SPMD run (:mod:`.distributed` has the protocol): :func:`execute`.

The rank runs its items of the one :mod:`.plan` (``world`` > 1: its whole tensors, then
a ``gram`` item per Gram block of its pieces of split tensors, and their ``combine``
items after the all-reduce) with the same :class:`.executor.Executor` as one process.
Each phase catches its own error and reports it at the next status all-reduce
(:meth:`.distributed.Group.status`), so every rank leaves at the same point with the
same message, and rank 0 removes the partial outputs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from .. import fit as fitmath
from ..errors import UsageError
from ..io import dtypes
from ..io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, merged_spans
from ..ops import resolve_backend
from . import journal, plan, report
from .distributed import DistributedError, Group, _Terminated, _test_hook, detect, kernel_mismatch
from .executor import Executor, progress_bar
from .gpu import close_streamer, make_streamer, stage_fields
from .gramsum import GRAM_BLOCK, sum_blocks
from .output import STATE_NAME, OutputSet, target_dir_name
from .plan import resolve_budget
from .report import RunResult
from .trajectory import Trajectory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# -- bytes shared with other ranks ----------------------------------------------------
def _spans(pieces, writers: list[ShardedWriter], tied: tuple[str, str] | None) -> dict[str, list[tuple[int, int]]]:
    """Byte spans [lo, hi) of each output file that this rank's pieces write, merged."""
    out: dict[str, list[tuple[int, int]]] = {}
    for p in pieces:
        names = [p.job.name] + ([tied[0]] if tied and p.job.name == tied[1] else [])
        for w in writers:
            for name in names:
                f = w._where[name]
                isz = dtypes.itemsize(f.specs[name].dtype)
                lo = f.offsets[name] + p.a * isz
                out.setdefault(f.path, []).append((lo, lo + (p.b - p.a) * isz))
    return {path: merged_spans(spans) for path, spans in out.items()}


def _edge_bytes(spans: dict[str, list[tuple[int, int]]]) -> list[tuple[str, int, bytes]]:
    """This rank's bytes in partial pages (pages it may share with another rank), read back now."""
    out = []
    for path, ss in spans.items():
        cut = []
        for lo, hi in ss:
            if lo % _PAGE:
                cut.append((lo, min(hi, lo - lo % _PAGE + _PAGE)))
            if hi % _PAGE and hi - hi % _PAGE >= lo:
                cut.append((max(lo, hi - hi % _PAGE), hi))
        if not cut:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            out += [(path, lo, os.pread(fd, hi - lo, lo)) for lo, hi in sorted(set(cut))]
        finally:
            os.close(fd)
    return out


def _rewrite(edges: list[tuple[str, int, bytes]]) -> None:
    by_path: dict[str, list[tuple[int, bytes]]] = {}
    for path, lo, data in edges:
        by_path.setdefault(path, []).append((lo, data))
    for path, items in by_path.items():
        fd = os.open(path, os.O_WRONLY)
        try:
            for lo, data in items:
                if os.pwrite(fd, data, lo) != len(data):
                    raise OSError(f"short write to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated()

    prev = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def execute(traj: Trajectory, opts, targets: list[int], out_dir: str, *, comps=None, memory_budget=None,
            backend=None, overwrite=False, shard_bytes=DEFAULT_SHARD_BYTES, progress=False, input_dirs=(),
            extra_report=None, resume=True, key_extra=None, before_commit=None,
            device_memory_budget=None) -> RunResult:
    """``run._execute`` as one rank of an SPMD run (same arguments; see :mod:`.distributed`).

    Rank 0 returns the outputs and the full report; other ranks return no outputs. On a device
    backend each rank runs its items through the overlapped device pipeline
    (:class:`.gpu.DeviceStreamer`, one GPU per rank: ``LOCAL_RANK``), as one process does.
    """
    env = detect()
    if env is None:
        raise UsageError("not a distributed run (no RANK/WORLD_SIZE or srun step in the environment)")
    be = resolve_backend(backend)
    group = Group(env, be.name)
    run = RankRun(group, env, traj, opts, list(targets), out_dir, be, comps, memory_budget, overwrite,
                  shard_bytes, progress, list(input_dirs), extra_report, key_extra, before_commit,
                  device_memory_budget)
    try:
        with _sigterm_raises():
            return run.go()
    except (_Terminated, KeyboardInterrupt) as e:
        # the partial outputs are gone (run.go cleaned up); a collective may still be pending in
        # torch's threads, which would hold the interpreter's exit until it times out: leave now
        what = "terminated (SIGTERM; another rank probably failed)" if isinstance(e, _Terminated) else "interrupted"
        sys.stderr.write(f"relex: error: rank {env.rank}: {what}; no output was completed\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(143 if isinstance(e, _Terminated) else 130)
    finally:
        group.close()


class RankRun:
    def __init__(self, group, env, traj, opts, targets, out_dir, be, comps, memory_budget, overwrite, shard_bytes,
                 progress, input_dirs, extra_report, key_extra, before_commit, device_memory_budget=None):
        self.g, self.env, self.traj, self.opts, self.targets = group, env, traj, opts, targets
        self.out_dir, self.be, self.comps, self.overwrite = os.path.abspath(out_dir), be, comps, overwrite
        self.shard_bytes, self.progress, self.input_dirs = shard_bytes, progress, input_dirs
        self.extra_report, self.key_extra, self.before_commit = extra_report, key_extra, before_commit
        self.device_memory_budget = device_memory_budget
        # (the node's ranks share its memory: rank 0 warns for all)
        self.budget = resolve_budget(memory_budget, env.local_world, warn=env.rank == 0)
        self.outs: OutputSet | None = None
        self.writers: list[ShardedWriter] = []
        self.t0 = time.perf_counter()

    # the protocol: each phase catches its own error and reports it at the next status all-reduce
    def go(self) -> RunResult:
        try:
            return self._phases()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        try:
            close_streamer(getattr(self, "streamer", None))
        finally:
            self._remove_outputs()

    def _remove_outputs(self) -> None:
        if self.outs is not None:
            self.outs.abort()  # rank 0: removes the partial outputs (never renamed: nothing complete)
        else:
            for w in self.writers:
                w.close(sync=False)
        self.writers = []

    def _phases(self) -> RunResult:
        g, rank, traj = self.g, self.env.rank, self.traj
        err = None
        try:
            self._setup()
        except Exception as e:
            err = e
        digest = np.zeros(g.world)
        digest[rank] = float(int(getattr(self, "digest", "0" * 13)[:13], 16))  # 52 bits: exact in fp64
        got = g.status("setup", err, digest)
        # (the T x T solver too: each rank fits every Gram, and the fits must be the same bits)
        mismatch = kernel_mismatch(g.gather("setup", f"{self.kernel}, eigen-solver {self.solver}"))
        if mismatch:
            raise DistributedError(mismatch)
        if np.unique(got).size != 1:
            raise DistributedError("the ranks disagree on the inputs or options (their work plans differ): every "
                                   "rank must see the same checkpoint files and get the same arguments")
        err = None
        try:
            payload = self._pass1()
        except Exception as e:
            err, payload = e, np.zeros(self.slots * traj.T ** 2)
        summed = g.status("pass 1", err, payload)
        err = None
        try:
            self._fits(summed)
            self._pass2()
        except Exception as e:
            err = e
        per_rank = np.zeros(g.world)
        per_rank[rank] = self.streamer.bytes_read if hasattr(self, "streamer") else 0
        self.read_by_rank = [int(x) for x in g.status("pass 2", err, per_rank)]
        err = None
        try:
            _rewrite(self.edges)
        except Exception as e:
            err = e
        g.status("finish", err)
        err, done = None, []
        try:
            _test_hook(rank, "commit")
            if rank == 0:
                done = self._commit()
        except Exception as e:
            err = e
        g.status("commit", err)
        self.outs = None  # committed: nothing to abort
        return RunResult(done, self.rep if rank == 0 else self._report(), time.perf_counter() - self.t0,
                         sum(self.read_by_rank), self.be.name, self.fits if rank == 0 else {})

    def _setup(self) -> None:
        traj, opts, targets, rank = self.traj, self.opts, self.targets, self.env.rank
        _test_hook(rank, "setup")
        self.W = fitmath.target_weights(opts, traj.steps, targets)
        self.tied = traj.tied
        self.streamer = make_streamer(traj, self.be, self.budget, self.opts.fp16_deltas, self.device_memory_budget)
        self.plan = plan.build(traj, self.streamer.policy, len(targets), fitted=self.comps is not None,
                               groupable=self.streamer.groupable, world=self.env.world, rank=rank)
        self.slots = self.plan.slots
        self.kernel = self.be.identity
        self.solver = fitmath.eigen_solver(traj.T, fitted=self.comps is not None)
        key = journal.run_key(traj.fingerprint(), opts.to_dict(), targets, self.kernel, self.shard_bytes,
                              traj.jobs, self.key_extra, solver=self.solver)
        self.digest = self.plan.split.digest(key)
        specs = [j.spec for j in traj.jobs]
        if rank == 0:
            self.outs = OutputSet(self.out_dir, targets, list(traj.input_dirs()) + self.input_dirs, self.overwrite,
                                  key=key, resume=False)
            self.writers = self.outs.open_writers(specs, self.shard_bytes)
        self.specs = specs

    def _open_writers(self) -> None:
        """Ranks > 0: the files rank 0 created, with exactly its layout (else FileExistsError)."""
        for t in self.targets:
            part = os.path.join(self.out_dir, STATE_NAME, target_dir_name(t))
            self.writers.append(ShardedWriter(part, self.specs, self.shard_bytes,
                                              metadata={"relex_target_step": str(t)}, reuse=True))

    def _pass1(self) -> np.ndarray:
        """This rank's whole tensors exactly as one process does them, and the Gram block sums of
        its pieces of split tensors: each Gram in its slot of the all-reduce payload."""
        rank, T = self.env.rank, self.traj.T
        if rank > 0:
            self._open_writers()
        payload = np.zeros((self.slots, T, T))

        def on_gram(item, G):
            if item.kind == "group":
                for job, g in zip(item.jobs, G):
                    payload[self.plan.slot[job.name]] = g
            else:
                payload[item.slot] = G

        self.streamer.progress = progress_bar(self.plan.read_bytes(T), self.progress and rank == 0)
        self.ex = Executor(self.streamer, self.opts, self.W, self.writers, self.targets, comps=self.comps,
                           on_gram=on_gram, after_item=lambda item: _test_hook(rank, "work"))
        self.ex.run(self.plan.items)
        return payload.reshape(-1)

    def _fits(self, summed: np.ndarray) -> None:
        """Every rank: the Grams of split tensors (block sums in block order); rank 0: every fit."""
        traj, T, rank = self.traj, self.traj.T, self.env.rank
        grams = summed.reshape(self.slots, T, T) if self.slots else None
        split = {j.name for j in self.plan.split.split_jobs()}
        mine_split = {it.job.name for it in self.plan.after}
        self.fits = self.ex.fits
        for job in traj.jobs:
            if job.kind != "fit" or (rank != 0 and job.name not in mine_split):
                continue
            if self.comps is not None:
                self.fits[job.name] = self.comps[job.name]
                continue
            s = self.plan.slot[job.name]
            if job.name in split:
                # the order of Streamer.gram: bit-identical to one process
                G = sum_blocks((grams[s + b] for b in range(-(-job.numel // GRAM_BLOCK))), lambda: np.zeros((T, T)))
                if not np.isfinite(G).all():  # finite block sums, infinite total: name the input
                    self.streamer._raise_nonfinite(job)
            else:
                G = grams[s]
            self.fits[job.name] = fitmath.components(G, self.opts.rank, job.numel, job.dtype)

    def _pass2(self) -> None:
        rank = self.env.rank
        _test_hook(rank, "pass2")
        self.ex.after_item = None
        self.ex.run(self.plan.after)
        close_streamer(self.streamer)  # (its bar, a device pipeline's threads and buffers: pass 2 is the last use)
        spans = _spans(self.plan.split.of(rank), self.writers, self.tied)
        if rank == 0:  # the headers rank 0 wrote share their last page with the first tensor
            for w in self.writers:
                for f in w.files:
                    spans.setdefault(f.path, []).insert(0, (0, f.data_start))
        for w in self.writers:  # the staged writes done and the mapped ones flushed: the edge bytes are read back
            w.drain()
            for f in w.files:
                if f._mm is not None:
                    f._mm.flush()
        self.edges = _edge_bytes(spans)
        if rank > 0:
            for w in self.writers:
                w.close(sync=True, index=False)  # the index is rank 0's to write
            self.writers = []

    def _report(self, entries: list[dict] | None = None) -> dict:
        """The run report; ranks other than 0 know no per-tensor part (``entries`` None)."""
        traj = self.traj
        distributed = {
            "world_size": self.env.world, "rank": self.env.rank, "launcher": self.env.launcher,
            "process_group": self.g.backend, "bytes_read_by_rank": self.read_by_rank,
            "planned_bytes_by_rank": self.plan.split.cost,
            "split_tensors": {j.name: [[p.a, p.b, p.rank] for p in self.plan.split.pieces if p.job is j]
                              for j in self.plan.split.split_jobs()},
        }
        return report.run_report(
            backend=self.be.name, kernel=self.kernel, gram_precision=self.streamer.gram_precision(),
            eigen_solver=self.solver,
            options=self.opts.to_dict(), steps=traj.steps,
            targets=self.targets,
            outputs={str(t): os.path.join(self.out_dir, target_dir_name(t)) for t in self.targets},
            seconds=time.perf_counter() - self.t0, bytes_read=sum(self.read_by_rank), memory_budget=self.budget,
            entries=entries or [], distributed=distributed, **stage_fields(self.streamer),
            **(self.extra_report or {}))

    def _commit(self) -> list[str]:
        fitted = [j for j in self.traj.jobs if j.kind == "fit"]
        self.rep = self._report(report.tensor_entries(fitted, [self.fits[j.name] for j in fitted]))
        if self.before_commit is not None:
            self.before_commit(self.fits)
        return self.outs.commit(self.traj.config_dir, self.rep)
