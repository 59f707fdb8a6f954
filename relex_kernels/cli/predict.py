"""``relex predict``: a new target from a saved fit, one pass, no Gram."""

from __future__ import annotations

import argparse
import sys

from ..engine import predict
from .common import add_output_options, add_target_option
from .extrapolate import print_result

NAME = "predict"
HELP = "write new targets from a fit saved by 'relex extrapolate --save-fit'"
DESCRIPTION = """\
Write the checkpoint of new target steps from a saved fit: one pass over the
checkpoints, no Gram. The fit remembers its input files (paths, sizes, mtimes,
header hashes) and is refused if they changed.

example:
  relex extrapolate ... --target-step 500 --save-fit run.fit --out predicted/
  relex predict --fit run.fit --target-step 750 --out predicted/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", required=True, metavar="FILE", help="fit file written by --save-fit")
    add_target_option(p)
    add_output_options(p)


def run(args) -> int:
    res = predict(args.fit, args.targets, args.out, memory_budget=args.memory_budget,
                  device_memory_budget=args.device_memory_budget, backend=args.backend,
                  overwrite=args.overwrite, shard_bytes=args.shard_size,
                  progress=not args.quiet and sys.stderr.isatty(), resume=args.resume)
    from ..fit import FitOptions
    print_result(res, args.quiet, FitOptions(**res.report["options"]).rank)
    return 0
