"""report.json field documentation, the Markdown reports, and atomic file writes.

Both reports carry their own field documentation under ``"fields"`` so a reader of
the JSON needs nothing else; the same text is in the tables below.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from ..errors import OutputError
from ..io.dirs import make_dirs, remove_empty, write_text_atomic

TENSOR_FIELDS = {
    "name": "tensor name in the checkpoint",
    "dtype": "storage dtype", "shape": "shape", "numel": "number of elements (the weight of weighted means)",
    "module": "module type: q k v o gate up down norm embedding head bias other",
    "layer": "transformer block index, null outside the blocks",
    "singular_values": "all T singular values s_k of the history trajectory matrix (descending)",
    "explained_variance": "explained variance of ranks 1..rank_max on the history (uncentred)",
    "ev1": "explained variance of rank 1 on the history",
    "coef": "rank-1 coefficient c(step) for every step of 'steps': s_1·u_1 on the history, the projection "
            "<θ_step − θ₀, v_1> on the history direction v_1 after it",
    "coef_fit": "the straight line fitted to coef on the history, evaluated at every step",
    "r2_in": "R² = 1 − SS_res / SS_tot of that line on the history points (null: constant coefficient)",
    "r2_out": "R² of that line on the later points, SS_tot about their own mean (null: fewer than 2 later "
              "points or a constant coefficient on them)",
    "r2_in_ss": "[SS_res, SS_tot] of r2_in (null: fewer than 2 points); the aggregates' pooled R² sums these",
    "r2_out_ss": "[SS_res, SS_tot] of r2_out (null: fewer than 2 later points)",
    "coef_error_out": "‖c − ĉ‖ / ‖c‖ over the later points",
    "ev1_out": "fraction of the later deltas' squared norm on the history direction v_1",
    "coef_oracle": "rank-1 coefficient with the direction taken from all steps (the 'oracle subspace')",
    "coef_oracle_fit": "line fitted to coef_oracle on the history points, at every step",
    "ev1_oracle": "rank-1 explained variance over all steps",
    "r2_in_oracle": "as r2_in, oracle subspace", "r2_out_oracle": "as r2_out, oracle subspace",
    "r2_in_oracle_ss": "as r2_in_ss, oracle subspace", "r2_out_oracle_ss": "as r2_out_ss, oracle subspace",
    "coef_error_out_oracle": "as coef_error_out, oracle subspace",
    "subspace_cosine": "|cos| between the history and the oracle rank-1 directions (1: no drift)",
    "dist2_mid": "‖θ − θ₀‖² at the history step nearest half the last one (growth.between_steps[0])",
    "dist2_last": "‖θ − θ₀‖² at the last history step",
    "growth": "p in ‖θ_x − θ₀‖ ∝ x^p between those two steps (1: constant speed; null: no motion)",
}

#: when not to trust the growth exponent (report.json's field docs and report.md)
GROWTH_CAVEAT = ("The distance counts everything that separates a checkpoint from the base: bf16 rounding of "
                 "per-step deltas that are near the rounding, or a base that is not the run's exact start, puts "
                 "a floor under it and lowers the exponent without any slowing. Trust it from fp32 masters (or "
                 "deltas well above bf16 rounding) started exactly from the base.")

ANALYZE_FIELDS = {
    "steps": "every checkpoint step analysed, ascending; the first len(history_steps) are the history",
    "history_steps": "the steps the fit sees (<= --history-steps)",
    "later_steps": "the steps after the history: out-of-sample points",
    "summary_ev1": "rank-1 explained variance over fitted tensors: mean/min/median/max and counts >= 0.90/0.95/0.99",
    "explained_variance_by_rank": "per rank k: unweighted and parameter-weighted mean explained variance",
    "aggregates": "per metric {mean, weighted_mean (by numel), median, min, tensors} over the tensors where it "
                  "is defined; the R² metrics (r2_*) also {pooled, pooled_tensors}: the group's R² "
                  "1 − Σ SS_res / Σ SS_tot summed over its tensors (every tensor with 2 or more points, one "
                  "whose own R² is null for a constant coefficient included) — the headline figure; their "
                  "weighted_mean and mean are means of per-tensor R², which a tensor with a nearly constant "
                  "coefficient (SS_tot near 0) can drive to any size; for the model, by_module, by_layer",
    "gram_pass": "the streaming pass: seconds, bytes_read, memory_budget",
    "growth": "how the distance from the base grows over the history: exponent p of ‖θ_x − θ₀‖ ∝ x^p between "
              "between_steps (the step nearest half the last history step, and the last), squared distances "
              "summed over the fitted tensors; by_module: the same per module type; line_overshoot: step S -> "
              "(S / last history step)^(1 − p), about how far a straight line through the history (RELEX) "
              "overshoots the run's distance at S when the growth keeps its exponent (1: no overshoot). "
              + GROWTH_CAVEAT,
    "figures": "PNG files written beside report.json",
    "tensors": "one entry per fitted tensor (fields below)",
    "tensor_fields": "documentation of the per-tensor fields",
}

BACKTEST_FIELDS = {
    "history_steps": "the steps every method is fitted on",
    "eval_steps": "held-out real checkpoints S the predictions are scored against",
    "distances": "S − last history step, per eval step",
    "methods": "method -> description; skipped: method -> why it could not run",
    "model": "method -> one row per eval step {step, distance, rel_error, cosine, magnitude_ratio, resolution} "
             "over all fitted tensors together",
    "by_module": "module type -> method -> rows as in 'model', over that module type's tensors",
    "tensors": "tensor -> method -> {rel_error, cosine, magnitude_ratio}: lists over eval_steps",
    "rel_error": "‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖ before rounding to the storage dtype",
    "cosine": "cosine between the predicted delta θ̂ − θ₀ and the true delta θ_S − θ₀",
    "magnitude_ratio": "‖θ̂ − θ₀‖ / ‖θ_S − θ₀‖",
    "resolution": "relative errors below this are within the fp32-accumulated Gram's rounding",
    "materialized": "with --materialize S: the RELEX prediction written by the engine, rounded to the base dtype, "
                    "and its measured errors (after_rounding) next to the Gram figure (pre_rounding)",
}


def write_json(path: str, obj: dict) -> None:
    _atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def write_text(path: str, text: str) -> None:
    _atomic(path, text)


def _atomic(path: str, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def report_dir(out_dir: str, names: list[str], overwrite: bool) -> Iterator[str]:
    """Check that ``names`` may be written in ``out_dir`` (before anything is created), create it, and
    run the body of a command in it: if the body fails (an input error found by the pass, a missing
    tensor, Ctrl-C), the files among ``names`` it created and the directories this created are
    removed again, so a failed command leaves no empty report directory behind. Files that were
    there before (replaced with --overwrite) and anything else are left alone."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"report directory {out_dir} exists and is not a directory")
    there = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
    if there and not overwrite:
        raise OutputError(f"{os.path.join(out_dir, there[0])} already exists; pass --overwrite to replace it")
    try:
        created = make_dirs(out_dir)
    except OSError as e:
        raise OutputError(f"cannot create report directory {out_dir}: {e.strerror}") from None
    try:
        yield out_dir
    except BaseException:
        for n in set(names) - set(there):
            p = os.path.join(out_dir, n)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        remove_empty(created)
        raise


