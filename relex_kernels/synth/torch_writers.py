"""Checkpoints in trainers' own formats, written by torch's own writers (needs torch).

* :func:`save_verl_fsdp` — a verl FSDP actor directory: each rank of a CPU ``gloo`` process
  group builds a module with the given parameters, shards it with FSDP2 (``fully_shard`` over a
  1-D device mesh, with verl's placement rule: ``Shard(i)`` on the first dimension that divides
  by W, else ``Shard(0)``) and does what verl's ``FSDPCheckpointManager.save_checkpoint`` does:
  ``torch.save(model.state_dict())`` to ``model_world_size_{W}_rank_{R}.pt`` (DTensors, row
  blocks uneven where dimension 0 does not divide by W), an optimizer and an extra-state file
  beside it, and ``fsdp_config.json`` from rank 0;
* :func:`save_dcp` — ``torch.distributed.checkpoint.save`` of the FSDP2-sharded model under a
  ``"model"`` key (accelerate's sharded FSDP layout), over ``world`` gloo ranks, or from one
  process without a process group when ``world`` is 1.

``relex synth --layout verl-fsdp|dcp`` and the tests use them, so the readers are tested on
files torch wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

from ..errors import UsageError


def _torch():
    try:
        import torch
        import torch.distributed  # noqa: F401
    except ImportError as e:
        raise UsageError(f"this layout is written by torch's own writers: install torch ({e})") from None
    return torch


def build_module(values: dict):
    """A module tree whose ``named_parameters`` are exactly ``values``' names and shapes."""
    torch = _torch()
    root = torch.nn.Module()
    for name, v in values.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, torch.nn.Parameter(torch.empty(v.shape, dtype=v.dtype), requires_grad=False))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_checkpoint_dir(path: str) -> dict:
    """The tensors of a safetensors checkpoint directory as torch tensors ({name: tensor}), copied
    out of the files (which may be removed after)."""
    import numpy as np

    from ..io import Checkpoint
    torch = _torch()
    bits = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    ck = Checkpoint(path)
    try:
        out = {}
        for n, loc in ck.tensors.items():
            raw = np.array(loc.file.view(n)).reshape(loc.info.shape)
            t = torch.from_numpy(raw.view(np.int16) if raw.dtype.itemsize == 2 else raw)
            out[n] = t.view(bits[loc.info.dtype])
        return out
    finally:
        ck.close()


