"""``relex demo``: synthesize a small trajectory, extrapolate it, show the report."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..engine import extrapolate
from ..engine.report import format_summary
from ..fit import FitOptions

NAME = "demo"
HELP = "synthesize a small RLVR trajectory, extrapolate it and print the report"
DESCRIPTION = """\
A self-contained run of the whole pipeline: a small synthetic Qwen3-shaped RLVR
trajectory (bf16 checkpoints at steps 1..16) is written to a temporary directory,
RELEX predicts step 160 from it, and the explained-variance report and the
output location are printed. Nothing is downloaded.
"""


def add_arguments(p) -> None:
    p.add_argument("--dir", metavar="DIR", help="where to put the trajectory and the output "
                   "(default: a new temporary directory, kept so you can look at it)")
    p.add_argument("--size", default="small", help="synthetic model size (default small)")
    p.add_argument("--steps", type=int, default=16, help="history checkpoints (default 16)")
    p.add_argument("--target-step", type=int, default=160, help="step to predict (default 160)")
    p.add_argument("--clean", action="store_true", help="remove the directory afterwards")


def run(args) -> int:
    from ..synth import synthesize

    root = args.dir or tempfile.mkdtemp(prefix="relex-demo-")
    os.makedirs(root, exist_ok=True)
    print(f"synthesizing a {args.size} qwen3 trajectory, steps 1..{args.steps}, in {root}")
    syn = synthesize(os.path.join(root, "synth"), arch="qwen3", size=args.size,
                     steps=list(range(1, args.steps + 1)), seed=0, quiet=False)
    out = os.path.join(root, "predicted")
    print(f"extrapolating to step {args.target_step}")
    res = extrapolate(syn.base_dir, syn.checkpoints, [args.target_step], out, FitOptions(),
                      overwrite=True, progress=True)
    print(format_summary(res.report["summary"], 1))
    gbs = res.bytes_read / max(res.seconds, 1e-9) / 1e9
    print(f"read {res.bytes_read / 1e9:.3f} GB in {res.seconds:.2f} s ({gbs:.2f} GB/s, backend {res.backend})")
    print(f"report: {os.path.join(out, 'relex_report.json')}")
    print(f"predicted checkpoint (loads with transformers' from_pretrained): {res.outputs[0]}")
    if args.clean:
        shutil.rmtree(root)
    return 0
