"""One streaming pass that builds every tensor's Gram over history ∪ later checkpoints.

The diagnostics need, per tensor, the inner products of the deltas of *all* the
checkpoints they look at: the history rows/columns give the fit, the later ones are
what the fit is checked against (method §2, "add it as an extra row/column of the
Gram"). This is pass 1 of the engine on a trajectory opened with every checkpoint:
the same readers, the same op backends, the same memory budget — and no pass 2, so
pages are released as soon as a tensor is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..engine import plan
from ..engine.executor import Executor, progress_bar
from ..engine.streaming import Streamer
from ..engine.trajectory import Trajectory
from ..errors import UsageError
from ..ops import get_backend


@dataclass
class TensorGram:
    """One fitted tensor: ``gram`` is (N, N) float64 over ``GramPass.steps`` (ascending)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    gram: np.ndarray


@dataclass
class GramPass:
    steps: list[int]
    tensors: list[TensorGram]
    seconds: float
    bytes_read: int
    backend: str
    memory_budget: int
    base: str = ""
    checkpoints: dict[int, str] = field(default_factory=dict)
    tied: tuple[str, str] | None = None

    def index(self, step: int) -> int:
        return self.steps.index(step)


def extended_grams(base: str, checkpoints: dict[int, str], *, memory_budget: int | None = None,
                   backend: str | None = None, progress: bool = False, desc: str = "relex") -> GramPass:
    """Gram of every fitted tensor over all ``checkpoints`` ({step: dir}), in one pass.

    Tensors that are not fitted (integer tensors, a head tied to the embedding) are
    skipped. Reads each input byte once; memory stays within ``memory_budget``
    (default: 1 GiB, or a quarter of RAM if less) plus the N x N Grams.
    """
    if not checkpoints:
        raise UsageError("no checkpoints to analyse")
    be = get_backend(backend)
    budget = plan.resolve_budget(memory_budget)
    t0 = time.perf_counter()
    traj = Trajectory(base, checkpoints)
    streamer = None
    try:
        streamer = Streamer(traj, be, budget)
        work = plan.diagnostics(traj, streamer.policy)  # gram-only items: no pass 2, pages released at once
        streamer.progress = progress_bar(work.read_bytes(traj.T), progress, desc)
        out = []
        Executor(streamer, None, on_gram=lambda it, G: out.append(
            TensorGram(it.job.name, it.job.dtype, it.job.shape, it.job.numel, G))).run(work.items)
        return GramPass(steps=list(traj.steps), tensors=out, seconds=time.perf_counter() - t0,
                        bytes_read=streamer.bytes_read, backend=be.name, memory_budget=budget,
                        base=traj.base.path, checkpoints={ck.step: ck.path for ck in traj.ckpts},
                        tied=traj.tied)
    finally:
        if streamer is not None:
            streamer.close()  # (its progress bar, its read-ahead thread: also after an error)
        traj.close()