def _save_one(model_values: dict, world: int, out_dir: str, fmt: str, replicas: int) -> None:
    """One checkpoint from this rank: ``model_values`` into an FSDP2-sharded module, saved as ``fmt``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    rank = dist.get_rank()
    model = build_module(model_values)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(model_values[n])
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        dcp.save({"model": model.state_dict(), "step": 0}, checkpoint_id=out_dir)
        return
    # verl's FSDP2 actor: the first dimension that divides by the shard count, else rows
    from torch.distributed.tensor import Shard
    shards = world // replicas

    def verl_placement(param):
        return next((Shard(i) for i, d in enumerate(param.shape) if d % shards == 0), Shard(0))
    # HSDP (replicas > 1): verl's ("ddp", "fsdp") mesh, each replica holding every shard
    mesh = init_device_mesh("cpu", (world,)) if replicas == 1 else \
        init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("ddp", "fsdp"))
    fully_shard(model, mesh=mesh, shard_placement_fn=verl_placement)
    torch.save(model.state_dict(), os.path.join(out_dir, f"model_world_size_{world}_rank_{rank}.pt"))
    torch.save({"state": {}, "param_groups": []}, os.path.join(out_dir, f"optim_world_size_{world}_rank_{rank}.pt"))
    torch.save({"lr_scheduler": None}, os.path.join(out_dir, f"extra_state_world_size_{world}_rank_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "fsdp_config.json"), "w") as fh:
            json.dump({"FSDP_version": 2, "world_size": world}, fh, indent=4)


def _rank(rank: int, world: int, port: int, jobs: list, fmt: str, replicas: int, remove_sources: bool,
          progress: bool) -> None:
    """One rank process: every checkpoint of ``jobs`` ([(out_dir, source)]; a source is a ``.pt``
    file of values or a safetensors checkpoint directory) in turn, in one process group."""
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bar = None
    if progress and rank == 0:
        import sys

        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="ckpt", desc=f"relex synth: {fmt} writer, {world} ranks", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        for out_dir, source in jobs:
            values = load_checkpoint_dir(source) if os.path.isdir(source) else torch.load(source)
            _save_one(values, world, out_dir, fmt, replicas)
            del values
            dist.barrier()  # every rank done with the source before it goes
            if rank == 0:
                if remove_sources and os.path.isdir(source):
                    shutil.rmtree(source)
                if bar is not None:
                    bar.update(1)
        dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        dist.destroy_process_group()


def save_many(jobs: list, world: int, fmt: str = "verl", replicas: int = 1, remove_sources: bool = False,
              progress: bool = False) -> list[str]:
    """Write each checkpoint of ``jobs`` ([(out_dir, values)]; ``values`` a {name: tensor} dict, or
    the path of a safetensors checkpoint directory each rank reads) as ``fmt`` (``"verl"`` rank
    files or ``"dcp"``) over ``world`` gloo ranks, all in one process group: starting the ranks
    (a process each, importing torch and joining the group) takes seconds, more than writing a
    small checkpoint, so a run of a hundred checkpoints pays it once. ``remove_sources``: delete
    each source directory once its checkpoint is written (the disk holds one copy of the run).
    ``"dcp"`` over one rank is saved from this process, without a group (:func:`save_dcp`)."""
    torch = _torch()
    import torch.multiprocessing as mp
    if world < 1:
        raise UsageError(f"world size must be >= 1, got {world}")
    if replicas < 1 or world % replicas:
        raise UsageError(f"replicas must divide the world size {world}, got {replicas}")
    if fmt == "dcp" and world == 1:  # one process saving the plain state dict: no process group
        for out_dir, values in jobs:
            save_dcp(out_dir, load_checkpoint_dir(values) if isinstance(values, (str, os.PathLike)) else values, 1)
            if remove_sources and isinstance(values, (str, os.PathLike)):
                shutil.rmtree(values)
        return [out_dir for out_dir, _ in jobs]
    if not jobs:
        return []
    temps, args = [], []
    try:
        for out_dir, values in jobs:
            os.makedirs(out_dir, exist_ok=True)
            if isinstance(values, (str, os.PathLike)):
                args.append((out_dir, os.fspath(values)))
                continue
            fd, path = tempfile.mkstemp(prefix=".relex-values-", suffix=".pt",
                                        dir=os.path.dirname(os.path.abspath(out_dir)))
            os.close(fd)
            temps.append(path)
            torch.save(values, path)
            args.append((out_dir, path))
        mp.spawn(_rank, args=(world, _free_port(), args, fmt, replicas, remove_sources, progress), nprocs=world,
                 join=True)
    finally:
        for path in temps:
            os.unlink(path)
    return [out_dir for out_dir, _ in jobs]


def save_verl_fsdp(out_dir: str, values: dict, world: int, replicas: int = 1) -> str:
    """Write ``values`` ({name: tensor}) as a verl FSDP actor directory of ``world`` rank files;
    ``replicas`` > 1: HSDP, a (replicas, world / replicas) mesh as verl builds with ``fsdp_size``."""
    return save_many([(out_dir, values)], world, "verl", replicas)[0]


def save_dcp(out_dir: str, values: dict, world: int = 1) -> str:
    """Write ``values`` as a DCP directory: FSDP2-sharded over ``world`` gloo ranks, or (1) from one
    process saving the plain state dict, with an optimizer state and a step beside the model."""
    if world > 1:
        return save_many([(out_dir, values)], world, "dcp")[0]
    torch = _torch()
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves without a process group
        dcp.save({"model": dict(values), "optimizer": {"state": {"0": torch.zeros(3)}}, "step": 0},
                 checkpoint_id=out_dir)
    return out_dir