# -- Markdown ----------------------------------------------------------------------------
def _f(x, fmt=".4f") -> str:
    return "–" if x is None else format(x, fmt)


def headline(metric: dict):
    """A group's headline value of one aggregated metric: its pooled R² where the metric is an R²
    (the group's own, not a mean of R²s), else the parameter-weighted mean; None when absent."""
    return metric.get("pooled" if "pooled" in metric else "weighted_mean")


def _agg_table(groups: dict, cols: list[tuple[str, str]], label: str) -> list[str]:
    head = f"| {label} | tensors | params | " + " | ".join(c[1] for c in cols) + " |"
    out = [head, "|" + "---|" * (3 + len(cols))]
    for g, a in groups.items():
        cells = []
        for key, _ in cols:
            m = a.get(key, {})
            cells.append(" / ".join(_f(x, ".3f") for x in (headline(m), m.get("mean"), m.get("median"))))
        out.append(f"| {g} | {a['tensors']} | {a['params']:,} | " + " | ".join(cells) + " |")
    return out


AGG_COLS = [("ev1", "EV rank 1"), ("r2_in", "R² in"), ("r2_out", "R² out"), ("r2_out_oracle", "R² out (oracle)"),
            ("ev1_out", "EV1 later"), ("subspace_cosine", "cos(v₁, oracle)")]


