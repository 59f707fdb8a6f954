"""Peak RSS stays within the memory budget plus a constant, whatever the model size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trajgen import make_trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys
def hwm():  # VmHWM is per address space (ru_maxrss would inherit the forking parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import numpy as np  # the constant part of the footprint, loaded before measuring it
import relex_kernels.engine as eng
from relex_kernels.ops import get_backend
get_backend(None)
before = hwm()
args = json.loads(sys.argv[1])
res = eng.extrapolate(args["base"], {int(k): v for k, v in args["ck"].items()}, [40], args["out"],
                      memory_budget=args["budget"])
after = hwm()
print(json.dumps({"before": before, "peak": after, "read": res.bytes_read}))
"""


def _peak(tmp, name, n_tensors, numel, budget):
    root = os.path.join(tmp, name)
    os.makedirs(root)
    shapes = {f"layer{i}.weight": (numel,) for i in range(n_tensors)}
    # one tensor larger than the budget: chunked and read twice
    shapes["embed"] = (4 << 20,)  # 64 MB over its 8 versions and output
    base, ck = make_trajectory(root, shapes, range(1, 7), noise=1e-3)
    arg = json.dumps({"base": base, "ck": ck, "out": os.path.join(root, "out"), "budget": budget})
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_flat_across_model_sizes(tmp):
    budget = 96 << 20
    small = _peak(tmp, "small", 4, 1 << 20, budget)   # 4 x 1M bf16 x 7 versions = 56 MB + embed
    large = _peak(tmp, "large", 24, 1 << 20, budget)  # 6x the data: 336 MB + embed
    assert large["read"] > 4 * small["read"] * 0.9 / 1.5
    grow_small = small["peak"] - small["before"]
    grow_large = large["peak"] - large["before"]
    # within the budget plus a small constant, and flat in model size
    assert grow_large <= budget + (48 << 20), (grow_large, budget)
    assert abs(grow_large - grow_small) < (40 << 20), (grow_small, grow_large)
