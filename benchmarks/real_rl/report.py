"""The results page of the real-RL run: real_rl.json, real_rl.md and two PNG plots."""

from __future__ import annotations

import json
import os

from relex_kernels.analysis.report import headline

METHODS = ("relex", "keep-last", "secant", "rank2", "rank5")


def _rows(rep, variant, history=None):
    return [r for r in rep["rows"] if r["variant"] == variant and (history is None or r["history"] == history)]


def _table(rows, key, fmt, real=False) -> list[str]:
    head = "| target step |" + (" real run |" if real else "") + "".join(f" {m} |" for m in METHODS)
    out = [head, "|---|" + ("---|" if real else "") + "---|" * len(METHODS)]
    for r in rows:
        best = min(METHODS, key=lambda m: r[m][key]) if key == "rel_error" else None
        cells = []
        for m in METHODS:
            v = format(r[m][key], fmt)
            cells.append(f"**{v}**" if m == best else v)
        out.append(f"| {r['target']} |" + (f" {r['real_accuracy']:.3f} |" if real else "") +
                   "".join(f" {c} |" for c in cells))
    return out


def verdict(rep) -> list[str]:
    """Plain sentences computed from the figures: does RELEX beat keep-last, and where."""
    rows = _rows(rep, "trl-fp32", rep["main_history"])
    se = _se(rep)
    acc_wins = sum(r["relex"]["accuracy"] > r["keep-last"]["accuracy"] for r in rows)
    clear = sum(r["relex"]["accuracy"] > r["keep-last"]["accuracy"] + se for r in rows)
    err_wins = sum(r["relex"]["rel_error"] < r["keep-last"]["rel_error"] for r in rows)
    last = rows[-1] if rows else None
    out = [f"- Accuracy: RELEX is above keep-last at {acc_wins} of {len(rows)} target steps, by more than one "
           f"standard error of a single accuracy (~{se:.3f}) at {clear} (keep-last is one checkpoint scored once, "
           "so these are not independent wins); "
           f"parameter error below keep-last at {err_wins} of {len(rows)}."]
    if last:
        h_acc = rep["curve"][str(rep["main_history"])]
        out.append(f"- At the last step ({last['target']}): the real run reaches {last['real_accuracy']:.3f}, "
                   f"RELEX from the first {rep['main_history']} steps {last['relex']['accuracy']:.3f}, "
                   f"keep-last (step {rep['main_history']}) {h_acc:.3f}, "
                   f"the RL start {rep['curve']['0']:.3f}.")
    return out


