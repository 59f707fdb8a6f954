"""``relex extrapolate``: the main job."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..engine import extrapolate
from ..engine.report import format_summary
from ..errors import RelexWarning, UsageError
from ..fit import FITS, MODES, TIME_AXES, FitOptions
from ..io.layout import LAYOUT_HELP, check_dirs, discover, parse_explicit, select_history
from .common import add_output_options, add_target_option

NAME = "extrapolate"
HELP = "predict later checkpoints from a base and the first checkpoints of an RLVR run"
DESCRIPTION = f"""\
Predict the checkpoint(s) of later training steps from the base model and the first
checkpoints of an RLVR run (RELEX: per tensor, the top singular direction of the
deltas and a straight-line fit of the position along it against the step).

Inputs are read straight from the checkpoint files through memory maps, in two
streaming passes and bounded memory; nothing is written but the outputs. A checkpoint
is a safetensors directory, a verl FSDP actor directory (model_world_size_W_rank_R.pt:
the fp32 master weights, read in place, no merge step) or a torch.distributed.checkpoint
directory (.metadata + .distcp). Checkpoints in another float dtype than the base are
computed in the wider dtype and written in the base's (see --out-dtype).

Checkpoints: --checkpoints RUN_DIR finds {LAYOUT_HELP};
or give --checkpoint STEP=PATH for each one. Directories of steps after
--history-steps are not opened (a live run may still be writing them).

example:
  relex extrapolate --base Qwen3-8B-Base --checkpoints runs/grpo --history-steps 75 \\
                    --target-step 500 --out predicted/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--base", required=True, metavar="BASE_DIR", help="the model RLVR started from (step 0)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", metavar="RUN_DIR", help="run directory to scan for checkpoints")
    src.add_argument("--checkpoint", action="append", metavar="STEP=PATH", dest="explicit",
                     help="one checkpoint directory and its step (repeatable)")
    g.add_argument("--history-steps", type=int, metavar="H",
                   help="use the checkpoints with step <= H (default: all found)")
    g.add_argument("--prefer", choices=("shards", "hf"), default="shards",
                   help="a verl step with both FSDP rank files (actor/) and a Hugging Face export "
                        "(actor/huggingface/): read the rank files (default: the training weights) or the export")
    add_target_option(p)
    f = p.add_argument_group("fit (the mathematics: docs/method.md §2-3)")
    f.add_argument("--rank", type=int, default=1, help="temporal subspace rank r (default 1 = RELEX)")
    f.add_argument("--fit", choices=FITS, default="linear", help="coefficient fit (default linear)")
    f.add_argument("--degree", type=int, default=None, help="polynomial degree with --fit poly (default 2)")
    f.add_argument("--window", type=int, metavar="W", help="fit on the last W history points (default all)")
    f.add_argument("--time-axis", choices=TIME_AXES, default="step",
                   help="fit against real step numbers (default) or the checkpoint index like the authors' scripts")
    f.add_argument("--step-scale", type=float, default=None, metavar="X",
                   help="with --time-axis index: target index = (W-1) + round(S*X) - last step (default 1)")
    f.add_argument("--fp16-deltas", action="store_true",
                   help="emulate the authors' fp16 delta files, for bit-for-bit comparisons")
    f.add_argument("--mode", choices=MODES, default="extrapolate",
                   help="extrapolate (default); reconstruct / fit-reconstruct a history step (Finding 1 check)")
    f.add_argument("--save-fit", metavar="FILE", help="also save the fit (a few KB per tensor) for 'relex predict'")
    p.add_argument("--out-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the predicted float tensors (default: each tensor's dtype in the base; "
                        "checkpoints in another float dtype, e.g. fp32 masters, are computed in the wider one)")
    add_output_options(p)


def run(args) -> int:
    if args.explicit:
        found = parse_explicit(args.explicit)
        run_dir = None
    else:
        found = discover(args.checkpoints, prefer=args.prefer, max_step=args.history_steps)
        run_dir = args.checkpoints
    hist = select_history(found, args.history_steps)
    if args.explicit:
        check_dirs(hist)
    if len(hist) < 2:
        where = args.checkpoints if run_dir else "the --checkpoint list"
        limit = f" with step <= {args.history_steps}" if args.history_steps is not None else ""
        raise UsageError(f"RELEX needs at least 2 history checkpoints; {where} has {len(hist)}{limit} "
                         f"(found steps {sorted(found)})")
    if args.step_scale is not None and not args.step_scale > 0:  # (wrong whether or not it applies)
        raise UsageError(f"--step-scale must be positive; got {args.step_scale}")
    opts = FitOptions(rank=args.rank, fit=args.fit, degree=_applies(args.degree, 2, "--degree", args.fit == "poly",
                                                                    "--fit poly"),
                      window=args.window, time_axis=args.time_axis,
                      step_scale=_applies(args.step_scale, 1.0, "--step-scale", args.time_axis == "index",
                                          "--time-axis index"),
                      mode=args.mode, fp16_deltas=args.fp16_deltas)
    res = extrapolate(args.base, hist, args.targets, args.out, opts, memory_budget=args.memory_budget,
                      device_memory_budget=args.device_memory_budget,
                      backend=args.backend, overwrite=args.overwrite, save_fit=args.save_fit,
                      shard_bytes=args.shard_size, progress=not args.quiet and sys.stderr.isatty(),
                      run_dir=run_dir, resume=args.resume, out_dtype=args.out_dtype)
    print_result(res, args.quiet, opts.rank)
    return 0


def _applies(value, default, option: str, applies: bool, needs: str):
    """``value`` of ``option`` (``default`` when not given); given where it changes nothing, a warning
    says so and the default is kept (the report then records what ran)."""
    if value is None:
        return default
    if not applies:
        warnings.warn(f"{option} applies only with {needs}; ignored", RelexWarning, stacklevel=2)
        return default
    return value


def print_result(res, quiet: bool, rank: int) -> None:
    if res.report.get("already_complete"):  # (a rerun of a finished command: a requeued job, say)
        print("already complete: this command's outputs are in place, written by an earlier run with the same "
              "inputs and options (--overwrite recomputes them)")
        for p in res.outputs:
            print(p)
        return
    if not quiet:
        if res.report.get("resumed_tensors"):
            print(f"resumed an interrupted run of this command: {res.report['resumed_tensors']} tensors were "
                  "already done (--no-resume starts afresh)")
        print(format_summary(res.report["summary"], rank))
        gbs = res.bytes_read / max(res.seconds, 1e-9) / 1e9
        print(f"read {res.bytes_read / 1e9:.2f} GB in {res.seconds:.2f} s ({gbs:.2f} GB/s, backend {res.backend})")
    for p in res.outputs:
        print(p)
