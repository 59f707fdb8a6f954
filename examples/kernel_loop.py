"""The kernel-level loop another tool (a merge tool, a checkpoint converter) would write.

    python examples/kernel_loop.py [OUT_DIR]

Per tensor: a :class:`relex_kernels.GramAccumulator` fed in row blocks as they are read,
a :class:`relex_kernels.Fit` from the Gram, and :func:`relex_kernels.combine` for the
weighted sum — the same bytes as ``relex extrapolate`` writes, which the script checks.
The trajectory is a synthetic one (``relex synth``'s generator, tiny model).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import relex_kernels as rk
from relex_kernels.synth import synthesize

ROWS_PER_PIECE = 64  # what a tool reading row blocks would hand over


def predict_file(base_file: str, history_files: dict[int, str], target: int, out_file: str) -> int:
    steps = sorted(history_files)
    hist = [safe_open(history_files[s], "pt") for s in steps]
    out = {}
    with safe_open(base_file, "pt") as base:
        for name in base.keys():
            b = base.get_slice(name)
            x = base.get_tensor(name)
            if not x.is_floating_point():
                out[name] = x
                continue
            acc = rk.GramAccumulator()
            rows = x.shape[0] if x.dim() else 1
            for r in range(0, rows, ROWS_PER_PIECE):  # pieces as they would be read
                sl = slice(r, r + ROWS_PER_PIECE)
                acc.add(b[sl] if x.dim() else x, [h.get_slice(name)[sl] if x.dim() else h.get_tensor(name)
                                                   for h in hist])
            fit = rk.Fit.from_gram(acc.result(), steps, numel=x.numel(), dtype=x.dtype)
            versions = [h.get_tensor(name) for h in hist]
            out[name] = rk.combine(x, versions, fit.alphas([target]))[0]
    save_file(out, out_file, metadata={"format": "pt"})
    return len(out)


def main(workdir: str | None = None) -> bool:
    work = workdir or tempfile.mkdtemp(prefix="relex-kernel-loop-")
    run = synthesize(os.path.join(work, "run"), size="tiny", steps=range(1, 7), layout="hf", tie=False)
    files = {s: os.path.join(d, "model.safetensors") for s, d in run.checkpoints.items()}
    n = predict_file(os.path.join(run.base_dir, "model.safetensors"), files, 30, os.path.join(work, "pred.safetensors"))
    ref = rk.extrapolate(run.base_dir, dict(run.checkpoints), [30], os.path.join(work, "relex"), overwrite=True)
    same = True
    with safe_open(os.path.join(work, "pred.safetensors"), "pt") as a, \
            safe_open(os.path.join(ref.outputs[0], "model.safetensors"), "pt") as b:
        for name in a.keys():
            same &= torch.equal(a.get_tensor(name).view(-1).view(torch.uint8), b.get_tensor(name).view(-1).view(torch.uint8))
    print(f"{n} tensors predicted in a kernel-level loop; identical to relex extrapolate: {same}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1] if len(sys.argv) > 1 else None) else 1)
