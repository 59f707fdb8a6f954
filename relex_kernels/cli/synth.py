"""``relex synth``: write a synthetic RLVR run (base + checkpoints) with real Qwen file layouts."""

from __future__ import annotations

import argparse
import os
import time

from ..engine.plan import parse_positive_size
from ..errors import UsageError

NAME = "synth"
HELP = "generate a synthetic RLVR trajectory (Qwen2/Qwen3 checkpoints) for tests, benchmarks and demos"
DESCRIPTION = """\
Generate a synthetic RLVR run: a base checkpoint and the checkpoints of a training
trajectory, as real Qwen2 / Qwen3 safetensors files with config.json, generation
config and a tiny tokenizer (transformers loads every directory offline).

Per tensor the fp32 master weights move along one random direction, linearly in the
step (optionally with curvature), plus a random walk; each checkpoint is rounded to
bf16 (round-to-nearest-even) the way training saves it. Per-step changes are 1e-4..1e-3
of the weights (log-normal across tensors), so most bf16 values change only every few
steps. --noise 0 --dtype F32 gives an exactly rank-1, exactly linear trajectory.

Output: OUT_DIR/base/, OUT_DIR/run/ (a directory per checkpoint, named as --layout says:
run/global_step_N/actor/huggingface by default; pass OUT_DIR/run to relex --checkpoints),
OUT_DIR/truth/step_N/ (--truth) and OUT_DIR/synth.json (every parameter). Deterministic
given --seed.

sizes: tiny (0.36M params), small (16M), 220m (Qwen3 hidden 1024 x 12 layers, vocab
32000; the benchmark shape, 443 MB per bf16 checkpoint), 0.6b (Qwen3-0.6B), 1.5b
(Qwen2.5-Math-1.5B shape; use --arch qwen2).

layouts: verl = global_step_N/actor/huggingface, verl-hf = global_step_N/huggingface,
verl-flat = global_step_N, hf = checkpoint-N, step = step_N; verl-fsdp = global_step_N/actor
holding verl's FSDP2 rank files (verl-fsdp1: FSDP1's, verl's default strategy) and dcp = step_N
as torch.distributed.checkpoint directories, all written by torch's own writers (needs torch;
--world-size W ranks, --master-dtype F32 for fp32 master weights beside a bf16 base).

examples:
  relex synth runs/tiny
  relex synth runs/bench --size 220m --steps 1-16
  relex synth runs/every5 --size small --every 5 --num 16 --truth 800 --layout hf
  relex synth runs/exact --noise 0 --dtype F32 --steps 1-8
  relex synth runs/verl --layout verl-fsdp --world-size 4 --master-dtype F32 --steps 1-8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..synth import ARCHS, LAYOUTS, SIZES, STORAGE_DTYPES

    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must not exist or be empty)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="qwen3", help="architecture (default qwen3)")
    g.add_argument("--size", choices=list(SIZES), default="tiny", help="model size (default tiny)")
    tie = g.add_mutually_exclusive_group()
    tie.add_argument("--untied", dest="tie", action="store_false", default=None,
                     help="untied output head (adds lm_head.weight); sizes are tied by default")
    tie.add_argument("--store-tied-head", action="store_true",
                     help="store lm_head.weight (equal to the embedding) although the head is tied")
    g = p.add_argument_group("steps")
    g.add_argument("--steps", default=None, metavar="LIST",
                   help="saved steps: 1-16, 5,10,20, 10-80:10 or a mixture (default 1-8)")
    g.add_argument("--every", type=int, metavar="K", help="save every K steps (with --num)")
    g.add_argument("--num", type=int, metavar="N", help="number of checkpoints (with --every)")
    g.add_argument("--truth", default=None, metavar="LIST",
                   help="far-later steps of the same trajectory written to OUT_DIR/truth/step_N "
                        "(ground truth for extrapolation)")
    g = p.add_argument_group("trajectory")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--drift", type=float, default=3e-4,
                   help="median per-step drift, relative to the tensor's rms (default 3e-4)")
    g.add_argument("--noise", type=float, default=1e-4,
                   help="median per-step random-walk increment, relative (default 1e-4; 0 = exact mode)")
    g.add_argument("--curvature", type=float, default=0.0,
                   help="quadratic term kappa: t*u becomes t*u + kappa*t^2*u2 (default 0)")
    g.add_argument("--curvature-dir", choices=("orth", "along"), default="orth",
                   help="u2 independent of the drift (orth, default: rank 2) or along it")
    g.add_argument("--spread", type=float, default=0.5,
                   help="sigma of the log-normal per-tensor factor on drift and noise (default 0.5)")
    g = p.add_argument_group("output")
    g.add_argument("--layout", choices=list(LAYOUTS), default="verl", help="run directory layout (default verl)")
    g.add_argument("--dtype", choices=STORAGE_DTYPES, default="BF16", help="storage dtype (default BF16)")
    g.add_argument("--world-size", type=int, default=2, metavar="W",
                   help="ranks of the verl-fsdp / verl-fsdp1 / dcp layouts (FSDP over a CPU gloo group; "
                        "default 2)")
    g.add_argument("--master-dtype", choices=STORAGE_DTYPES, default=None,
                   help="verl-fsdp / verl-fsdp1 / dcp: dtype of the run's checkpoints (e.g. F32: fp32 master weights "
                        "beside a --dtype BF16 base, as verl saves them; default --dtype)")
    g.add_argument("--shard-size", type=parse_positive_size, default=None, metavar="SIZE",
                   help="shard the safetensors files at SIZE (e.g. 200M, 2GB; default one file up to 5GB)")
    g.add_argument("--threads", type=int, default=None, help="generator threads (default: up to 2)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds an earlier relex synth output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def run(args) -> int:
    from ..synth import parse_steps, synthesize
    from ..synth.layouts import every_steps

    if args.every is not None or args.num is not None:
        if args.steps is not None:
            raise UsageError("give either --steps or --every/--num, not both")
        if args.every is None or args.num is None:
            raise UsageError("--every and --num go together")
        steps = every_steps(args.every, args.num)
    else:
        steps = parse_steps(args.steps or "1-8")
    truth = parse_steps(args.truth) if args.truth else []
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    t0 = time.perf_counter()
    r = synthesize(args.out_dir, arch=args.arch, size=args.size, steps=steps, seed=args.seed,
                   layout=args.layout, noise=args.noise, drift=args.drift, curvature=args.curvature,
                   curvature_dir=args.curvature_dir, spread=args.spread, dtype=args.dtype, shard_bytes=args.shard_size,
                   tie=args.tie, store_tied_head=args.store_tied_head, truth_steps=truth,
                   overwrite=args.overwrite, quiet=args.quiet, threads=args.threads, world_size=args.world_size,
                   master_dtype=args.master_dtype)
    if not args.quiet:
        i = r.info
        dt = time.perf_counter() - t0
        print(f"{i['arch']} {i['size']}: {i['num_params'] / 1e6:.2f}M params, {len(r.checkpoints)} checkpoints "
              f"(steps {_fmt_steps(r.steps)}){f' + truth {_fmt_steps(sorted(r.truth))}' if r.truth else ''}, "
              f"{_fmt_bytes(i['total_bytes'])} in {dt:.1f} s")
        print(f"base: {r.base_dir}")
        print(f"run:  {r.run_dir}")
        print(f"info: {os.path.join(r.out_dir, 'synth.json')}")
    return 0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fmt_steps(steps: list[int]) -> str:
    if len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}"
    if len(steps) > 6:
        return f"{','.join(map(str, steps[:3]))},...,{steps[-1]}"
    return ",".join(map(str, steps))
