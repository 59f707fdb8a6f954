"""``relex backtest``: how wrong would the prediction have been on checkpoints we already have?"""

from __future__ import annotations

import argparse
import sys

from ..analysis import backtest
from ..analysis.metrics import DEFAULT_METHODS, parse_methods
from ..analysis.report import backtest_table
from ..errors import UsageError
from ..io.layout import LAYOUT_HELP
from .analyze import add_inputs, add_resources, figures_arg, found_checkpoints, parse_steps

NAME = "backtest"
HELP = "predict held-out real checkpoints from the history and score RELEX against baselines"
DESCRIPTION = f"""\
For each held-out real checkpoint S: predict it from the history (steps <= H) and
compare it with the truth — relative error |θ̂ − θ_S| / |θ_S − θ₀|, cosine between the
predicted and the true delta, magnitude ratio — per tensor, per module type and over
the whole model, for RELEX (method 'relex') and the baselines users compare it with
({', '.join(DEFAULT_METHODS[1:])}).

Every method is a linear combination of the checkpoints, so every figure comes from
the Gram over history ∪ eval checkpoints: one streaming pass, however many methods
and eval steps. The figures are before rounding to the storage dtype; --materialize S
writes the RELEX prediction of S with the engine and measures it after rounding.

Writes, with --out, REPORT_DIR/backtest.json, backtest.md and error_vs_distance.png
(the figure when matplotlib is installed); prints the error table in any case.

Checkpoints: RUN is a run directory holding {LAYOUT_HELP};
or give --checkpoint STEP=PATH for each one instead.

example:
  relex backtest runs/grpo --base Qwen3-8B-Base --history-steps 75 --eval-steps 100,150,200 --out bt/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_inputs(p)
    f = p.add_argument_group("backtest")
    f.add_argument("--history-steps", type=int, required=True, metavar="H",
                   help="predict from the checkpoints with step <= H")
    f.add_argument("--eval-steps", required=True, metavar="S1,S2,...",
                   help="held-out checkpoints to score, after H (comma-separated, or 'all')")
    f.add_argument("--methods", metavar="M1,M2,...",
                   help=f"methods to score (default all: {','.join(DEFAULT_METHODS)}; rank<R> for any R)")
    f.add_argument("--window", type=int, metavar="W", help="fit on the last W history points (default all)")
    f.add_argument("--poly-degree", type=int, default=2, metavar="P", help="degree of the 'poly' method (default 2)")
    f.add_argument("--materialize", type=int, metavar="S",
                   help="also write the RELEX prediction of eval step S to REPORT_DIR/predicted/step_S and "
                        "measure its error after rounding to the base dtype (one more pass)")
    p.add_argument("--out", metavar="REPORT_DIR", help="directory for backtest.json, backtest.md and the plot")
    add_resources(p)


def run(args) -> int:
    found = found_checkpoints(args)
    methods = parse_methods(args.methods)
    steps = parse_steps(args.eval_steps, "--eval-steps")
    if steps is None:
        steps = [s for s in sorted(found) if s > args.history_steps]
        if not steps:
            raise UsageError(f"no checkpoint after step {args.history_steps} (found steps {sorted(found)})")
    res = backtest(args.base, found, args.history_steps, steps, args.out, methods=methods, window=args.window,
                   poly_degree=args.poly_degree, materialize=args.materialize, memory_budget=args.memory_budget,
                   backend=args.backend, figures=figures_arg(args), overwrite=args.overwrite,
                   progress=not args.quiet and sys.stderr.isatty())
    rep = res.report
    if not args.quiet:
        print("relative error |θ̂ − θ_S| / |θ_S − θ₀| over the whole model (pre-rounding, from the Gram):")
        print("\n".join(backtest_table(rep)))
        for m, why in rep["skipped"].items():
            print(f"skipped {m}: {why}")
        mat = rep.get("materialized")
        if mat:
            print(f"materialised step {mat['step']}: relative error {mat['after_rounding']['rel_error']:.4f} after "
                  f"rounding vs {mat['pre_rounding']['rel_error']:.4f} before ({mat['path']})")
        g = rep["gram_pass"]
        print(f"read {g['bytes_read'] / 1e9:.2f} GB in {g['seconds']:.2f} s ({g['gb_per_s']:.2f} GB/s, backend "
              f"{rep['backend']}); total {rep['seconds']:.2f} s")
    if res.files:
        print(res.files[1])
    return 0