def _growth_lines(g: dict | None) -> list[str]:
    if not g or g.get("exponent") is None:
        return []
    p = g["exponent"]
    a, b = g["between_steps"]
    over = ", ".join(f"step {S}: {f:.2f}x" for S, f in sorted(g["line_overshoot"].items(), key=lambda kv: int(kv[0])))
    mods = ", ".join(f"{m} {v:.2f}" for m, v in g["by_module"].items() if v is not None)
    verdict = ("about constant speed: a straight line holds" if p >= 0.9 else
               "the run slows down (or its steps partly cancel, as gradient noise does): a straight line "
               "through the history will overshoot later steps — more history, a later --window, or a "
               "nearer target")
    return ["", "## Does the run keep its speed?", "",
            f"The distance from the base grows as step^{p:.2f} between steps {a} and {b} ({verdict}). "
            f"If it keeps that exponent, a line through the history overshoots the run's distance from the "
            f"base by about {over}. By module: {mods}.", "",
            GROWTH_CAVEAT]


def analyze_markdown(rep: dict) -> str:
    L = ["# RELEX trajectory analysis", ""]
    hs, ls = rep["history_steps"], rep["later_steps"]
    L.append(f"Base `{rep['base']}`; history: {len(hs)} checkpoints, steps {hs[0]}..{hs[-1]}; "
             + (f"later (out of sample): {len(ls)} checkpoints, steps {ls[0]}..{ls[-1]}." if ls
                else "no later checkpoints (no out-of-sample figures)."))
    g = rep["gram_pass"]
    L.append(f"One streaming pass: {g['bytes_read'] / 1e9:.2f} GB read in {g['seconds']:.2f} s "
             f"(backend {rep['backend']}); {rep['tensors_fitted']} fitted tensors.")
    s = rep["summary_ev1"]
    if s.get("tensors"):
        L += ["", "## Is the trajectory rank 1?", "",
              f"Rank-1 explained variance over {s['tensors']} tensors: mean {s['mean']:.4f}, min {s['min']:.4f}, "
              f"median {s['median']:.4f}, max {s['max']:.4f}; >= 0.90: {s['count_ge_0.90']}, "
              f">= 0.95: {s['count_ge_0.95']}, >= 0.99: {s['count_ge_0.99']}.", "",
              "| rank | mean EV | parameter-weighted EV |", "|---|---|---|"]
        for r in rep["explained_variance_by_rank"]:
            L.append(f"| {r['rank']} | {_f(r['mean'])} | {_f(r['weighted_mean'])} |")
    L += _growth_lines(rep.get("growth"))
    agg = rep["aggregates"]
    L += ["", "## By module type", "",
          "Each cell: parameter-weighted mean / unweighted mean / median over the tensors; for R², "
          "pooled / unweighted mean / median: the pooled R² is the group's own, 1 − Σ SS_res / Σ SS_tot over "
          "its tensors (the coefficient's squared errors are squared parameter errors, so it weighs each "
          "tensor by how much it moves). A per-tensor R² is unbounded below: a tensor whose coefficient "
          "barely varies — a bf16 norm — can drive any mean of per-tensor R² to −1e26; the pooled R² and "
          "the median do not move. *R² in*: the straight line of the rank-1 "
          "coefficient on the history; *R² out*: the same line on the later checkpoints projected on the "
          "history direction; *(oracle)*: with the direction of all steps. High oracle R² out with low R² "
          "out means the direction drifts; both low means the coefficient curves.", ""]
    L += _agg_table({"**model**": agg["model"], **agg["by_module"]}, AGG_COLS, "module")
    if agg["by_layer"]:
        L += ["", "## By layer", ""]
        L += _agg_table(agg["by_layer"], AGG_COLS[:4], "layer")
    worst = sorted((t for t in rep["tensors"]), key=lambda t: t["ev1"])[:10]
    L += ["", "## Lowest rank-1 explained variance", "",
          "| tensor | numel | EV1 | R² in | R² out |", "|---|---|---|---|---|"]
    for t in worst:
        L.append(f"| `{t['name']}` | {t['numel']:,} | {t['ev1']:.4f} | {_f(t['r2_in'])} | {_f(t['r2_out'])} |")
    if rep["figures"]:
        L += ["", "## Figures", ""]
        for f in rep["figures"]:
            L.append(f"![{f}]({f})")
    L += ["", "## Fields of report.json", "", "| field | meaning |", "|---|---|"]
    L += [f"| `{k}` | {v} |" for k, v in {**ANALYZE_FIELDS, **TENSOR_FIELDS}.items()]
    return "\n".join(L) + "\n"


