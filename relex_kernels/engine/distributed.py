"""SPMD runs over ``torch.distributed``: many processes, one output, byte-identical to one process.

``torchrun --nproc-per-node N -m relex_kernels extrapolate ...`` (or ``srun`` with one
task per rank) runs the same command in N processes; :func:`active` sees the
launcher's environment and ``run._execute`` hands the run to :func:`.spmd.execute`
(this module: the launcher's environment, the process group and its status
all-reduce; :mod:`.spmd`: one rank's part of the run, over the one :mod:`.plan`):

1. every rank opens the inputs (headers only) and computes the same byte-balanced
   :mod:`.partition` plan; rank 0 reserves the output (lock, partial directories,
   every output file created at its planned size and header); a status all-reduce
   checks that every rank agrees on the plan; ranks > 0 then open those files
   (``ShardedWriter(reuse=True)``);
2. each rank does its whole tensors as one process would (Gram, fit, weighted sum,
   pages read once when they fit the budget) and the Gram block sums of its pieces
   of split tensors (kept mapped until pass 2 as far as the budget allows, so they
   too are read once); ONE fp64 all-reduce then carries every rank's status, the Gram
   of each whole tensor (for rank 0's report and fit file) and the block sums, each
   in its own slot, so the sum is exact whatever the reduction order; every rank
   adds a split tensor's block sums in block order: the single-process Gram
   (two-level order, :mod:`.streaming`), bit for bit;
3. each rank writes its pieces of the split tensors (no communication), syncs, and
   after a status all-reduce rewrites its bytes in pages it shares with another
   rank (``pwrite``: a network filesystem writes back whole pages of a shared
   mapping, which could put stale bytes over a neighbour's); after one more status
   all-reduce rank 0 writes the index and the side files and renames the outputs
   into place; a last status all-reduce tells everyone whether that worked.

A rank that fails reports it at the next status all-reduce; every rank then exits
with the failing rank's message and rank 0 removes the partial outputs. A rank that
dies breaks the collectives (connection closed) or, failing that, they time out
after ``RELEX_DIST_TIMEOUT`` seconds (default 1800); SIGTERM (torchrun stopping
the other workers) or Ctrl-C removes the partial outputs and ends the process at once
(exit status 143 / 130). Only rank 0 renames outputs, and only after
every rank reported its part written and synced. Distributed runs do not resume:
they start afresh (``resume`` is ignored).

Memory: ``--memory-budget`` is per rank; by default 1 GiB (a quarter of the node's RAM if less) shared
by the ranks on the node (``LOCAL_WORLD_SIZE``). Every rank maps the input headers
and reads only its own byte ranges, so inputs belong on a filesystem all nodes share.

Environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` (torchrun), else ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
inside an ``srun`` step (``MASTER_ADDR`` defaults to the step's first node).
``RELEX_DISTRIBUTED=0`` forces a single process; ``RELEX_DIST_BACKEND`` overrides
gloo (CPU) / nccl (GPU backends). Test hook: ``RELEX_TEST_DIST_KILL=RANK:POINT[:raise|:hang]``
SIGKILLs (or fails, or hangs) that rank at ``setup``, ``work`` (after its first tensor of
pass 1), ``pass2`` or ``commit``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from ..errors import InputError, RelexError, RelexWarning, UsageError

DEFAULT_TIMEOUT_S = 1800
#: how long the ranks may take to find each other at the start
INIT_TIMEOUT_S = 600


class DistributedError(RelexError):
    """Another rank failed, died or timed out; this rank stopped without completing any output."""


class _Terminated(BaseException):
    """SIGTERM arrived (torchrun or srun stopping the job): unwind, clean up, exit."""


# -- environment -------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    init_method: str  # "env://" (torchrun) or "tcp://host:port" (srun)
    launcher: str


def _first_int(text: str | None, default: int = 1) -> int:
    digits = ""
    for ch in text or "":
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else default


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``'gpu[003-004,9],cpu1'`` -> ``'gpu003'``."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    prefix, rng = head.split("[", 1)
    return prefix + rng.split(",")[0].split("-")[0].rstrip("]")


def detect(environ=None) -> DistEnv | None:
    """The launcher's view of this process, or None for a single-process run."""
    env = os.environ if environ is None else environ
    flag = env.get("RELEX_DISTRIBUTED", "auto").strip().lower()
    if flag in ("0", "off", "no", "false"):
        return None
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
            local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
            init, launcher = "env://", "torchrun"
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
            # inside an srun step (a batch script alone has no step id: it is one process)
            world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
            rank = int(env["SLURM_PROCID"])
            local_rank = int(env.get("SLURM_LOCALID", "0"))
            local_world = _first_int(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE"))
            host = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST")
                                                        or env.get("SLURM_JOB_NODELIST") or "localhost")
            step = _first_int(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"), 0)
            port = env.get("MASTER_PORT") or str(20000 + (_first_int(env.get("SLURM_JOB_ID"), 0) * 7 + step) % 20000)
            init, launcher = f"tcp://{host}:{int(port)}", "srun"
        else:
            world = 1
    except ValueError as e:
        raise UsageError(f"cannot read the distributed launch environment: {e}") from None
    if world <= 1:
        if flag in ("1", "on", "yes", "true") and world < 1:
            raise UsageError("RELEX_DISTRIBUTED=1 but no launcher environment (RANK/WORLD_SIZE or an srun step)")
        return None
    if not 0 <= rank < world:
        raise UsageError(f"rank {rank} is outside the world of {world} processes")
    return DistEnv(rank, world, local_rank, max(1, local_world), init, launcher)


def active() -> bool:
    """Whether this process is one rank of a multi-process run."""
    return detect() is not None


#: the commands that run as SPMD ranks; any other would just run N times over the same files
SPMD_COMMANDS = ("extrapolate", "predict", "backends")


def cli_rank_setup(args) -> None:
    """The CLI under a launcher: refuse commands that do not split their work; quiet ranks > 0."""
    env = detect()
    if env is None:
        return
    if args.command not in SPMD_COMMANDS:
        raise UsageError(f"'relex {args.command}' does not run under torchrun / srun ({env.world} processes); "
                         "run it as one process (or set RELEX_DISTRIBUTED=0)")
    if env.rank > 0 and hasattr(args, "quiet"):
        args.quiet = True
    if env.rank > 0:  # every rank opens the same inputs: rank 0 alone says what is odd about them
        warnings.filterwarnings("ignore", category=RelexWarning)


# -- process group and the status protocol -----------------------------------------
def _timeout_s() -> float:
    text = os.environ.get("RELEX_DIST_TIMEOUT", "").strip()
    try:
        t = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"RELEX_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if t <= 0:
        raise UsageError(f"RELEX_DIST_TIMEOUT must be positive, got {text!r}")
    return t


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, RelexError) else f"{type(e).__name__}: {text}"


