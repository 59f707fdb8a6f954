"""Writing a synthetic run: base + checkpoints streamed into memory-mapped safetensors files.

Tensors are generated outer, chunks of :data:`~.trajectory.CHUNK` elements inner; each
chunk yields the base and every step in turn and is rounded straight into the
writable views of all T+1 (+ truth) checkpoints, which are open at once. Finished
windows are released (flushed and dropped from our RSS) while the next window is
computed, so memory stays at a few chunk buffers plus one window of dirty pages per
checkpoint, whatever the model size. Output is built in a hidden directory beside
``out_dir`` and renamed into place at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import OutputError, RelexError, UsageError
from ..io import dtypes
from ..io.dirs import make_dirs, remove_empty
from ..io.reader import SafetensorsFile
from ..io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec
from ..threads import pool as worker_pool
from . import configs, layouts
from .tokenizer import write_tokenizer
from .trajectory import (CHUNK, Scratch, TensorPlan, TrajectoryParams, chunk_trajectory, exact_horizon, plan_tensors,
                         tensor_values)

INFO_NAME = "synth.json"
STORAGE_DTYPES = ("BF16", "F16", "F32")
_WINDOW_BYTES = 64 * 1024 * 1024  # bytes across all checkpoints per window
_LAG = 2  # windows between the start of a window's writeback and its release


@dataclass
class SynthRun:
    """A generated run. Paths are absolute; ``checkpoints`` / ``truth`` map step -> directory."""

    out_dir: str
    base_dir: str
    run_dir: str
    checkpoints: dict[int, str]
    truth: dict[int, str]
    config: dict
    info: dict = field(repr=False)

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "SynthRun":
        out = os.path.abspath(os.fspath(out_dir))
        try:
            with open(os.path.join(out, INFO_NAME), encoding="utf-8") as fh:
                info = json.load(fh)
        except (OSError, ValueError) as e:
            raise UsageError(f"{out}: not a relex synth output ({INFO_NAME}: {e})") from None
        with open(os.path.join(out, info["base"], "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        return cls(out, os.path.join(out, info["base"]), os.path.join(out, info["run"]),
                   {int(k): os.path.join(out, v) for k, v in info["checkpoints"].items()},
                   {int(k): os.path.join(out, v) for k, v in info["truth"].items()}, config, info)

    @property
    def steps(self) -> list[int]:
        return sorted(self.checkpoints)

    @property
    def params(self) -> TrajectoryParams:
        i = self.info
        return TrajectoryParams(i["seed"], i["drift"], i["noise"], i["curvature"], i["curvature_dir"], i["spread"])

    def plans(self) -> dict[str, TensorPlan]:
        """Stored tensor name -> its plan (scales), recomputed from ``synth.json``."""
        i = self.info
        shape = configs.ModelShape(**i["shape"])  # not SIZES: callers may add sizes of their own
        defs = configs.tensor_defs(i["arch"], shape, i["store_tied_head"])
        gen_steps = sorted(set(i["steps"]) | set(i["truth_steps"]))
        return {n: pl for pl in plan_tensors(defs, self.params, gen_steps[-1]) for n in pl.names}

    def master(self, name: str, step: int):
        """fp32 master values (before storage rounding) of ``name`` at a generated step or 0.

        Returns a new C-contiguous float32 array of the tensor's shape.
        """
        plan = self.plans()[name]
        gen_steps = sorted(set(self.info["steps"]) | set(self.info["truth_steps"]))
        return tensor_values(plan, self.params, gen_steps, step).reshape(plan.shape)

    def mean(self, name: str, step: int):
        """Noise-free fp32 trajectory θ₀ + t·u (+ curvature) of ``name`` at any step >= 0.

        Equal to :meth:`master` when noise is 0; the ground truth an extrapolation of a
        noisy run aims at. New float32 array of the tensor's shape.
        """
        plan = self.plans()[name]
        return tensor_values(plan, self.params, [], step, walk=False).reshape(plan.shape)


def _start_output(out_dir: str, overwrite: bool) -> tuple[str, str, list[str]]:
    """(final directory, the temporary one it is written in, the parent directories made for it)."""
    final = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(final)
    try:  # (like mkdir -p: 'relex synth runs/tiny' in a fresh directory; a failure removes what it made)
        made = make_dirs(parent)
    except OSError as e:
        raise OutputError(f"cannot create the parent directory {parent} of {final} ({e.strerror or e})") from None
    try:
        return final, _start_tmp(final, parent, overwrite), made
    except BaseException:
        remove_empty(made)
        raise


def _start_tmp(final: str, parent: str, overwrite: bool) -> str:
    if os.path.lexists(final):
        if not os.path.isdir(final) or os.path.islink(final):
            raise OutputError(f"{final} exists and is not a directory")
        if os.listdir(final):
            if not overwrite:
                raise OutputError(f"{final} exists and is not empty; pass --overwrite to replace it")
            if not os.path.isfile(os.path.join(final, INFO_NAME)):
                raise OutputError(f"{final} was not written by relex synth (no {INFO_NAME}); "
                                  "refusing to replace it: remove it yourself")
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.synth-", dir=parent)
    except OSError as e:
        raise OutputError(f"cannot create a directory in {parent} ({e.strerror or e})") from None
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


def _commit(tmp: str, final: str) -> None:
    old = None
    if os.path.isdir(final):
        if os.listdir(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
            os.rename(final, os.path.join(old, "x"))
        else:
            os.rmdir(final)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def _write_side_files(d: str, arch: str, shape: configs.ModelShape, dtype: str) -> None:
    os.makedirs(d, exist_ok=True)
    _dump(os.path.join(d, "config.json"), configs.config_json(arch, shape, dtype))
    _dump(os.path.join(d, "generation_config.json"), configs.generation_config_json(arch))
    write_tokenizer(d, shape.max_position)


def synthesize(out_dir, arch: str = "qwen3", size: str = "tiny", steps=range(1, 9), seed: int = 0,
               layout: str = "verl", noise: float = 1e-4, drift: float = 3e-4, curvature: float = 0.0,
               curvature_dir: str = "orth", spread: float = 0.5, dtype: str = "BF16",
               shard_bytes: int | None = None, tie: bool | None = None, store_tied_head: bool = False,
               truth_steps=(), overwrite: bool = False, quiet: bool = True,
               threads: int | None = None, world_size: int = 2, master_dtype: str | None = None) -> SynthRun:
    """Generate a synthetic RLVR run; see :mod:`relex_kernels.synth` for every parameter.

    ``layout`` ``verl-fsdp`` / ``verl-fsdp1`` / ``dcp``: the run's checkpoints are written by torch's
    own writers (FSDP2, or FSDP1 for ``verl-fsdp1``, over ``world_size`` gloo ranks; needs torch)
    in ``master_dtype`` (default ``dtype``), the base and the truth checkpoints in ``dtype`` as
    safetensors — fp32 masters beside a bf16 base, as verl leaves them, with ``master_dtype="F32"``.
    """
    shape = configs.resolve_shape(arch, size, tie)
    steps = layouts.check_steps(steps)
    truth_steps = sorted({int(s) for s in truth_steps})
    if truth_steps and truth_steps[0] < 1:
        raise UsageError("truth steps must be >= 1")
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    layouts.checkpoint_relpath(layout, 1)
    torch_layout = layout in layouts.TORCH_LAYOUTS
    if master_dtype is not None and (not torch_layout or master_dtype not in STORAGE_DTYPES):
        raise UsageError(f"master dtype is for the {'/'.join(layouts.TORCH_LAYOUTS)} layouts and one of "
                         f"{', '.join(STORAGE_DTYPES)}; got {master_dtype!r} with layout {layout!r}")
    if torch_layout and (not isinstance(world_size, int) or world_size < 1):
        raise UsageError(f"world size must be a positive integer, got {world_size!r}")
    gen_dtype = master_dtype or dtype  # torch layouts: everything generated at the masters' precision
    if shard_bytes is not None and shard_bytes < 1:
        raise UsageError("shard_bytes must be positive")
    threads = max(1, min(2, os.cpu_count() or 1)) if threads is None else int(threads)
    params = TrajectoryParams(int(seed), float(drift), float(noise), float(curvature), curvature_dir,
                              float(spread))
    defs = configs.tensor_defs(arch, shape, store_tied_head)
    gen_steps = sorted(set(steps) | set(truth_steps))
    plans = plan_tensors(defs, params, gen_steps[-1])
    specs = [TensorSpec(d.name, gen_dtype, d.shape) for d in defs]
    ckpt_bytes = sum(s.nbytes for s in specs)
    outputs = {0: "base"}
    finals = {s: os.path.join("run", layouts.checkpoint_relpath(layout, s)) for s in steps}
    outputs.update({s: os.path.join(".stage", f"step_{s}") if torch_layout else finals[s] for s in steps})
    outputs.update({s: os.path.join("truth", layouts.TRUTH_LAYOUT.format(step=s))
                    for s in truth_steps if s not in outputs})
    total = ckpt_bytes * len(outputs)

    final, tmp, made = _start_output(out_dir, overwrite)
    writers: list[ShardedWriter] = []
    try:
        free = shutil.disk_usage(tmp).free
        if free < total + (64 << 20):
            raise OutputError(f"{final}: needs {total / 1e9:.2f} GB, only {free / 1e9:.2f} GB free")
        os.makedirs(os.path.join(tmp, "run"))
        for s, rel in outputs.items():
            d = os.path.join(tmp, rel)
            _write_side_files(d, arch, shape, gen_dtype)
            if layout == "hf" and rel.startswith("run"):
                _dump(os.path.join(d, "trainer_state.json"), {"global_step": s, "epoch": None, "log_history": []})
        if layout.startswith("verl"):
            with open(os.path.join(tmp, "run", "latest_checkpointed_iteration.txt"), "w") as fh:
                fh.write(f"{steps[-1]}")
        # one writer per generated step, in chunk_trajectory's yield order (base first)
        order = [0] + gen_steps
        for s in order:
            writers.append(ShardedWriter(os.path.join(tmp, outputs[s]), specs,
                                         shard_bytes or DEFAULT_SHARD_BYTES, {"relex_synth_step": str(s)}))
        _fill(writers, plans, params, gen_steps, gen_dtype, threads, quiet, total)
        for w in writers:
            w.close(sync=True)
        writers = []
        if torch_layout:
            _to_torch_layout(tmp, outputs, finals, steps, truth_steps, layout, world_size, dtype, gen_dtype, arch,
                             shape, quiet)
            outputs.update(finals)
        info = {
            "format": "relex-synth", "version": 1, "arch": arch, "size": size, "shape": asdict(shape),
            "num_params": configs.param_count(defs), "seed": params.seed, "drift": params.drift,
            "noise": params.noise, "curvature": params.curvature, "curvature_dir": params.curvature_dir,
            "spread": params.spread, "dtype": dtype, "layout": layout, "steps": steps,
            "master_dtype": gen_dtype if torch_layout else None, "world_size": world_size if torch_layout else None,
            "truth_steps": truth_steps, "shard_bytes": shard_bytes, "tie": shape.tie,
            "store_tied_head": store_tied_head, "exact": params.noise == 0,
            "exact_up_to_step": exact_horizon(gen_steps[-1]) if params.noise == 0 else None,
            "bytes_per_checkpoint": ckpt_bytes, "total_bytes": total,
            "base": "base", "run": "run",
            "checkpoints": {str(s): outputs[s] for s in steps},
            "truth": {str(s): outputs[s] for s in truth_steps},
            "tensors": {n: pl.describe() for pl in plans for n in pl.names},
        }
        _dump(os.path.join(tmp, INFO_NAME), info)
        _commit(tmp, final)
    except BaseException:
        for w in writers:
            w.close(sync=False)
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)  # (the parents made for it: a failed run leaves nothing)
        raise
    return SynthRun.load(final)


def _to_torch_layout(tmp: str, outputs: dict, finals: dict, steps, truth_steps, layout: str, world: int,
                     dtype: str, gen_dtype: str, arch: str, shape, quiet: bool = True) -> None:
    """Rewrite the staged run checkpoints with torch's writers (:mod:`.torch_writers`), and the base
    and truth checkpoints in ``dtype`` when the masters were generated in another one."""
    from .torch_writers import save_many

    # every checkpoint in one process group of ``world`` ranks, each staged copy removed once written
    jobs = [(os.path.join(tmp, finals[s]), os.path.join(tmp, outputs[s])) for s in steps]
    save_many(jobs, world, layouts.TORCH_FORMATS[layout], remove_sources=True, progress=not quiet)
    if layout.startswith("verl"):
        for dst, _ in jobs:
            _write_side_files(os.path.join(dst, "huggingface"), arch, shape, dtype)  # config, tokenizer
    shutil.rmtree(os.path.join(tmp, ".stage"), ignore_errors=True)
    if gen_dtype != dtype:  # the base (and the truth) as the run started from it: rounded from the masters
        for s in [0] + list(truth_steps):
            d = os.path.join(tmp, outputs[s])
            _round_checkpoint(d, dtype)
            _write_side_files(d, arch, shape, dtype)


def _round_checkpoint(d: str, dtype: str) -> None:
    """Rewrite checkpoint ``d`` in ``dtype``, each tensor rounded from the stored one, a tensor at a
    time (memory: the largest tensor, not the checkpoint: 6 GB for the 1.5b size's fp32 masters)."""
    from ..io import Checkpoint
    from ..io.dtypes import from_float32, to_float32
    from ..io.writer import write_tensors

    def rounded(ck):
        for n, loc in ck.tensors.items():
            yield n, from_float32(to_float32(loc.file.view(n), loc.info.dtype), dtype)
            loc.file.release(n)
    new = d + ".rounded"
    os.makedirs(new)
    ck = Checkpoint(d)
    try:
        write_tensors(new, [TensorSpec(n, dtype, loc.info.shape) for n, loc in ck.tensors.items()], rounded(ck))
    finally:
        ck.close()
    for f in os.listdir(d):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.unlink(os.path.join(d, f))
    for f in os.listdir(new):
        os.replace(os.path.join(new, f), os.path.join(d, f))
    os.rmdir(new)


def round_into(x: np.ndarray, dtype: str, out: np.ndarray, tmp: np.ndarray) -> None:
    """``out[...] = dtypes.from_float32(x, dtype)`` for finite ``x``, without temporaries.

    ``x``: 1-D float32; ``out``: its raw storage view; ``tmp``: uint32 scratch of x's size.
    (Fresh megabyte temporaries per call cost more in page faults than the arithmetic.)
    """
    if dtype == "BF16":
        u = x.view(np.uint32)
        np.right_shift(u, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.add(tmp, u, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(out, tmp, casting="unsafe")
    elif dtype in ("F16", "F32"):
        np.copyto(out, x, casting="same_kind")  # IEEE conversion: round-to-nearest-even
    else:
        dtypes.from_float32(x, dtype, out=out)


class _WriteBehind:
    """Starts the kernel's writeback of each finished window (``posix_fadvise(DONTNEED)``
    queues it without waiting, and without the GIL), so the disk works while the next
    windows compute and the writer's synchronous :meth:`~ShardedWriter.release` later
    finds the pages already written. Advice only: any failure turns it off."""

    def __init__(self, writers: list[ShardedWriter]):
        self.fds: list[int] = []
        self.where: dict[tuple[int, str], tuple[int, int]] = {}
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            for i, w in enumerate(writers):
                for fname in sorted(set(w.weight_map.values())):
                    path = os.path.join(w.directory, fname)
                    with SafetensorsFile(path) as f:  # the header is written at creation
                        begins = {n: t.begin for n, t in f.tensors.items()}
                    fd = os.open(path, os.O_RDONLY)
                    self.fds.append(fd)
                    for n, b in begins.items():
                        self.where[i, n] = (fd, b)
        except (OSError, RelexError):
            self.where = {}

    def kick(self, i: int, name: str, lo: int, hi: int, isz: int) -> None:
        fd_b = self.where.get((i, name))
        if fd_b is not None and hi > lo:
            try:
                os.posix_fadvise(fd_b[0], fd_b[1] + lo * isz, (hi - lo) * isz, os.POSIX_FADV_DONTNEED)
            except OSError:
                self.where = {}

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _fill(writers: list[ShardedWriter], plans: list[TensorPlan], params: TrajectoryParams,
          gen_steps: list[int], dtype: str, threads: int, quiet: bool, total: int) -> None:
    from tqdm import tqdm

    isz = dtypes.itemsize(dtype)
    local = threading.local()

    def do_chunk(plan: TensorPlan, lo: int, hi: int) -> None:
        if getattr(local, "scratch", None) is None:
            local.scratch, local.u32 = Scratch(), np.empty(CHUNK, np.uint32)
        tmp = local.u32[:hi - lo]
        for w, x in zip(writers, chunk_trajectory(plan, params, gen_steps, lo, hi, True, local.scratch)):
            for name in plan.names:
                round_into(x, dtype, w.view(name, lo, hi), tmp)

    def finish(job) -> None:
        """Wait for a window, start its writeback; release the one written _LAG windows ago."""
        plan, lo, hi, futs = job
        for f in futs:
            f.result()
        for i in range(len(writers)):
            for name in plan.names:
                behind.kick(i, name, lo, hi, isz)
        written.append(job)
        while len(written) > _LAG:
            release(written.popleft())

    def release(job) -> None:
        plan, lo, hi, _ = job
        for w in writers:
            for name in plan.names:
                w.release(name, lo, hi)
        bar.update((hi - lo) * isz * len(plan.names) * len(writers))

    per_elem = isz * len(writers)
    window = max(CHUNK, _WINDOW_BYTES // per_elem // CHUNK * CHUNK)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="relex synth", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    pending: deque = deque()
    written: deque = deque()
    behind = _WriteBehind(writers)
    with worker_pool(threads, "relex-synth") as pool:
        try:
            for plan in plans:
                for wlo in range(0, plan.numel, window):
                    whi = min(wlo + window, plan.numel)
                    futs = [pool.submit(do_chunk, plan, lo, min(lo + CHUNK, whi)) for lo in range(wlo, whi, CHUNK)]
                    pending.append((plan, wlo, whi, futs))
                    # release the previous window while this one computes
                    while len(pending) > 1:
                        finish(pending.popleft())
            while pending:
                finish(pending.popleft())
            while written:
                release(written.popleft())
        except BaseException:
            for job in pending:
                for f in job[3]:
                    f.cancel()
            raise
        finally:
            bar.close()
            behind.close()
