"""Runs the items of a :mod:`.plan` with one streamer: the one job loop of every run.

The single-process run, each SPMD rank and the diagnostics pass hand their plan's items
to :meth:`Executor.run`; the streamer (:class:`.streaming.Streamer` on the host,
:class:`.gpu.DeviceStreamer` on a device) moves the bytes and runs the kernels. The
journal gets its records at the points the plan's positions allow (per range, per
tensor, per group), and the test hooks fire at the same points whatever the executor.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np

from .. import fit as fitmath
from ..errors import InputError
from ..fit import Components
from . import journal as journal_mod
from . import report
from .plan import NO_JOURNAL, Item


def progress_bar(total: int, enabled: bool, desc: str = "relex"):
    """A tqdm bar in bytes read, on stderr (None when disabled).

    Decimal units (kB, MB, GB of 10^3, 10^6, 10^9 bytes), like the summary. The bar
    follows the terminal's width; a terminal that reports 0 columns (a serial console,
    some CI pseudo-terminals) gets a fixed width ($COLUMNS, else 80) instead of nothing.
    """
    if not enabled:
        return None
    from tqdm import tqdm
    try:
        cols = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        cols = 0
    width = {"dynamic_ncols": True}
    if cols <= 0:
        env = os.environ.get("COLUMNS", "")
        width = {"ncols": int(env) if env.isdigit() and int(env) > 0 else 80}
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
                smoothing=0.1, **width)


def check_f16_range(job, writers, targets, a: int = 0, b: int | None = None) -> None:
    """An fp16 prediction past ±65504 is inf: an error, never a silently broken model.

    (bf16 and fp32 cannot get there: a finite fp32 Gram bounds every delta far below
    their range.) Reads back the outputs of elements ``[a, b)`` just written, still in
    the page cache; the SPMD engine checks each rank's own elements.
    """
    if job.out_dtype != "F16":  # the one fitted dtype whose range a prediction can leave
        return
    b = job.numel if b is None else b
    for w, t in zip(writers, targets):
        bad = 0
        for c0 in range(a, b, 1 << 22):
            c1 = min(b, c0 + (1 << 22))
            v = w.view(job.name, c0, c1)
            bad += int(np.count_nonzero((v.view(np.uint16) & 0x7C00) == 0x7C00))  # exponent all ones: inf, NaN
            del v
            w.release(job.name, c0, c1)
        if bad:
            raise InputError(f"tensor {job.name}: the prediction for step {t} leaves the F16 range "
                             f"(|x| > 65504) at {bad} of {job.numel} elements; predict a nearer step, or convert "
                             "the checkpoints to bf16 or fp32")


class Executor:
    """Runs plan items (:meth:`run`), collecting each fitted tensor's fit and report entry.

    ``W``: (K, T) weights of the targets; ``comps``: known fits (``predict``), else every
    Gram is computed; ``on_gram(item, G)``: called with each Gram (SPMD all-reduce slots,
    the diagnostics pass); ``after_item(item)``: called after each item (SPMD test hooks).
    """

    def __init__(self, streamer, opts, W=None, writers=(), targets=(), *, comps=None, journal=NO_JOURNAL,
                 on_gram=None, after_item=None):
        self.st, self.opts, self.W, self.writers, self.targets = streamer, opts, W, list(writers), list(targets)
        self.comps, self.jr, self.on_gram, self.after_item = comps, journal, on_gram, after_item
        self.fits: dict[str, Components] = {}
        self.entries: list[dict] = []
        self.reused = 0

    def run(self, items: list[Item]) -> None:
        follow = getattr(self.st, "follow", None)
        if follow is not None:  # the device pipeline reads ahead along the plan
            follow(items)
        for i, item in enumerate(items):
            if item.reused:
                self._reuse(item)
            else:
                getattr(self, "_" + item.kind)(item, items, i)
            if self.after_item is not None:
                self.after_item(item)
        self.st.drain()  # the last outputs with the writers, their journal records made

    def _record_fits(self, jobs, comps: list[Components]) -> None:
        self.fits.update((job.name, c) for job, c in zip(jobs, comps))
        self.entries += report.tensor_entries(jobs, comps)

    def _reuse(self, item: Item) -> None:
        """Finished by the interrupted run this one resumes: its fit for the report, its bytes for the bar."""
        self.reused += 1
        job = item.job
        if item.kind == "fit":
            self._record_fits([job], [self.comps[job.name] if self.comps is not None else self.jr.fits[job.name]])
        if self.st.progress is not None:
            self.st.progress.update(item.read_bytes(self.st.traj.T))

    def _copy(self, item: Item, items, i: int) -> None:
        self.st.copy(item.job, self.writers)
        self._done(item.job.name)

    def _done(self, *names: str) -> None:
        self.jr.record_done(*names)
        for _ in names:
            journal_mod.hook("done")

    def _fit(self, item: Item, items, i: int) -> None:
        st, job, jr = self.st, item.job, self.jr
        # The next item is read ahead while this one computes, from the start of the last range
        # this one reads (the streamer's then=): pass 2's when it reads the inputs anew
        ahead = partial(self._read_ahead, items, i)
        if item.needs_gram:
            acc = jr.grams[job.name][1] if item.gram_from else None
            G = st.gram(job, item.gram_ranges, item.resident, acc=acc,
                        on_range=self._gram_recorder(job.name, item.ranges[-1][1]),
                        then=None if item.reread else ahead)
            if self.on_gram is not None:
                self.on_gram(item, G)
            comp = fitmath.components(G, self.opts.rank, job.numel, job.dtype)
            jr.record_fits([job.name], [comp])
            journal_mod.hook("fit")
        else:
            comp = self.comps[job.name] if self.comps is not None else jr.fits[job.name]
        self._record_fits([job], [comp])
        st.combine(job, item.combine_ranges, item.resident, fitmath.alphas(comp, self.W), self.writers,
                   also=item.also, count_read=item.reread,
                   on_range=self._written_recorder(job.name, item.ranges[-1][1]),
                   then=ahead if item.reread or not item.needs_gram else None)
        st.after_writes(lambda: (check_f16_range(job, self.writers, self.targets), self._done(job.name)))

    def _read_ahead(self, items, i: int) -> None:
        """Page-cache read-ahead of the next tensor or group while this one computes."""
        nxt = next((it for it in items[i + 1:] if it.kind in ("fit", "group", "gram")), None)
        if nxt is None or nxt.reused:
            return
        if nxt.kind == "group":
            self.st.prefetch_group(nxt.jobs)
        elif nxt.whole:
            self.st.prefetch_ahead(nxt.job)

    def _group(self, item: Item, items, i: int) -> None:
        """Fit and write a group of small tensors: the Grams, one eigen-solve for all, the weighted
        sums, then the journal's records and the page releases once per group. Each tensor's bytes
        are those of the per-tensor path; the journal points are passed once per tensor, so a
        run killed inside a group resumes like one killed between tensors."""
        st, group = self.st, item.jobs
        names = [j.name for j in group]
        rows, files = st.open_group(group)
        self._read_ahead(items, i)
        if self.comps is None:
            Gs = st.gram_group(group, rows)
            for _ in group:
                journal_mod.hook("gram")
            if self.on_gram is not None:
                self.on_gram(item, Gs)
            cs = fitmath.components_many(Gs, self.opts.rank, [j.numel for j in group], [j.dtype for j in group])
            self.jr.record_fits(names, cs)
            for _ in group:
                journal_mod.hook("fit")
        else:
            cs = [self.comps[n] for n in names]
        self._record_fits(group, cs)
        outs = st.combine_group(group, rows, fitmath.alphas_many(cs, self.W), self.writers, count_read=item.reread)
        for _ in group:
            journal_mod.hook("combine")

        def landed() -> None:  # (on a device, once the outputs are with the writers)
            st.release_group(files, outs)
            for job in group:
                check_f16_range(job, self.writers, self.targets)
            self._done(*names)
        st.after_writes(landed)

    def _gram(self, item: Item, items, i: int) -> None:
        """Pass 1 only: a Gram block sum of a split piece (SPMD) or a diagnostics Gram."""
        G = self.st.gram(item.job, item.gram_ranges, item.resident, then=partial(self._read_ahead, items, i))
        if self.on_gram is not None:
            self.on_gram(item, G)

    def _combine(self, item: Item, items, i: int) -> None:
        """Pass 2 only: the weighted sums of a split piece, from the fit every rank derived."""
        job = item.job
        self.st.combine(job, item.combine_ranges, item.resident, fitmath.alphas(self.fits[job.name], self.W),
                        self.writers, also=item.also, count_read=item.reread,
                        then=partial(self._read_ahead, items, i))
        a, b = item.combine_ranges[0][0], item.combine_ranges[-1][1]
        self.st.after_writes(lambda: check_f16_range(job, self.writers, self.targets, a, b))

    def _gram_recorder(self, name: str, end: int):
        jr = self.jr

        def on_range(b: int, acc: np.ndarray) -> None:
            if b < end:  # the finished Gram goes into the "fit" record instead
                jr.record_gram(name, b, acc)
            journal_mod.hook("gram")
        return on_range

    def _written_recorder(self, name: str, end: int):
        jr = self.jr

        def on_range(b: int) -> None:
            if b < end:  # the whole tensor gets a "done" record instead
                jr.record_written(name, b)
            journal_mod.hook("combine")
        return on_range