def markdown(rep, name: str = "real_rl") -> str:
    H, c = rep["main_history"], rep["config"]
    N = c["rl_steps"]
    m = rep["machine"]
    L = [f"# RELEX on a real RL run ({rep['preset']} preset)", "",
         f"A Qwen3-architecture causal LM ({rep['sft']['parameters'] / 1e6:.2f}M parameters, tied embeddings) "
         f"learns three-digit addition: {rep['sft']['steps']} supervised steps to a dev accuracy of "
         f"{rep['sft']['dev_accuracy']:.3f} (the RL start, bf16 values), then {N} steps of GRPO with TRL's "
         f"`GRPOTrainer` ({c['prompts']} prompts x {c['generations']} completions per step, reward: exact answer 1, else "
         f"0.5 x digits right in place; lr {c['lr']:g} constant, no KL term), every step saved. RELEX sees the first {H} steps "
         f"({100 * H / N:.0f} %) and predicts steps {', '.join(map(str, rep['targets']))}; each prediction is "
         f"scored by greedy accuracy on {c['held']} held-out problems and by its parameter error against "
         f"the real checkpoint of that step.", "",
         f"Machine: {m['cpu']} ({m['simd']} path), {m['cores']} cores; torch {m['torch']}, relex_kernels {m['relex_kernels']}. "
         f"Whole run {rep['seconds'] / 60:.1f} min (supervised {rep['sft']['seconds']:.0f} s, "
         f"GRPO {rep['grpo']['seconds']:.0f} s). Command: `{rep['command'].strip()}`.", "",
         "## Verdict", "", *verdict(rep), "",
         *_motion_lines(rep), "",
         f"## Held-out accuracy at the target steps (history: steps 1..{H}, TRL's fp32 checkpoints)", "",
         f"Keep-last is step {H} itself; its accuracy is {rep['curve'][str(H)]:.3f}. Standard error of one "
         f"accuracy on {c['held']} problems: about {_se(rep):.3f} (the methods are scored on the same problems, "
         "so their differences are less noisy than that, but differences of a few thousandths are noise).", "",
         *_table(_rows(rep, "trl-fp32", H), "accuracy", ".3f", real=True), "",
         "## Parameter error ‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖ (whole model; lowest in bold)", "",
         *_table(_rows(rep, "trl-fp32", H), "rel_error", ".3f"), "",
         *_backtest_lines(rep), "",
         "Cosine between the predicted and the true delta (secant and keep-last share a direction, "
         "so their cosines are equal by construction):", "",
         *_table(_rows(rep, "trl-fp32", H), "cosine", ".3f"), ""]
    if len(rep["history_steps"]) > 1:
        fr = " / ".join(f"{100 * f:.0f}" for f in rep["config"]["fractions"])
        L += [f"## How much history: RELEX from {fr} % of the steps", "",
              "| history steps | target | real | RELEX acc | keep-last acc | RELEX error | keep-last error |",
              "|---|---|---|---|---|---|---|"]
        for h in rep["history_steps"]:
            for r in _rows(rep, "trl-fp32", h):
                L.append(f"| 1..{h} | {r['target']} | {r['real_accuracy']:.3f} | {r['relex']['accuracy']:.3f} | "
                         f"{r['keep-last']['accuracy']:.3f} | {r['relex']['rel_error']:.3f} | "
                         f"{r['keep-last']['rel_error']:.3f} |")
        L.append("")
    L += ["## The same run as users' trainers save it", "",
          "`trl-fp32`: TRL's `checkpoint-N` (fp32); `bf16-export`: `save_pretrained` of a bf16 copy "
          "at every step, base in bf16; `verl-fp32-masters`: verl's FSDP actor rank files "
          "(`model_world_size_2_rank_R.pt`, written by torch's FSDP2 over 2 gloo ranks) read in place, "
          "bf16 base, computed in fp32 and written in bf16. Errors are against TRL's fp32 checkpoints: "
          "the bf16 variants' include the bf16 rounding of every weight, which is of the order of a few "
          "steps' updates here (compare the keep-last columns).", "",
          "| variant | target | RELEX acc | RELEX error | keep-last error | engine vs fp64 reference |",
          "|---|---|---|---|---|---|"]
    for v in ("trl-fp32", "bf16-export", "verl-fp32-masters"):
        for i, r in enumerate(_rows(rep, v, H)):
            chk = rep["engine_vs_reference_rel_error"][f"{v}_h{H}"][i]
            L.append(f"| {v} | {r['target']} | {r['relex']['accuracy']:.3f} | {r['relex']['rel_error']:.3f} | "
                     f"{r['keep-last']['rel_error']:.3f} | {chk:.1e} |")
    L += ["", "\"engine vs fp64 reference\": ‖engine − reference‖ / ‖reference − θ₀‖ over the model, the "
          "reference being an fp64 SVD of the same checkpoints in torch rounded to the same dtype "
          "(no code shared with the engine).", ""]
    a = rep.get("analysis_by_module") or {}
    if a:
        L += [f"## relex analyze: how one-dimensional and how straight (history 1..{H})", "",
              "ev1: share of the history deltas' energy in the top direction; R² in: the line through the "
              "history positions; R² out / ev1 out: later checkpoints projected on the history direction.", "",
              "| module | tensors | ev1 | R² in | ev1 out | R² out |", "|---|---|---|---|---|---|"]
        for mod, s in a.items():
            # relex analyze's headline: the pooled R² of the module, else the parameter-weighted mean
            # (ev1; R² of reports made before pooling)
            g = lambda k: headline(s.get(k, {}))  # noqa: E731
            L.append(f"| {mod} | {s['tensors']} | {_f(g('ev1'))} | {_f(g('r2_in'))} | {_f(g('ev1_out'))} | "
                     f"{_f(g('r2_out'))} |")
        L.append("")
    L += _growth_check(rep)
    L += ["## Plots", "", f"![accuracy vs step]({name}_accuracy.png)", "",
          f"![explained variance by module]({name}_explained_variance.png)", ""]
    return "\n".join(L)


def _se(rep) -> float:
    p = rep["curve"][str(rep["main_history"])]
    return (p * (1 - p) / rep["config"]["held"]) ** 0.5


def _motion_lines(rep) -> list[str]:
    """How the weights moved: what decides whether a line through the first steps can reach the later ones."""
    mo = rep.get("motion")
    if not mo or mo.get("growth_exponent") is None:
        return []
    d, st = mo["displacement"], mo["step_length"]
    h, n = mo["between"]
    cells = ", ".join(f"{k}: {d[k]:.3g} ({st[k]:.2g})" for k in sorted(d, key=int))
    sign_step = rep["config"]["lr"] * rep["sft"]["parameters"] ** 0.5
    first, last = st.get("1"), st.get(str(n))
    L = ["## How the weights moved", "",
         f"‖θ_s − θ₀‖ (and the step length ‖θ_s − θ_(s−1)‖) at step s — {cells}.", "",
         f"Between steps {h} and {n} the distance from the start grows as s^{mo['growth_exponent']:.2f}: "
         "1 is a straight line at constant speed, what extrapolating a line assumes; 0.5 is a random walk."]
    if first and last:
        L[-1] += (f" Step 1 moved {first:.3g} (lr·√n = {sign_step:.3g}: Adam's first update is sign(g), every "
                  f"weight by the learning rate); step {n} moved {last:.2g}, {last / first:.2f}x of it, as Adam's "
                  "moment estimates average the gradient noise out.")
    return L


