"""``relex analyze``: is this run's trajectory rank 1 and linear? (the paper's two findings)."""

from __future__ import annotations

import argparse
import sys

from ..analysis import analyze
from ..engine.plan import default_memory_budget, parse_positive_size
from ..errors import UsageError
from ..io.layout import LAYOUT_HELP, discover, parse_explicit
from ..ops import BACKENDS

NAME = "analyze"
HELP = "check that a run's trajectory is rank 1 and linear, per tensor, with a report and figures"
DESCRIPTION = f"""\
Per tensor, from one streaming pass over the checkpoints: the singular values of the
history trajectory, the explained variance of ranks 1..k, the rank-1 coefficient
c(step) of every checkpoint and the R² of its straight-line fit, in sample (steps
<= H) and out of sample (later checkpoints projected on the history direction), and
the same with the direction taken from all steps (the "oracle subspace"), which
tells a drifting direction from a curving coefficient. Aggregated by module type
(q k v o gate up down norm embedding head) and by layer: unweighted and
parameter-weighted means and medians, and for R² the pooled R² of the group,
1 - sum(SS_res) / sum(SS_tot) over its tensors (the headline: a mean of per-tensor
R² is driven to any size by a tensor whose coefficient barely varies).

Writes REPORT_DIR/report.json (fields documented inside), report.md, and the PNG
figures coefficients.png, ev_heatmap.png and spectra.png when matplotlib is
installed (pip install matplotlib; without it the figures are skipped with a
warning, and --figures makes that an error).

Checkpoints: RUN is a run directory holding {LAYOUT_HELP};
or give --checkpoint STEP=PATH for each one instead.

example:
  relex analyze runs/grpo --base Qwen3-8B-Base --history-steps 75 --out report/
"""


def add_inputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("run", nargs="?", metavar="RUN", help="run directory to scan for checkpoints")
    g.add_argument("--base", required=True, metavar="BASE_DIR", help="the model RLVR started from (step 0)")
    g.add_argument("--checkpoint", action="append", metavar="STEP=PATH", dest="explicit",
                   help="one checkpoint directory and its step, instead of RUN (repeatable)")


def add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources")
    g.add_argument("--memory-budget", type=parse_positive_size, default=None, metavar="SIZE",
                   help="bound on mapped input pages (e.g. 2G, 512M; default: 1 GiB or a quarter of RAM if less, "
                        f"{default_memory_budget() / 2**30:.1f} GiB here)")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="compute backend for the Gram (default: $RELEX_BACKEND or auto)")
    g.add_argument("--no-figures", action="store_true",
                   help="write the reports only (default: figures too when matplotlib is installed)")
    g.add_argument("--figures", action="store_true",
                   help="require the PNG figures: an error, before anything is read or written, when "
                        "matplotlib is missing (default: skip them with a warning)")
    g.add_argument("--overwrite", action="store_true", help="replace existing report files in the output directory")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def found_checkpoints(args) -> dict[int, str]:
    if args.run and args.explicit:
        raise UsageError("give either RUN or --checkpoint STEP=PATH, not both")
    if not args.run and not args.explicit:
        raise UsageError("give the run directory RUN or --checkpoint STEP=PATH for each checkpoint")
    return parse_explicit(args.explicit) if args.explicit else discover(args.run)


def parse_steps(text: str, flag: str) -> list[int] | None:
    """'40,60,80' -> [40, 60, 80]; 'all' -> None."""
    if text.strip().lower() == "all":
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated steps (e.g. 100,150,200) or 'all'; got {text!r}") from None
    if not out:
        raise UsageError(f"{flag} names no step")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_inputs(p)
    f = p.add_argument_group("analysis")
    f.add_argument("--history-steps", type=int, metavar="H",
                   help="the fit sees checkpoints with step <= H; later ones are out-of-sample points "
                        "(default: all checkpoints are history)")
    f.add_argument("--later-steps", metavar="S1,S2,...", default="all",
                   help="which checkpoints after H to score (default all; fewer make the pass cheaper)")
    f.add_argument("--rank-max", type=int, default=5, metavar="K", help="explained variance of ranks 1..K (default 5)")
    f.add_argument("--window", type=int, metavar="W", help="fit the line on the last W history points (default all)")
    f.add_argument("--compare-export", action="store_true",
                   help="a verl run whose steps hold both FSDP rank files (the fp32 training weights) and a "
                        "Hugging Face export: analyse both and report their explained variances side by side "
                        "(REPORT_DIR/shards, REPORT_DIR/export, REPORT_DIR/compare.md)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for report.json, report.md and PNGs")
    add_resources(p)


def figures_arg(args) -> bool | None:
    """--figures: required (True); --no-figures: none (False); neither: when matplotlib is installed (None)."""
    if args.figures and args.no_figures:
        raise UsageError("--figures and --no-figures contradict each other")
    return False if args.no_figures else (True if args.figures else None)