def rank_gpu(rank: int, local_rank: int, visible: int) -> int:
    """The GPU index of a rank: its ``LOCAL_RANK`` among the node's visible GPUs, or the one GPU a
    launcher left visible to it (``CUDA_VISIBLE_DEVICES`` per task, e.g. ``srun --gpus-per-task=1``)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    # one GPU per rank: say so, not CUDA's "invalid device ordinal" from deep inside torch
    raise UsageError(f"rank {rank} has LOCAL_RANK {local_rank} but this node shows {visible} GPU"
                     f"{'s' * (visible != 1)}: start at most {visible} ranks per node (torchrun "
                     "--nproc-per-node), or give each rank its own GPU with CUDA_VISIBLE_DEVICES")


class Group:
    """The process group, and all-reduces that carry every rank's status with their payload."""

    def __init__(self, env: DistEnv, backend: str):
        try:
            import torch
            import torch.distributed as dist
        except ImportError as e:
            raise UsageError(f"a multi-process run needs torch.distributed ({e}); install torch") from None
        self.torch, self.dist, self.env = torch, dist, env
        self.rank, self.world = env.rank, env.world
        self.timeout = _timeout_s()
        self.backend = os.environ.get("RELEX_DIST_BACKEND") or (
            "nccl" if backend in ("cuda", "triton") and torch.cuda.is_available() else "gloo")
        self.device = torch.device("cpu")
        if backend in ("cuda", "triton") and torch.cuda.is_available():
            # the rank's GPU for the device pipeline (whatever carries the collectives)
            gpu = torch.device("cuda", rank_gpu(env.rank, env.local_rank, torch.cuda.device_count()))
            torch.cuda.set_device(gpu)
            if self.backend == "nccl":
                self.device = gpu
        self.owns = not dist.is_initialized()
        if self.owns:
            # joining tolerates ranks that start minutes apart (torch imported from a busy shared
            # filesystem); the run's own collectives use RELEX_DIST_TIMEOUT (a group of their own)
            kw = dict(backend=self.backend, rank=env.rank, world_size=env.world,
                      timeout=timedelta(seconds=max(self.timeout, INIT_TIMEOUT_S)))
            if env.init_method != "env://":
                kw["init_method"] = env.init_method
            try:
                dist.init_process_group(**kw)
            except Exception as e:
                raise DistributedError(f"rank {env.rank}: cannot join the {env.world} processes "
                                       f"({env.launcher}, {self.backend}): {_one_line(e)[:300]}") from None
        elif (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world):
            raise UsageError("torch.distributed is initialised with another rank / world size than the environment")
        try:
            self.pg = dist.new_group(backend=self.backend, timeout=timedelta(seconds=self.timeout))
        except Exception as e:
            raise DistributedError(f"rank {env.rank}: cannot set up the process group: {_one_line(e)[:300]}") from None

    def _wait(self, work) -> None:
        # poll instead of blocking in C++, so that SIGTERM / Ctrl-C are handled while we wait
        while not work.is_completed():
            time.sleep(0.005)
        work.wait()

    def status(self, phase: str, error: BaseException | None, payload: np.ndarray | None = None) -> np.ndarray:
        """All-reduce (sum, fp64) of [failed flag per rank | payload]; raises if any rank failed.

        Returns the summed payload. A failing rank re-raises its own ``error``; the
        others raise :class:`DistributedError` with its message.
        """
        n = self.world
        size = 0 if payload is None else payload.size
        buf = np.zeros(n + size, dtype=np.float64)
        buf[self.rank] = 1.0 if error is not None else 0.0
        if size:
            buf[n:] = payload.ravel()
        t = self.torch.from_numpy(buf).to(self.device)
        try:
            self._wait(self.dist.all_reduce(t, group=self.pg, async_op=True))
        except Exception as e:
            raise self._lost(phase, e) from None
        out = t.cpu().numpy()
        failed = [r for r in range(n) if out[r] != 0]
        if not failed:
            return out[n:]
        msgs: list = [None] * n
        try:  # every rank learns why (collective: everyone is here)
            self.dist.all_gather_object(msgs, None if error is None else _one_line(error), group=self.pg)
        except Exception:
            pass
        if error is not None:
            raise error
        r = failed[0]
        raise DistributedError(f"rank {r} failed during {phase}: {msgs[r] or 'see its log'}; "
                               "no output was completed")

    def _lost(self, phase: str, e: Exception) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}: lost contact with another rank during {phase} (it died, or did not answer "
            f"within {self.timeout:g} s); no output was completed [{_one_line(e)[:160]}]")

    def gather(self, phase: str, text: str) -> list[str]:
        """Every rank's ``text``, in rank order."""
        out: list = [None] * self.world
        try:
            self.dist.all_gather_object(out, text, group=self.pg)
        except Exception as e:
            raise self._lost(phase, e) from None
        return out

    def close(self) -> None:
        if self.owns and self.dist.is_initialized():
            try:
                self.dist.destroy_process_group()
            except Exception:
                pass


def kernel_mismatch(kernels: list[str]) -> str | None:
    """None when every rank sums the Gram with the same kernel (``kernels[rank]``: :attr:`Backend.identity`),
    else the error naming each rank's: Gram blocks of different kernels add up to no single run's Gram."""
    if len(set(kernels)) <= 1:
        return None
    ranks: dict[str, list[int]] = {}
    for r, k in enumerate(kernels):
        ranks.setdefault(k, []).append(r)
    which = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {k}" for k, rs in ranks.items())
    return (f"the ranks would sum the Gram with different kernels ({which}), and their Gram blocks would "
            "match no single run: give every rank the same --backend, RELEX_SIMD and RELEX_GRAM_PRECISION on "
            "nodes of the same kind, and the same build of relex_kernels (its extension solves the T x T Grams)")


def _test_hook(rank: int, point: str) -> None:
    spec = os.environ.get("RELEX_TEST_DIST_KILL", "")
    if not spec:
        return
    r, _, rest = spec.partition(":")
    where, _, how = rest.partition(":")
    if r.strip() == str(rank) and where == point:
        if how == "raise":
            raise InputError(f"test failure injected on rank {rank} at {point}")
        if how == "hang":  # a rank that stops answering: the others time out
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)
