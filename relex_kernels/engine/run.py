"""Whole runs: ``extrapolate`` (Gram, solve, weighted sum) and ``predict`` (weighted sum from a saved fit)."""

from __future__ import annotations

import os
import time

from .. import fit as fitmath
from ..errors import InputError, OutputError, RelexError, UsageError
from ..fit import FitOptions
from ..io.writer import DEFAULT_SHARD_BYTES
from ..ops import resolve_backend
from ..io import fitfile
from . import apicheck, journal, plan, report
from .executor import Executor, progress_bar
from .gpu import close_streamer, make_streamer, stage_fields
from .output import REPORT_NAME, OutputSet, _inside, load_report
from .plan import default_memory_budget, parse_size
from .report import RunResult
from .trajectory import OUT_DTYPES, Trajectory

__all__ = ["RunResult", "default_memory_budget", "extrapolate", "parse_size", "predict"]


def _execute(traj: Trajectory, opts: FitOptions, targets: list[int], out_dir: str, *, comps=None,
             memory_budget=None, backend=None, overwrite=False, shard_bytes=DEFAULT_SHARD_BYTES,
             progress=False, input_dirs=(), extra_report=None, resume=True, key_extra=None,
             before_commit=None, device_memory_budget=None) -> RunResult:
    """One run: the plan of this process, run by the :class:`.executor.Executor` into an output set."""
    from . import distributed  # imports nothing heavy; torch only for a multi-process run (torchrun, srun)
    if distributed.active():
        from . import spmd
        return spmd.execute(traj, opts, targets, out_dir, comps=comps, memory_budget=memory_budget,
                            backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                            progress=progress, input_dirs=input_dirs, extra_report=extra_report,
                            resume=resume, key_extra=key_extra, before_commit=before_commit,
                            device_memory_budget=device_memory_budget)
    t0 = time.perf_counter()
    be = resolve_backend(backend)
    steps = traj.steps
    W = fitmath.target_weights(opts, steps, targets)  # (K, T)
    # the journal key: everything the output bytes depend on (not the memory budget: the
    # Gram is the same bit for bit however a tensor is cut into ranges)
    solver = fitmath.eigen_solver(traj.T, fitted=comps is not None)
    key = journal.run_key(traj.fingerprint(), opts.to_dict(), targets, be.identity, shard_bytes, traj.jobs,
                          key_extra, solver=solver)
    outs = OutputSet(out_dir, targets, list(traj.input_dirs()) + list(input_dirs), overwrite, key=key,
                     resume=resume, reuse_complete=before_commit is None)
    if outs.complete is not None:  # this very run finished before (a fit to save needs the run itself)
        rep = {**outs.complete, "already_complete": True,  # (the paths as they are now: OUT_DIR may have moved)
               "outputs": {str(t): outs.final(t) for t in targets}}
        return RunResult([outs.final(t) for t in targets], rep, time.perf_counter() - t0, 0, be.name)
    budget = plan.resolve_budget(memory_budget)
    streamer = None
    try:
        if outs.journal.committed:  # killed while renaming finished outputs into place
            return _finish_committed(outs, be.name, t0, comps, before_commit)
        writers = outs.open_writers([j.spec for j in traj.jobs], shard_bytes)
        journal.hook("start")
        streamer = make_streamer(traj, be, budget, opts.fp16_deltas, device_memory_budget)
        work = plan.build(traj, streamer.policy, len(targets), fitted=comps is not None, journal=outs.journal,
                          groupable=streamer.groupable)
        streamer.progress = progress_bar(work.read_bytes(traj.T), progress)
        ex = Executor(streamer, opts, W, writers, targets, comps=comps, journal=outs.journal)
        ex.run(work.items)
        close_streamer(streamer)  # (and its progress bar)
        seconds = time.perf_counter() - t0
        rep = report.run_report(backend=be.name, kernel=be.identity, gram_precision=streamer.gram_precision(),
                                eigen_solver=solver,
                                options=opts.to_dict(), steps=steps,
                                targets=targets, outputs={str(t): outs.final(t) for t in targets}, seconds=seconds,
                                bytes_read=streamer.bytes_read, memory_budget=budget, entries=ex.entries,
                                resumed=ex.reused, run_key=key, **stage_fields(streamer), **(extra_report or {}))
        done = outs.commit(traj.config_dir, rep,
                           before_commit=(lambda: before_commit(ex.fits)) if before_commit is not None else None)
    except BaseException as e:
        try:
            close_streamer(streamer, drain=isinstance(e, KeyboardInterrupt))
        finally:  # (a device error while stopping the pipeline must not leave the partial outputs)
            # an error removes every partial output; an interrupt keeps them for a resume
            outs.abort(keep=isinstance(e, KeyboardInterrupt))
        raise
    return RunResult(done, rep, seconds, streamer.bytes_read, be.name, ex.fits)


def _finish_committed(outs: OutputSet, backend: str, t0: float, comps, before_commit=None) -> RunResult:
    """The previous run wrote everything and died during the renames: finish them."""
    path = os.path.join(outs.state_dir, REPORT_NAME)
    if os.path.exists(path):
        rep = load_report(path)
    else:  # killed after finish_commit moved it beside the outputs (OutputSet read it there)
        path, rep = os.path.join(outs.out_dir, REPORT_NAME), outs.prior_report
    if rep is None or not outs.has_targets(rep):
        raise OutputError(f"cannot finish the interrupted run in {outs.out_dir}: its report {path} is "
                          "missing or belongs to another run; run again with --no-resume")
    fits = dict(comps) if comps is not None else dict(outs.journal.fits)
    if before_commit is not None:
        before_commit(fits)
    done = outs.finish_commit()
    return RunResult(done, rep, time.perf_counter() - t0, 0, backend, fits)


