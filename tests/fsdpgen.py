"""Fixtures in trainers' formats, written by torch's own writers: the product's
:mod:`relex_kernels.synth.torch_writers` (FSDP2 over a CPU gloo group + ``torch.save`` as verl
saves; ``torch.distributed.checkpoint.save``), under the names the tests use."""

from __future__ import annotations

from relex_kernels.synth.torch_writers import build_module, save_dcp, save_many, save_verl_fsdp  # noqa: F401


def save_fsdp(out_dir: str, values, world: int, fmt: str = "verl") -> str:
    if fmt == "dcp":
        return save_dcp(out_dir, values, world)
    return save_verl_fsdp(out_dir, values, world)


def save_dcp_single(out_dir: str, values) -> str:
    return save_dcp(out_dir, values, 1)
