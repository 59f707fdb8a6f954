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
RELEX predicts step 160 from it, and the explained-variance report, the error of
the prediction against the generator's true step-160 checkpoint (next to simply
keeping the last checkpoint) and the output location are printed. Nothing is
downloaded.
"""


def add_arguments(p) -> None:
    p.add_argument("--dir", metavar="DIR", help="where to put the trajectory and the output "
                   "(default: a new temporary directory, kept so you can look at it)")
    p.add_argument("--size", default="small", help="synthetic model size (default small)")
    p.add_argument("--steps", type=int, default=16, help="history checkpoints (default 16)")
    p.add_argument("--target-step", type=int, default=160, help="step to predict (default 160)")
    p.add_argument("--drift", type=float, default=None,
                   help="per-step relative drift of the synthetic run (default: the generator's, 3e-4)")
    p.add_argument("--clean", action="store_true", help="remove the directory afterwards")


def run(args) -> int:
    from ..synth import synthesize

    root = args.dir or tempfile.mkdtemp(prefix="relex-demo-")
    os.makedirs(root, exist_ok=True)
    print(f"synthesizing a {args.size} qwen3 trajectory, steps 1..{args.steps}, in {root}")
    syn = synthesize(os.path.join(root, "synth"), arch="qwen3", size=args.size,
                     steps=list(range(1, args.steps + 1)), seed=0, quiet=False, truth_steps=[args.target_step],
                     **({} if args.drift is None else {"drift": args.drift}))
    out = os.path.join(root, "predicted")
    print(f"extrapolating to step {args.target_step}")
    res = extrapolate(syn.base_dir, syn.checkpoints, [args.target_step], out, FitOptions(),
                      overwrite=True, progress=True)
    print(format_summary(res.report["summary"], 1))
    gbs = res.bytes_read / max(res.seconds, 1e-9) / 1e9
    print(f"read {res.bytes_read / 1e9:.3f} GB in {res.seconds:.2f} s ({gbs:.2f} GB/s, backend {res.backend})")
    truth = syn.truth[args.target_step]
    relex_err = relative_error(res.outputs[0], truth, syn.base_dir)
    last_err = relative_error(syn.checkpoints[max(syn.checkpoints)], truth, syn.base_dir)
    print(f"error against the true step-{args.target_step} checkpoint, ||pred - true|| / ||true - base||: "
          f"RELEX {relex_err:.3f}, keeping step {max(syn.checkpoints)} {last_err:.3f}")
    print(f"report: {os.path.join(out, 'relex_report.json')}")
    print(f"predicted checkpoint (loads with transformers' from_pretrained): {res.outputs[0]}")
    if args.clean:
        shutil.rmtree(root)
    elif not args.dir:  # a temporary directory nobody named: say what it holds and how it goes
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"the demo's files ({size / 1e6:.0f} MB) stay in {root} to look at: rm -rf {root} "
              "(or pass --clean next time)")
    return 0



def relative_error(pred_dir: str, true_dir: str, base_dir: str) -> float:
    """||pred - true|| / ||true - base|| over every fitted tensor (analysis.materialize.compare's sums)."""
    from ..analysis.materialize import compare
    from ..io import Checkpoint, dtypes

    base = Checkpoint(base_dir)
    names = [n for n, loc in base.tensors.items() if dtypes.is_fitted(loc.info.dtype)]
    base.close()
    sums = sum(compare(pred_dir, true_dir, base_dir, names).values())  # (|d^|², <d^,d>, |d|², |d^-d|²)
    return float((sums[3] / sums[2]) ** 0.5) if sums[2] > 0 else 0.0