def backtest_table(rep: dict, metric: str = "rel_error", fmt: str = ".4f") -> list[str]:
    steps = rep["eval_steps"]
    L = ["| method | " + " | ".join(f"S={s} (+{d})" for s, d in zip(steps, rep["distances"])) + " |",
         "|---|" + "---|" * len(steps)]
    for m, rows in rep["model"].items():
        L.append(f"| {m} | " + " | ".join(_f(r[metric], fmt) for r in rows) + " |")
    return L


def backtest_markdown(rep: dict) -> str:
    hs = rep["history_steps"]
    L = ["# RELEX backtest", "",
         f"History: {len(hs)} checkpoints, steps {hs[0]}..{hs[-1]}; scored against the real checkpoints at "
         f"steps {', '.join(map(str, rep['eval_steps']))}. One streaming pass: "
         f"{rep['gram_pass']['bytes_read'] / 1e9:.2f} GB in {rep['gram_pass']['seconds']:.2f} s.", "",
         "**These are pre-rounding figures**: the prediction θ̂ = θ₀ + Σ α_i (θ_i − θ₀) is scored exactly from "
         "the fp32-accumulated Gram, before it is rounded to the storage dtype. Rounding to bf16 adds an error "
         "of about half an ulp of each weight; `--materialize S` writes one prediction and measures it.", "",
         "## Relative error ‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖ (whole model)", ""]
    L += backtest_table(rep)
    L += ["", "## Cosine between predicted and true delta", ""] + backtest_table(rep, "cosine")
    L += ["", "## Magnitude ratio ‖θ̂ − θ₀‖ / ‖θ_S − θ₀‖", ""] + backtest_table(rep, "magnitude_ratio", ".3f")
    res = [r["resolution"] for rows in rep["model"].values() for r in rows if r["resolution"] is not None]
    if res:
        L += ["", f"Relative errors below about {max(res):.1e} are within the Gram's fp32 rounding."]
    L += ["", "## Methods", ""] + [f"- **{m}**: {d}" for m, d in rep["methods"].items()]
    L += [f"- *{m}* skipped: {why}" for m, why in rep["skipped"].items()]
    mat = rep.get("materialized")
    if mat:
        L += ["", f"## Materialised RELEX prediction of step {mat['step']}", "",
              f"Written to `{mat['path']}` by the engine and rounded to the base dtype.", "",
              "| | relative error | cosine | magnitude ratio |", "|---|---|---|---|",
              f"| pre-rounding (Gram) | {_f(mat['pre_rounding']['rel_error'])} | {_f(mat['pre_rounding']['cosine'])} "
              f"| {_f(mat['pre_rounding']['magnitude_ratio'])} |",
              f"| after rounding (measured) | {_f(mat['after_rounding']['rel_error'])} | "
              f"{_f(mat['after_rounding']['cosine'])} | {_f(mat['after_rounding']['magnitude_ratio'])} |"]
    if rep.get("figures"):
        L += ["", "## Error vs extrapolation distance", ""] + [f"![{f}]({f})" for f in rep["figures"]]
    L += ["", "## Fields of backtest.json", "", "| field | meaning |", "|---|---|"]
    L += [f"| `{k}` | {v} |" for k, v in BACKTEST_FIELDS.items()]
    return "\n".join(L) + "\n"
