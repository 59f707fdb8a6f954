"""Small hand-built trajectories for engine tests (independent of the synth generator)."""

from __future__ import annotations

import json
import os

import numpy as np

from relex_kernels.io import dtypes, write_checkpoint


def make_trajectory(root, shapes, steps, dtype="BF16", rank1=False, curvature=0.0, noise=1e-3, seed=0,
                    extra_dtypes=None, config=None, shard_bytes=None, layout="flat"):
    """Write base + checkpoints; returns (base_dir, {step: dir}, truth {name: (T+1, n) fp32 of stored values})."""
    rng = np.random.default_rng(seed)
    steps = list(steps)
    base_dir = os.path.join(root, "base")
    run_dir = os.path.join(root, "run")
    os.makedirs(base_dir)
    values = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        th0 = rng.normal(0, 0.5, n).astype(np.float32)
        v = rng.normal(0, 1, n).astype(np.float32)
        v2 = rng.normal(0, 1, n).astype(np.float32)
        rows = [th0]
        walk = np.zeros(n, np.float32)
        for s in steps:
            walk = walk + (0 if rank1 else noise) * rng.normal(0, 1, n).astype(np.float32)
            rows.append(th0 + 1e-2 * s * v + curvature * 1e-3 * s * s * v2 + walk)
        values[name] = rows
    dt_of = dict.fromkeys(shapes, dtype)
    dt_of.update(extra_dtypes or {})

    def ck(i):
        out = {}
        for name, shape in shapes.items():
            dt = dt_of[name]
            x = values[name][i]
            raw = dtypes.from_float32(x, dt) if dtypes.is_fitted(dt) else x.astype(dtypes.raw_numpy(dt))
            out[name] = (dt, raw.reshape(shape))
        return out

    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    write_checkpoint(base_dir, ck(0), **kw)
    with open(os.path.join(base_dir, "config.json"), "w") as fh:
        json.dump(config or {"model_type": "test"}, fh)
    ckpts = {}
    for i, s in enumerate(steps, 1):
        d = os.path.join(run_dir, f"global_step_{s}/actor/huggingface" if layout == "verl" else f"step_{s}")
        os.makedirs(d)
        write_checkpoint(d, ck(i), **kw)
        ckpts[s] = d
    return base_dir, ckpts