def _out_dtype(name: str | None) -> str | None:
    """``--out-dtype`` (bf16, fp16, fp32) as a dtype name; None keeps each tensor's base dtype."""
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise UsageError(f"out_dtype must be one of {', '.join(OUT_DTYPES)} or None, got {name!r}")
    return OUT_DTYPES[name]


def extrapolate(base: str, checkpoints: dict[int, str], targets: list[int], out_dir: str,
                opts: FitOptions = FitOptions(), *, memory_budget: int | None = None, backend: str | None = None,
                overwrite: bool = False, save_fit: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                progress: bool = False, run_dir: str | None = None, resume: bool = True,
                device_memory_budget: int | None = None, out_dtype: str | None = None) -> RunResult:
    """Predict ``targets`` from ``base`` and the history ``checkpoints`` ({step: dir}) into ``out_dir/step_<S>``.

    Checkpoints may store a tensor in another float dtype than the base (fp32 master weights
    beside a bf16 base): it is computed in the widest, each version read exactly, and written
    in the base's dtype, or in ``out_dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``) for every
    fitted tensor.

    Run again with the same arguments after it finished, it returns the outputs in place
    without reading anything (``report["already_complete"]``, no ``fits``); ``overwrite=True``
    recomputes them.
    """
    base, checkpoints = apicheck.path("base", base), apicheck.checkpoints(checkpoints)
    targets, out_dir, opts = apicheck.targets(targets), apicheck.path("out_dir", out_dir), apicheck.options(opts)
    save_fit, run_dir = apicheck.path("save_fit", save_fit, True), apicheck.path("run_dir", run_dir, True)
    apicheck.resources(memory_budget=memory_budget, backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                       progress=progress, resume=resume, device_memory_budget=device_memory_budget)
    out_dt = _out_dtype(out_dtype)
    fitmath.validate(opts, sorted(checkpoints))
    if save_fit is not None:
        if os.path.isdir(save_fit):
            raise OutputError(f"save_fit (--save-fit) {save_fit} is a directory; give a file name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(save_fit))):
            raise OutputError(f"save_fit (--save-fit): directory of {save_fit} does not exist")
    traj = Trajectory(base, checkpoints, out_dtype=out_dt)
    try:
        inputs = traj.input_dirs() + ([run_dir] if run_dir else [])
        if save_fit is not None and any(_inside(save_fit, d) for d in inputs):
            raise OutputError(f"save_fit (--save-fit) {save_fit} lies inside an input directory; choose a path outside "
                              "the base and run directories")

        saved = []

        def write_fit(fits):  # before the outputs are renamed into place: all of it succeeds or none
            meta = {"options": opts.to_dict(), "steps": traj.steps, "base": traj.base.path,
                    "checkpoints": {str(ck.step): ck.path for ck in traj.ckpts},
                    "fingerprint": traj.fingerprint(), "out_dtype": out_dtype,
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
                            device_memory_budget=device_memory_budget,
                            extra_report={"out_dtype": out_dtype or "base"})
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
            progress: bool = False, resume: bool = True, device_memory_budget: int | None = None,
            out_dtype: str | None = None) -> RunResult:
    """Write ``targets`` from a fit saved by :func:`extrapolate`: one pass, no Gram (``out_dtype``:
    as for :func:`extrapolate`; by default the one the fit was made with)."""
    fit_path, targets, out_dir = apicheck.path("fit_path", fit_path), apicheck.targets(targets), apicheck.path(
        "out_dir", out_dir)
    apicheck.resources(memory_budget=memory_budget, backend=backend, overwrite=overwrite, shard_bytes=shard_bytes,
                       progress=progress, resume=resume, device_memory_budget=device_memory_budget)
    meta, comps = fitfile.load(fit_path)
    opts = FitOptions(**meta["options"])
    ckpts = {int(s): p for s, p in meta["checkpoints"].items()}
    out_dtype = out_dtype if out_dtype is not None else meta.get("out_dtype")
    out_dt = _out_dtype(out_dtype)
    try:
        traj = Trajectory(meta["base"], ckpts, out_dtype=out_dt)
    except RelexError as e:  # say which fit these inputs come from
        raise type(e)(f"fit {fit_path}: its inputs are no longer valid: {e}") from None
    try:
        fitfile.check_fingerprint(fit_path, meta["fingerprint"], traj.fingerprint())
        want = [j.name for j in traj.jobs if j.kind == "fit"]
        if sorted(want) != sorted(comps):
            raise InputError(f"fit {fit_path} does not cover the same tensors as the checkpoints")
        return _execute(traj, opts, list(targets), out_dir, comps=comps, memory_budget=memory_budget,
                        backend=backend, overwrite=overwrite, shard_bytes=shard_bytes, progress=progress,
                        extra_report={"fit": os.path.abspath(fit_path), "out_dtype": out_dtype or "base"},
                        resume=resume,
                        key_extra={"fit": journal.file_sha256(fit_path)}, device_memory_budget=device_memory_budget)
    finally:
        traj.close()