def run(args) -> int:
    figures = figures_arg(args)
    if args.compare_export:
        return compare_export(args, figures)
    found = found_checkpoints(args)
    later = parse_steps(args.later_steps, "--later-steps")
    if later is not None:
        if args.history_steps is None:
            raise UsageError("--later-steps needs --history-steps")
        bad = [s for s in later if s not in found or s <= args.history_steps]
        if bad:
            raise UsageError(f"--later-steps {bad[0]} is not a checkpoint after step {args.history_steps} "
                             f"(found steps {sorted(found)})")
        found = {s: p for s, p in found.items() if s <= args.history_steps or s in later}
    res = analyze(args.base, found, args.out, history_steps=args.history_steps, rank_max=args.rank_max,
                  window=args.window, memory_budget=args.memory_budget, backend=args.backend,
                  figures=figures, overwrite=args.overwrite,
                  progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet:
        print_summary(res.report)
    print(res.files[1])
    return 0


LABELS = {"shards": "rank files", "export": "HF export"}


def compare_export(args, figures: bool | None) -> int:
    """``--compare-export``: the same analysis over the rank files and over the exports, side by side."""
    import json
    import os
    import warnings

    from ..errors import RelexWarning
    if not args.run:
        raise UsageError("--compare-export needs the run directory RUN (it finds both kinds of checkpoint there)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelexWarning)  # "both exist" is the point here
        shards, export = discover(args.run, prefer="shards"), discover(args.run, prefer="hf")
    both = sorted(s for s in shards if s in export and shards[s] != export[s])
    if len(both) < 2:
        raise UsageError(f"--compare-export: {args.run} has {len(both)} step(s) holding both FSDP rank files and a "
                         "Hugging Face export (verl writes the export when checkpoint.save_contents has hf_model)")
    reps = {}
    for label, found in (("shards", shards), ("export", export)):
        sel = {s: found[s] for s in both}
        res = analyze(args.base, sel, os.path.join(args.out, label), history_steps=args.history_steps,
                      rank_max=args.rank_max, window=args.window, memory_budget=args.memory_budget,
                      backend=args.backend, figures=figures, overwrite=args.overwrite,
                      progress=not args.quiet and sys.stderr.isatty())
        reps[label] = res.report
    by = {label: {e["name"]: e for e in rep["tensors"]} for label, rep in reps.items()}
    rows = []
    for name, e in by["shards"].items():
        x = by["export"].get(name)
        rows.append({"name": name, "dtype_shards": e["dtype"], "dtype_export": x["dtype"] if x else None,
                     "ev1_shards": e["explained_variance"][0], "ev1_export": x["explained_variance"][0] if x else None})
    doc = {"steps": both, "summary_ev1": {k: r["summary_ev1"] for k, r in reps.items()}, "tensors": rows}
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    md = ["# Explained variance: FSDP rank files vs Hugging Face export", "",
          f"Steps {both[0]}..{both[-1]} ({len(both)} checkpoints), base {args.base}.", "",
          "| inputs | tensors | mean EV1 | median EV1 | min EV1 |", "|---|---|---|---|---|"]
    for k, r in reps.items():
        sm = r["summary_ev1"]
        if sm.get("tensors"):
            md.append(f"| {LABELS[k]} | {sm['tensors']} | {sm['mean']:.4f} | {sm['median']:.4f} | {sm['min']:.4f} |")
    md += ["", "| tensor | EV1 rank files | EV1 export |", "|---|---|---|"]
    md += [f"| {r['name']} | {r['ev1_shards']:.4f} | " + (f"{r['ev1_export']:.4f} |" if r["ev1_export"] is not None
                                                         else "- |") for r in rows]
    with open(os.path.join(args.out, "compare.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    if not args.quiet:
        for k, r in reps.items():
            sm = r["summary_ev1"]
            if sm.get("tensors"):
                print(f"{LABELS[k]:10s} rank-1 explained variance over {sm['tensors']} tensors: mean {sm['mean']:.4f}  "
                      f"median {sm['median']:.4f}  min {sm['min']:.4f}")
    print(os.path.join(args.out, "compare.md"))
    return 0


def print_summary(rep: dict) -> None:
    s = rep["summary_ev1"]
    if s.get("tensors"):
        print(f"rank-1 explained variance over {s['tensors']} tensors: mean {s['mean']:.4f}  min {s['min']:.4f}  "
              f"median {s['median']:.4f}  max {s['max']:.4f}")
    m = rep["aggregates"]["model"]
    parts = []
    for key, label in (("r2_in", "R² in"), ("r2_out", "R² out"), ("r2_out_oracle", "R² out (oracle subspace)")):
        w, med = m[key].get("pooled"), m[key]["median"]
        if w is not None:
            parts.append(f"{label} {w:.4f}" + (f" (median per tensor {med:.4f})" if med is not None else ""))
    if parts:
        print("pooled over all tensors (1 − ΣSS_res/ΣSS_tot): " + ", ".join(parts))
    g = rep["gram_pass"]
    print(f"read {g['bytes_read'] / 1e9:.2f} GB in {g['seconds']:.2f} s ({g['gb_per_s']:.2f} GB/s, backend "
          f"{rep['backend']}); total {rep['seconds']:.2f} s")
