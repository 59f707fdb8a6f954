"""Fixtures in trainers' formats, written by torch's own writers: the product's
:mod:`relex_kernels.synth.torch_writers` (FSDP2 over a CPU gloo group + ``torch.save`` as verl
saves; ``torch.distributed.checkpoint.save``), under the names the tests use."""

from __future__ import annotations

import os

from relex_kernels.synth.torch_writers import (  # noqa: F401
    _free_port, build_module, rank_group, save_dcp, save_many, save_verl_fsdp)


def save_fsdp(out_dir: str, values, world: int, fmt: str = "verl") -> str:
    if fmt == "dcp":
        return save_dcp(out_dir, values, world)
    return save_verl_fsdp(out_dir, values, world)


def save_dcp_single(out_dir: str, values) -> str:
    return save_dcp(out_dir, values, 1)


def _whole_module(values: dict):
    """The module of ``values`` built whole on the CPU, holding them (names and shapes as the product's)."""
    import torch
    model = build_module(values)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])
    return model


def _spawn(fn, world: int, jobs: list, *args) -> None:
    """Run ``fn(rank, world, port, [(out_dir, values .pt)], *args)`` on ``world`` ranks, each job's
    values saved to a temporary ``.pt`` for them."""
    import tempfile

    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (out_dir, values) in enumerate(jobs):
            os.makedirs(out_dir, exist_ok=True)
            paths.append((out_dir, os.path.join(tmp, f"{i}.pt")))
            torch.save(values, paths[-1][1])
        mp.spawn(fn, args=(world, _free_port(), paths, *args), nprocs=world, join=True)


def _reference_rank(rank: int, world: int, port: int, jobs: list, replicas: int) -> None:
    """The textbook way (and this product's before it sharded on the meta device): every rank builds
    the whole module from full tensors and ``fully_shard`` cuts it, with verl's placement rule."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    with rank_group(rank, world, port):
        shards = world // replicas
        mesh = init_device_mesh("cpu", (world,)) if replicas == 1 else \
            init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("ddp", "fsdp"))
        for out_dir, path in jobs:
            model = _whole_module(torch.load(path))
            fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: next(
                (Shard(i) for i, d in enumerate(p.shape) if d % shards == 0), Shard(0)))
            torch.save(model.state_dict(), os.path.join(out_dir, f"model_world_size_{world}_rank_{rank}.pt"))


def save_reference_fsdp(out_dir: str, values: dict, world: int, replicas: int = 1) -> str:
    """Model rank files written by :func:`_reference_rank` (no optimizer or extra-state files)."""
    _spawn(_reference_rank, world, [(out_dir, values)], replicas)
    return out_dir


def _accelerate_fsdp1_rank(rank: int, world: int, port: int, jobs: list) -> None:
    """accelerate's FSDP1 sharded save: ``FullyShardedDataParallel`` (ShardedTensors), its
    ``SHARDED_STATE_DICT`` saved by ``torch.distributed.checkpoint`` under a ``"model"`` key —
    every job ([(out_dir, values .pt)]) in one group."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType
    with rank_group(rank, world, port):
        for out_dir, path in jobs:
            model = FSDP(_whole_module(torch.load(path)), device_id=torch.device("cpu"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()):
                    dcp.save({"model": model.state_dict()}, checkpoint_id=out_dir)


def save_accelerate_fsdp1(jobs: list, world: int) -> list[str]:
    """DCP directories as accelerate's FSDP1 ``SHARDED_STATE_DICT`` writes them, one per
    (out_dir, values) job, over ``world`` gloo ranks."""
    _spawn(_accelerate_fsdp1_rank, world, jobs)
    return [out_dir for out_dir, _ in jobs]