def _growth_check(rep) -> list[str]:
    """``relex analyze``'s forecast of a line's overshoot, from the history alone, beside the
    overshoot ``relex backtest`` measured against the real later checkpoints."""
    g = rep.get("analysis_growth") or {}
    bt = {e["step"]: e.get("magnitude_ratio") for e in rep["backtest"]["model"].get("relex", [])}
    if g.get("exponent") is None or not bt:
        return []
    a, b = g["between_steps"]
    cells = "; ".join(f"S={S}: {g['line_overshoot'].get(str(S), float('nan')):.2f}x forecast, "
                      f"{_f(bt[S])}x measured" for S in sorted(bt))
    return [f"From the history alone `relex analyze` finds the distance from the base growing as step^"
            f"{g['exponent']:.2f} (steps {a} to {b}) and forecasts how far a line through it overshoots; the "
            f"magnitude ratio ‖θ̂ − θ₀‖ / ‖θ_S − θ₀‖ of RELEX's predictions, measured by `relex backtest`: "
            + cells + ".", ""]


def _backtest_lines(rep) -> list[str]:
    """``relex backtest``'s figures (from the Gram alone, one pass) beside the written predictions'."""
    bt = {e["step"]: e for e in rep["backtest"]["model"].get("relex", [])}
    rows = _rows(rep, "trl-fp32", rep["main_history"])
    if not bt or not rows:
        return []
    cells = [f"S={r['target']}: {_f(bt.get(r['target'], {}).get('rel_error'))} vs {r['relex']['rel_error']:.3f}"
             for r in rows]
    return ["`relex backtest` on the same checkpoints (RELEX's error from the Gram alone, before rounding) "
            "vs the prediction `relex extrapolate` wrote, scored here: " + "; ".join(cells) + "."]


def _or(x, default):
    return default if x is None else x


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def plots(rep, results: str, name: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = rep["main_history"]
    steps = sorted(int(s) for s in rep["curve"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(steps, [rep["curve"][str(s)] for s in steps], "-", color="black", label="real run (TRL GRPO)")
    marks = {"relex": ("o", "C3"), "keep-last": ("s", "C0"), "secant": ("^", "C2"), "rank2": ("v", "C1"),
             "rank5": ("D", "C4")}
    rows = _rows(rep, "trl-fp32", H)
    for m, (mk, col) in marks.items():
        ax.plot([r["target"] for r in rows], [r[m]["accuracy"] for r in rows], mk, color=col, label=m,
                markersize=8 if m == "relex" else 6, alpha=0.85)
    ax.axvspan(0, H, color="0.9", label=f"history seen (steps 1..{H})")
    ax.set_xlabel("GRPO step")
    p1 = _finish(plt, fig, ax, "held-out accuracy (greedy, exact)", "Predicted checkpoints vs the real run",
                 os.path.join(results, f"{name}_accuracy.png"))

    a = rep.get("analysis_by_module") or {}
    mods = list(a)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    x = range(len(mods))
    nan = float("nan")  # a figure analyze could not give is drawn as no bar, not as 0
    ev_in = [_or(a[k].get("ev1", {}).get("weighted_mean"), nan) for k in mods]
    ev_out = [_or(a[k].get("ev1_out", {}).get("weighted_mean"), nan) for k in mods]
    ax.bar([i - 0.2 for i in x], ev_in, 0.4, label=f"history (steps 1..{H})")
    ax.bar([i + 0.2 for i in x], ev_out, 0.4, label="later steps on the history direction")
    ax.set_xticks(list(x), mods)
    ax.set_ylim(0, 1)
    p2 = _finish(plt, fig, ax, "explained variance of rank 1", "How one-dimensional the GRPO updates are, by module",
                 os.path.join(results, f"{name}_explained_variance.png"))
    return [p1, p2]


def _finish(plt, fig, ax, ylabel: str, title: str, path: str) -> str:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rep: dict, results: str, name: str = "real_rl") -> list[str]:
    """``<name>.json``, ``<name>.md`` and ``<name>_accuracy.png``, ``<name>_explained_variance.png``."""
    os.makedirs(results, exist_ok=True)
    pj = os.path.join(results, f"{name}.json")
    with open(pj, "w") as fh:
        json.dump(rep, fh, indent=1)
    figs = plots(rep, results, name)
    pm = os.path.join(results, f"{name}.md")
    with open(pm, "w") as fh:
        fh.write(markdown(rep, name) + "\n")
    return [pj, pm, *figs]
