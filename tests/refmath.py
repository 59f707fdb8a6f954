"""An independent, explicit RELEX: stacked fp64 deltas, torch.linalg.svd, np.polyfit.

Deliberately shares no code with the engine (no Gram, no closed form), so agreement
tests the engine's mathematics, not just its plumbing.
"""

from __future__ import annotations

import numpy as np
import torch

from relex_kernels.io import Checkpoint, dtypes


def load_fp32(ck_dir, name):
    ck = Checkpoint(ck_dir)
    loc = ck.tensors[name]
    x = dtypes.to_float32(np.array(loc.file.view(name)), loc.info.dtype)
    ck.close()
    return x


def explicit_relex(base_dir, ckpts, name, target, rank=1, window=None, degree=1, time_axis="step", scale=1.0,
                   mode="extrapolate"):
    steps = sorted(ckpts)
    th0 = load_fp32(base_dir, name).astype(np.float64)
    M = np.stack([load_fp32(ckpts[s], name).astype(np.float64) - th0 for s in steps])
    U, S, Vh = torch.linalg.svd(torch.from_numpy(M), full_matrices=False)
    U, S, Vh = U.numpy(), S.numpy(), Vh.numpy()
    keep = min(rank, int((S > 1e-6 * S[0]).sum())) if S[0] > 0 else 0
    C = U[:, :keep] * S[:keep]  # (T, r)
    T = len(steps)
    W = window or T
    if mode == "reconstruct":
        chat = C[steps.index(target)]
    else:
        if time_axis == "index":
            t = np.arange(W, dtype=np.float64)
            tau = (W - 1) + round(target * scale) - steps[-1]
        else:
            t = np.array(steps[T - W:], dtype=np.float64)
            tau = target
        chat = np.array([np.polyval(np.polyfit(t, C[T - W:, k], degree), tau) for k in range(keep)])
    return th0 + chat @ Vh[:keep]
