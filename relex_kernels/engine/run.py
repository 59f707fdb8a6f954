"""Whole runs: ``extrapolate`` (Gram, solve, weighted sum) and ``predict`` (weighted sum from a saved fit)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import fit as fitmath
from ..errors import InputError, OutputError, RelexError, UsageError
from ..fit import Components, FitOptions
from ..io.reader import max_maps
from ..io.writer import DEFAULT_SHARD_BYTES
from . import apicheck, fitfile, journal, report
from .output import OutputSet, _inside
from .gpu import close_streamer, make_streamer, resolve_backend
from .trajectory import Trajectory


def default_memory_budget() -> int:
    """A quarter of the machine's RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000**2, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1000**3, "GIB": 1 << 30, "T": 1 << 40, "TB": 1000**4, "TIB": 1 << 40}


class SizeError(UsageError, argparse.ArgumentTypeError):
    """A size that does not parse: a UsageError for the API, an argparse error on the command line."""


def parse_size(text: str) -> int:
    """'512M', '4G', '1.5GB', '1000000' -> bytes (K/M/G/T and KiB… are powers of 1024, KB… of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise SizeError(f"cannot read size {text!r} (examples: 512M, 4G, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class RunResult:
    outputs: list[str]
    report: dict
    seconds: float
    bytes_read: int
    backend: str
    fits: dict[str, Components] = field(default_factory=dict, repr=False)


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


def _execute(traj: Trajectory, opts: FitOptions, targets: list[int], out_dir: str, *, comps=None,
             memory_budget=None, backend=None, overwrite=False, shard_bytes=DEFAULT_SHARD_BYTES,
             progress=False, input_dirs=(), extra_report=None, resume=True, key_extra=None,
             before_commit=None, device_memory_budget=None) -> RunResult:
    from . import distributed  # imports torch only for a multi-process run (torchrun, srun)
    if distributed.active():
        return distributed.execute(traj, opts, targets, out_dir, comps=comps, memory_budget=memory_budget,
                                   backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                                   progress=progress, input_dirs=input_dirs, extra_report=extra_report,
                                   resume=resume, key_extra=key_extra, before_commit=before_commit)
    t0 = time.perf_counter()
    be = resolve_backend(backend)
    steps = traj.steps
    fitmath.validate(opts, steps)
    for t in targets:
        fitmath.validate_target(opts, steps, t)
    if len(set(targets)) != len(targets):
        raise UsageError(f"target steps repeat: {targets}")
    W = np.stack([fitmath.weights(opts, steps, t) for t in targets])  # (K, T)
    budget = memory_budget or default_memory_budget()
    # the journal key: everything the output bytes depend on (not the memory budget: the
    # Gram is the same bit for bit however a tensor is cut into ranges)
    key = journal.run_key(traj.fingerprint(), opts.to_dict(), targets, be.identity, shard_bytes, traj.jobs,
                          key_extra)
    outs = OutputSet(out_dir, targets, list(traj.input_dirs()) + list(input_dirs), overwrite, key=key,
                     resume=resume)
    bar = streamer = None
    try:
        if outs.journal.committed:  # killed while renaming finished outputs into place
            return _finish_committed(outs, be.name, t0, comps, before_commit)
        writers = outs.open_writers([j.spec for j in traj.jobs], shard_bytes)
        jr = outs.journal
        journal.hook("start")
        streamer = make_streamer(traj, be, budget, opts.fp16_deltas, device_memory_budget)
        K = len(targets)
        tied_source = traj.tied[1] if traj.tied else None
        tied_head = traj.tied[0] if traj.tied else None
        bar = progress_bar(sum(streamer.read_bytes(j, K, comps is None) for j in traj.jobs), progress)
        streamer.progress = bar
        fits: dict[str, Components] = {}
        entries = []
        jobs = traj.jobs
        reused = 0
        skip = 0  # the jobs before this index ran in a group
        for idx, job in enumerate(jobs):
            if idx < skip:
                continue
            if job.name in jr.done and (job.kind != "fit" or comps is not None or job.name in jr.fits):
                reused += 1  # finished by the interrupted run this one resumes
                if job.kind == "fit":
                    fits[job.name] = comp = comps[job.name] if comps is not None else jr.fits[job.name]
                    entries.append(report.tensor_entry(job.name, job.dtype, job.shape, comp))
                if bar is not None:
                    bar.update(streamer.read_bytes(job, K, comps is None))
                continue
            if job.kind == "copy":
                streamer.copy(job, writers)
                jr.record_done(job.name)
                journal.hook("done")
                continue
            if job.kind == "tied":
                continue
            n_out = K * (2 if job.name == tied_source else 1)
            group = _group(jobs, idx, streamer, jr, K, comps, tied_source)
            if len(group) > 1:
                skip = idx + len(group)
                _run_group(group, streamer, jr, comps, opts, W, writers, targets, fits, entries)
                continue
            resident, ranges = streamer.ranges(job, n_out)
            nxt = next((j for j in jobs[idx + 1:] if j.kind == "fit"), None)
            if nxt is not None and streamer.ranges(nxt, n_out)[0]:
                streamer.prefetch(nxt)  # page cache read-ahead while this tensor computes
            fresh = False  # whether pass 1 read the whole tensor just now (its pages may be resident)
            if comps is None:
                comp = jr.fits.get(job.name)
                if comp is None:
                    upto, acc = jr.grams.get(job.name, (0, None))
                    G = streamer.gram(job, journal.ranges_from(ranges, upto), resident, acc=acc,
                                      on_range=_gram_recorder(jr, job.name, ranges[-1][1]))
                    comp = fitmath.components(G, opts.rank, job.numel, job.dtype)
                    jr.record_fit(job.name, comp)
                    journal.hook("fit")
                    fresh = upto == 0
            else:
                comp = comps[job.name]
            fits[job.name] = comp
            entries.append(report.tensor_entry(job.name, job.dtype, job.shape, comp))
            A = fitmath.alphas(comp, W)
            streamer.combine(job, journal.ranges_from(ranges, jr.written.get(job.name, 0)), resident, A, writers,
                             also=tied_head if job.name == tied_source else None,
                             count_read=not (fresh and resident),
                             on_range=_written_recorder(jr, job.name, ranges[-1][1]))
            if job.dtype == "F16":  # the one fitted dtype whose range a prediction can leave
                _check_f16_range(job, writers, targets)
            jr.record_done(job.name)
            journal.hook("done")
        close_streamer(streamer)
        if bar is not None:
            bar.close()
            bar = None
        seconds = time.perf_counter() - t0
        rep = report.run_report(backend=be.name, kernel=be.identity, options=opts.to_dict(), steps=steps,
                                targets=targets, outputs={str(t): outs.final(t) for t in targets}, seconds=seconds,
                                bytes_read=streamer.bytes_read, memory_budget=budget, entries=entries,
                                resumed=reused, **(extra_report or {}))
        done = outs.commit(traj.base_dir, rep,
                           before_commit=(lambda: before_commit(fits)) if before_commit is not None else None)
    except BaseException as e:
        close_streamer(streamer)
        if bar is not None:
            bar.close()
        # an error removes every partial output; an interrupt keeps them for a resume
        outs.abort(keep=isinstance(e, KeyboardInterrupt))
        raise
    return RunResult(done, rep, seconds, streamer.bytes_read, be.name, fits)


def _group_max() -> int:
    """Most tensors in one group: ``RELEX_GROUP_TENSORS`` (1 turns grouping off: tests compare the
    two), else 1024; a value that is not a positive integer is ignored."""
    env = os.environ.get("RELEX_GROUP_TENSORS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else 1024


GROUP_MAX = _group_max()
#: mapped bytes of one group at most (inputs and outputs stay mapped until the group ends):
#: enough to amortise the per-group cost over hundreds of MoE experts, small enough that a
#: dense model's groups do not hold the whole memory budget in RSS (6 GB at the default
#: budget on a 24 GB machine). 64 MB groups made the 3072-tensor benchmark ~15% slower.
GROUP_BYTES = 256 << 20


def _group(jobs, idx: int, streamer, jr, n_out: int, comps, tied_source) -> list:
    """The jobs from ``idx`` on that run as one group (:meth:`.Streamer.open_group`): consecutive
    whole fit jobs the streamer can group, without journal state (a resumed tensor keeps the
    per-tensor path, which knows where to restart), mapped together within the memory budget."""
    group, size, files = [], 0, set()
    # a group keeps every input file it touches mapped (a descriptor each) until it ends:
    # at most half the map cache, so that thousands of shards stay under the fd limit
    max_files = max(1, max_maps() // 2)
    for job in jobs[idx:idx + GROUP_MAX]:
        if (job.kind != "fit" or job.name == tied_source or job.name in jr.done or job.name in jr.written
                or (comps is None and (job.name in jr.fits or job.name in jr.grams))
                or not streamer.groupable(job, n_out)):
            break
        size += streamer.group_bytes(job, n_out)
        more = files.union(id(loc.file) for loc in streamer._locs(job))
        if group and (size > min(streamer.budget, GROUP_BYTES) or len(more) > max_files):
            break
        files = more
        group.append(job)
    return group


def _run_group(group, streamer, jr, comps, opts, W, writers, targets, fits, entries) -> None:
    """Fit and write a group of small tensors: the Grams, one eigen-solve for all, the weighted
    sums, then the journal's records and the page releases once per group. Each tensor's bytes
    are those of the per-tensor path; the journal points are passed once per tensor, so a
    run killed inside a group resumes like one killed between tensors."""
    names = [j.name for j in group]
    rows, files = streamer.open_group(group)
    if comps is None:
        Gs = streamer.gram_group(group, rows)
        for _ in group:
            journal.hook("gram")
        cs = fitmath.components_many(Gs, opts.rank, [j.numel for j in group], [j.dtype for j in group])
        jr.record_fits(names, cs)
        for _ in group:
            journal.hook("fit")
    else:
        cs = [comps[n] for n in names]
    for job, comp in zip(group, cs):
        fits[job.name] = comp
        entries.append(report.tensor_entry(job.name, job.dtype, job.shape, comp))
    outs = streamer.combine_group(group, rows, [fitmath.alphas(c, W) for c in cs], writers,
                                  count_read=comps is not None)
    for _ in group:
        journal.hook("combine")
    streamer.release_group(files, outs)
    for job in group:
        if job.dtype == "F16":  # as in the per-tensor path
            _check_f16_range(job, writers, targets)
    jr.record_done(*names)
    for _ in group:
        journal.hook("done")


def _check_f16_range(job, writers, targets, a: int = 0, b: int | None = None) -> None:
    """An fp16 prediction past ±65504 is inf: an error, never a silently broken model.

    (bf16 and fp32 cannot get there: a finite fp32 Gram bounds every delta far below
    their range.) Reads back the outputs of elements ``[a, b)`` just written, still in
    the page cache; the SPMD engine checks each rank's own elements.
    """
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


def _gram_recorder(jr, name: str, end: int):
    def on_range(b: int, acc: np.ndarray) -> None:
        if b < end:  # the finished Gram goes into the "fit" record instead
            jr.record_gram(name, b, acc)
        journal.hook("gram")
    return on_range


def _written_recorder(jr, name: str, end: int):
    def on_range(b: int) -> None:
        if b < end:  # the whole tensor gets a "done" record instead
            jr.record_written(name, b)
        journal.hook("combine")
    return on_range


def _finish_committed(outs: OutputSet, backend: str, t0: float, comps, before_commit=None) -> RunResult:
    """The previous run wrote everything and died during the renames: finish them."""
    path = os.path.join(outs.state_dir, "relex_report.json")
    if not os.path.exists(path):  # killed after finish_commit moved it beside the outputs
        path = os.path.join(outs.out_dir, "relex_report.json")
    try:
        with open(path) as fh:
            rep = json.load(fh)
        if sorted(rep["outputs"]) != sorted(str(t) for t in outs.targets):
            raise ValueError("targets differ")
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"cannot finish the interrupted run in {outs.out_dir}: its report {path} is "
                          "missing or belongs to another run; run again with --no-resume") from None
    fits = dict(comps) if comps is not None else dict(outs.journal.fits)
    if before_commit is not None:
        before_commit(fits)
    done = outs.finish_commit()
    return RunResult(done, rep, time.perf_counter() - t0, 0, backend, fits)


def extrapolate(base: str, checkpoints: dict[int, str], targets: list[int], out_dir: str,
                opts: FitOptions = FitOptions(), *, memory_budget: int | None = None, backend: str | None = None,
                overwrite: bool = False, save_fit: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                progress: bool = False, run_dir: str | None = None, resume: bool = True,
                device_memory_budget: int | None = None) -> RunResult:
    """Predict ``targets`` from ``base`` and the history ``checkpoints`` ({step: dir}) into ``out_dir/step_<S>``."""
    base, checkpoints = apicheck.path("base", base), apicheck.checkpoints(checkpoints)
    targets, out_dir, opts = apicheck.targets(targets), apicheck.path("out_dir", out_dir), apicheck.options(opts)
    save_fit, run_dir = apicheck.path("save_fit", save_fit, True), apicheck.path("run_dir", run_dir, True)
    apicheck.resources(memory_budget=memory_budget, backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                       progress=progress, resume=resume, device_memory_budget=device_memory_budget)
    if not targets:
        raise UsageError("give at least one --target-step")
    fitmath.validate(opts, sorted(checkpoints))
    if save_fit is not None:
        if os.path.isdir(save_fit):
            raise OutputError(f"--save-fit {save_fit} is a directory; give a file name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(save_fit))):
            raise OutputError(f"--save-fit: directory of {save_fit} does not exist")
    traj = Trajectory(base, checkpoints)
    try:
        inputs = traj.input_dirs() + ([run_dir] if run_dir else [])
        if save_fit is not None and any(_inside(save_fit, d) for d in inputs):
            raise OutputError(f"--save-fit {save_fit} lies inside an input directory; choose a path outside "
                              "the base and run directories")

        saved = []

        def write_fit(fits):  # before the outputs are renamed into place: all of it succeeds or none
            meta = {"options": opts.to_dict(), "steps": traj.steps, "base": traj.base.path,
                    "checkpoints": {str(ck.step): ck.path for ck in traj.ckpts},
                    "fingerprint": traj.fingerprint(),
                    "fitted": [j.name for j in traj.jobs if j.kind == "fit"]}
            try:
                fitfile.save(save_fit, meta, fits)
            except OSError as e:
                raise OutputError(f"cannot write the fit {save_fit}: {e.strerror or e}") from None
            saved.append(save_fit)

        try:
            return _execute(traj, opts, list(targets), out_dir, memory_budget=memory_budget, backend=backend,
                            overwrite=overwrite, shard_bytes=shard_bytes, progress=progress,
                            input_dirs=[run_dir] if run_dir else (), resume=resume,
                            before_commit=write_fit if save_fit is not None else None,
                            device_memory_budget=device_memory_budget)
        except BaseException:
            for p in saved:  # the outputs did not appear, so neither does their fit
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
    finally:
        traj.close()


def predict(fit_path: str, targets: list[int], out_dir: str, *, memory_budget: int | None = None,
            backend: str | None = None, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool = False, resume: bool = True, device_memory_budget: int | None = None) -> RunResult:
    """Write ``targets`` from a fit saved by :func:`extrapolate`: one pass, no Gram."""
    fit_path, targets, out_dir = apicheck.path("fit_path", fit_path), apicheck.targets(targets), apicheck.path(
        "out_dir", out_dir)
    apicheck.resources(memory_budget=memory_budget, backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                       progress=progress, resume=resume, device_memory_budget=device_memory_budget)
    if not targets:
        raise UsageError("give at least one --target-step")
    meta, comps = fitfile.load(fit_path)
    opts = FitOptions(**meta["options"])
    ckpts = {int(s): p for s, p in meta["checkpoints"].items()}
    try:
        traj = Trajectory(meta["base"], ckpts)
    except RelexError as e:  # say which fit these inputs come from
        raise type(e)(f"fit {fit_path}: its inputs are no longer valid: {e}") from None
    try:
        fitfile.check_fingerprint(fit_path, meta["fingerprint"], traj.fingerprint())
        want = [j.name for j in traj.jobs if j.kind == "fit"]
        if sorted(want) != sorted(comps):
            raise InputError(f"fit {fit_path} does not cover the same tensors as the checkpoints")
        return _execute(traj, opts, list(targets), out_dir, comps=comps, memory_budget=memory_budget,
                        backend=backend, overwrite=overwrite, shard_bytes=shard_bytes, progress=progress,
                        extra_report={"fit": os.path.abspath(fit_path)}, resume=resume,
                        key_extra={"fit": journal.file_sha256(fit_path)}, device_memory_budget=device_memory_budget)
    finally:
        traj.close()
