"""verl FSDP actor checkpoints written by torch's own writers, for the readers' tests.

Each rank of a CPU ``gloo`` process group builds the module, loads the given full fp32
values, shards it with FSDP2 (``fully_shard`` over a 1-D device mesh) and does what verl's
``FSDPCheckpointManager.save_checkpoint`` does: ``torch.save(model.state_dict())`` to
``model_world_size_{W}_rank_{R}.pt`` (DTensors, ``Shard(0)``, uneven row blocks where a
dimension does not divide by W), an optimizer and an extra-state file beside it, and
``fsdp_config.json`` from rank 0.
"""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def build_module(values: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose ``named_parameters`` are exactly ``values``' names and shapes."""
    root = nn.Module()
    for name, v in values.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, nn.Parameter(torch.empty(v.shape, dtype=v.dtype)))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, values_path: str, out_dir: str, fmt: str = "verl") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        values = torch.load(values_path)
        model = build_module(values)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(values[n])
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        if fmt == "dcp":  # as accelerate's sharded FSDP save does: the model under a "model" key
            import torch.distributed.checkpoint as dcp
            dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=out_dir)
            dist.barrier()
            return
        torch.save(model.state_dict(), os.path.join(out_dir, f"model_world_size_{world}_rank_{rank}.pt"))
        torch.save({"state": {}, "param_groups": []}, os.path.join(out_dir, f"optim_world_size_{world}_rank_{rank}.pt"))
        torch.save({"lr_scheduler": None}, os.path.join(out_dir, f"extra_state_world_size_{world}_rank_{rank}.pt"))
        if rank == 0:
            with open(os.path.join(out_dir, "fsdp_config.json"), "w") as fh:
                json.dump({"FSDP_version": 2, "world_size": world}, fh, indent=4)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_fsdp(out_dir: str, values: dict[str, torch.Tensor], world: int, fmt: str = "verl") -> str:
    """Write ``values`` as a verl FSDP actor directory ``out_dir`` of ``world`` rank files, or with
    ``fmt="dcp"`` as a torch.distributed.checkpoint directory of the FSDP2-sharded model."""
    os.makedirs(out_dir, exist_ok=True)
    values_path = os.path.join(os.path.dirname(os.path.abspath(out_dir)), f".{os.path.basename(out_dir)}.values.pt")
    torch.save(values, values_path)
    try:
        mp.spawn(_rank, args=(world, _free_port(), values_path, out_dir, fmt), nprocs=world, join=True)
    finally:
        os.unlink(values_path)
    return out_dir


def save_dcp_single(out_dir: str, values: dict[str, torch.Tensor]) -> str:
    """One process, no process group: ``torch.distributed.checkpoint.save`` of a plain state dict
    (model under "model", an optimizer state and a step beside it, as training loops save)."""
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": dict(values), "optimizer": {"state": {"0": torch.zeros(3)}}, "step": 3}, checkpoint_id=out_dir)
    return out_dir
