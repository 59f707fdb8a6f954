"""``analyze`` and ``backtest``: one Gram pass, the T x T figures, reports and figures."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .. import fit as fitmath
from ..engine.report import summary
from ..errors import RelexWarning, UsageError
from ..fit import FitOptions
from . import figures as figs
from . import metrics
from .aggregate import MODULE_TYPES, aggregate, by_module_type, layer_index, module_type
from .extended_gram import GramPass, extended_grams
from .report import (ANALYZE_FIELDS, BACKTEST_FIELDS, TENSOR_FIELDS, analyze_markdown, backtest_markdown,
                     report_dir, write_json, write_text)

AGG_KEYS = ("ev1", "ev1_out", "r2_in", "r2_out", "coef_error_out", "ev1_oracle", "r2_in_oracle", "r2_out_oracle",
            "coef_error_out_oracle", "subspace_cosine")
ANALYZE_FIGURES = {"coefficients.png": "coefficient trajectories", "ev_heatmap.png": "rank-1 EV heatmap",
                   "spectra.png": "singular value spectra"}


@dataclass
class Result:
    report: dict
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _version() -> str:
    return __import__("relex_kernels").__version__


def _split(checkpoints: dict[int, str], history_steps: int | None) -> tuple[list[int], list[int]]:
    steps = sorted(checkpoints)
    bad = [s for s in steps if s <= 0]
    if bad:
        raise UsageError(f"checkpoint step {bad[0]} is not positive ({checkpoints[bad[0]]}); the base is step 0")
    hist = [s for s in steps if history_steps is None or s <= history_steps]
    if len(hist) < 2:
        raise UsageError(f"the fit needs at least 2 history checkpoints; {len(hist)} have step <= "
                         f"{history_steps} (found steps {steps})")
    return hist, [s for s in steps if s not in hist]


def _pass_info(gp: GramPass) -> dict:
    return {"seconds": gp.seconds, "bytes_read": gp.bytes_read, "memory_budget": gp.memory_budget,
            "gb_per_s": gp.bytes_read / max(gp.seconds, 1e-9) / 1e9}


# -- analyze -----------------------------------------------------------------------------
def analyze(base: str, checkpoints: dict[int, str], out_dir: str, *, history_steps: int | None = None,
            rank_max: int = 5, window: int | None = None, memory_budget: int | None = None,
            backend: str | None = None, figures: bool | None = None, overwrite: bool = False,
            progress: bool = False) -> Result:
    """Rank-1 diagnostics of a run: ``checkpoints`` ({step: dir}) with step <= ``history_steps`` are
    the history, the later ones are scored out of sample. Writes report.json, report.md and PNGs.

    ``figures``: None (default) draws the PNGs when matplotlib is installed and otherwise skips them
    with a RelexWarning; True requires them (UsageError without matplotlib); False skips them. A
    failure leaves no report directory behind that was not there before."""
    t0 = time.perf_counter()
    hist, later = _split(checkpoints, history_steps)
    opts = FitOptions(window=window)
    fitmath.validate(opts, hist)
    if rank_max < 1:
        raise UsageError(f"--rank-max must be >= 1; got {rank_max}")
    if figures:
        figs.require()  # (required: fail before the pass)
    names = ["report.json", "report.md"] + (list(ANALYZE_FIGURES) if figures is not False else [])
    with report_dir(out_dir, names, overwrite) as out_dir:
        return _analyze(base, checkpoints, out_dir, hist, later, opts, rank_max, memory_budget, backend,
                        figures, progress, t0)


def _analyze(base, checkpoints, out_dir, hist, later, opts, rank_max, memory_budget, backend, figures,
             progress, t0) -> Result:
    loader = figs.preload() if figures is not False else None
    gp = extended_grams(base, checkpoints, memory_budget=memory_budget, backend=backend, progress=progress,
                        desc="relex analyze")
    T = len(hist)
    fitm = metrics.fit_matrix(gp.steps, T, opts)
    entries = []
    for tg in gp.tensors:
        e = {"name": tg.name, "dtype": tg.dtype, "shape": list(tg.shape), "numel": tg.numel,
             "module": module_type(tg.name), "layer": layer_index(tg.name)}
        e.update(metrics.analyze_tensor(tg.gram, T, fitm, rank_max, gp.steps))
        entries.append(e)
    k = min(rank_max, T)
    ev_rank = []
    for r in range(k):
        x = np.array([e["explained_variance"][r] for e in entries])
        w = np.array([e["numel"] for e in entries], dtype=np.float64)
        ev_rank.append({"rank": r + 1, "mean": float(x.mean()) if x.size else None,
                        "weighted_mean": float((x * w).sum() / w.sum()) if x.size else None})
    rep = {
        "relex_kernels": _version(), "command": "analyze", "base": gp.base,
        "checkpoints": {str(s): p for s, p in gp.checkpoints.items()},
        "steps": gp.steps, "history_steps": hist, "later_steps": later,
        "options": {"rank_max": rank_max, "window": opts.window, "time_axis": "step"},
        "backend": gp.backend, "tied_head": gp.tied[0] if gp.tied else None,
        "tensors_fitted": len(entries), "gram_pass": _pass_info(gp),
        "summary_ev1": summary(entries, "ev1"), "explained_variance_by_rank": ev_rank,
        "aggregates": aggregate(entries, AGG_KEYS), "growth": _growth(entries, hist, later), "figures": [],
        "fields": ANALYZE_FIELDS, "tensor_fields": TENSOR_FIELDS, "tensors": entries,
    }
    if loader is not None:
        loader.join()
    if figures is not False and entries:
        with _figures(out_dir, ANALYZE_FIGURES, rep["figures"], figures, "report.json and report.md"):
            figs.coefficient_figure(os.path.join(out_dir, "coefficients.png"), entries, gp.steps, T)
            rep["figures"].append("coefficients.png")
            if figs.heatmap_figure(os.path.join(out_dir, "ev_heatmap.png"), entries):
                rep["figures"].append("ev_heatmap.png")
            figs.spectra_figure(os.path.join(out_dir, "spectra.png"), entries)
            rep["figures"].append("spectra.png")
    rep["seconds"] = time.perf_counter() - t0
    write_json(os.path.join(out_dir, "report.json"), rep)
    write_text(os.path.join(out_dir, "report.md"), analyze_markdown(rep))
    files = [os.path.join(out_dir, n) for n in ["report.json", "report.md"] + rep["figures"]]
    return Result(rep, files, time.perf_counter() - t0)


@contextlib.contextmanager
def _figures(out_dir: str, names, drawn: list[str], figures: bool | None, reports: str):
    """Draw the figures ``names`` (listed in ``drawn`` as they are written); unless they were required
    (``figures`` True), a matplotlib that is missing or fails (an ABI mismatch, a broken backend)
    costs the figures, not the reports: every file of ``names`` goes (one half written too),
    ``drawn`` is emptied, and one warning says why."""
    try:
        yield
    except Exception as e:
        if figures:
            raise
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, name))
        drawn.clear()
        why = e if isinstance(e, UsageError) else f"matplotlib failed ({type(e).__name__}: {e})"
        warnings.warn(f"figures skipped: {why}; wrote {reports} only", RelexWarning, stacklevel=3)


def _growth(entries: list[dict], hist: list[int], later: list[int]) -> dict | None:
    """How the distance from the base grows over the history, for the model and each module type:
    the exponent p of ‖θ_x − θ₀‖ ∝ x^p (squared distances summed over tensors), and the factor
    (S / x_last)^(1 − p) by which a straight line would overshoot a later step S."""
    h = metrics.mid_index(hist, len(hist))
    if h is None:
        return None
    x_mid, x_last = hist[h], hist[-1]

    def exponent(group):
        return metrics.growth_exponent(sum(e.get("dist2_mid", 0.0) for e in group),
                                       sum(e.get("dist2_last", 0.0) for e in group), x_mid, x_last)

    p = exponent(entries)
    at = sorted(set(later) | {2 * x_last, 5 * x_last})
    return {"between_steps": [x_mid, x_last], "exponent": p,
            "line_overshoot": {str(S): (S / x_last) ** (1 - p) for S in at} if p is not None else {},
            "by_module": {m: exponent(g) for m, g in by_module_type(entries).items()}}


# -- backtest ----------------------------------------------------------------------------
def _rows(terms: np.ndarray, steps: list[int], last: int) -> list[dict]:
    """terms (K, 3) -> one row per eval step."""
    return [{"step": s, "distance": s - last, **metrics.combo_scores(*terms[k])} for k, s in enumerate(steps)]


def backtest(base: str, checkpoints: dict[int, str], history_steps: int, eval_steps: list[int],
             out_dir: str | None = None, *, methods: list[str] | None = None, window: int | None = None,
             poly_degree: int = 2, materialize: int | None = None, memory_budget: int | None = None,
             backend: str | None = None, figures: bool | None = None, overwrite: bool = False,
             progress: bool = False) -> Result:
    """Score predictions of ``eval_steps`` from the history (step <= ``history_steps``) against the
    real checkpoints, for every method, from one Gram pass over history ∪ eval checkpoints.
    ``figures`` (with ``out_dir``) as in :func:`analyze`."""
    t0 = time.perf_counter()
    methods = list(methods or metrics.DEFAULT_METHODS)
    if materialize is not None and "relex" not in methods:
        methods.insert(0, "relex")  # the figure --materialize confirms
    hist, later = _split({s: p for s, p in checkpoints.items() if s <= history_steps or s in eval_steps},
                         history_steps)
    if not eval_steps:
        raise UsageError("give at least one --eval-steps step after the history")
    missing = [s for s in eval_steps if s not in checkpoints]
    if missing:
        raise UsageError(f"eval step {missing[0]} has no checkpoint (found steps {sorted(checkpoints)})")
    early = [s for s in eval_steps if s <= hist[-1]]
    if early:
        raise UsageError(f"eval step {early[0]} is not after the last history step {hist[-1]}")
    eval_steps = sorted(set(eval_steps))
    if materialize is not None:
        if materialize not in eval_steps:
            raise UsageError(f"--materialize {materialize} must be one of the eval steps {eval_steps}")
        if out_dir is None:
            raise UsageError("--materialize needs --out (the predicted checkpoint is written there)")
    base_opts = FitOptions(window=window)
    fitmath.validate(base_opts, hist)
    skipped = {}
    for m in methods:
        why = metrics.applicable(m, base_opts, poly_degree, hist)
        if why:
            skipped[m] = why
    run_methods = [m for m in methods if m not in skipped]
    if not run_methods:
        raise UsageError(f"no method can run on {len(hist)} history checkpoints: {skipped}")
    if out_dir is None:
        figures = False  # (no report: no figure)
    elif figures:
        figs.require()  # (required: fail before the pass)
    names = ["backtest.json", "backtest.md"] + (["error_vs_distance.png"] if figures is not False else [])
    with report_dir(out_dir, names, overwrite) if out_dir is not None else contextlib.nullcontext() as out_dir:
        return _backtest(base, checkpoints, hist, eval_steps, out_dir, run_methods, skipped, poly_degree,
                         materialize, memory_budget, backend, figures, overwrite, progress, base_opts, t0)


def _backtest(base, checkpoints, hist, eval_steps, out_dir, run_methods, skipped, poly_degree, materialize,
              memory_budget, backend, figures, overwrite, progress, base_opts, t0) -> Result:
    loader = figs.preload() if figures is not False else None
    gp = extended_grams(base, {s: checkpoints[s] for s in hist + eval_steps}, memory_budget=memory_budget,
                        backend=backend, progress=progress, desc="relex backtest")
    T = len(hist)
    cols = [gp.index(s) for s in eval_steps]
    W = {m: np.stack([metrics.method_weights(m, base_opts, poly_degree, hist, s) for s in eval_steps])
         for m in run_methods}
    # terms[tensor, method, eval step] = (‖Δ̂‖², ⟨Δ̂, Δ⟩, ‖Δ‖²): sums of these are whole-model figures
    terms = np.zeros((len(gp.tensors), len(run_methods), len(eval_steps), 3))
    for i, tg in enumerate(gp.tensors):
        Gh = tg.gram[:T, :T]
        for j, m in enumerate(run_methods):
            A = metrics.method_alphas(m, Gh, W[m], base_opts, poly_degree)
            terms[i, j] = metrics.combo_terms(tg.gram, T, A, cols)
    last = hist[-1]
    model = {m: _rows(terms[:, j].sum(axis=0), eval_steps, last) for j, m in enumerate(run_methods)}
    mods = [module_type(tg.name) for tg in gp.tensors]
    by_module = {}
    for mt in MODULE_TYPES:
        idx = [i for i, x in enumerate(mods) if x == mt]
        if idx:
            by_module[mt] = {m: _rows(terms[idx, j].sum(axis=0), eval_steps, last) for j, m in enumerate(run_methods)}
    per_tensor = {}
    for i, tg in enumerate(gp.tensors):
        per_tensor[tg.name] = {}
        for j, m in enumerate(run_methods):
            sc = [metrics.combo_scores(*terms[i, j, k]) for k in range(len(eval_steps))]
            per_tensor[tg.name][m] = {key: [x[key] for x in sc] for key in ("rel_error", "cosine", "magnitude_ratio")}
    rep = {
        "relex_kernels": _version(), "command": "backtest", "base": gp.base,
        "checkpoints": {str(s): p for s, p in gp.checkpoints.items()},
        "history_steps": hist, "eval_steps": eval_steps, "distances": [s - last for s in eval_steps],
        "options": {"window": base_opts.window, "poly_degree": poly_degree, "time_axis": "step"},
        "methods": {m: metrics.METHODS.get(m, f"rank-{m[4:]} subspace, straight-line fit of each coefficient")
                    for m in run_methods},
        "skipped": skipped, "backend": gp.backend, "tensors_fitted": len(gp.tensors), "gram_pass": _pass_info(gp),
        "pre_rounding": True, "model": model, "by_module": by_module, "figures": [],
        "fields": BACKTEST_FIELDS, "tensors": per_tensor,
    }
    if materialize is not None:
        rep["materialized"] = _materialize(gp, hist, materialize, out_dir, base_opts, model, eval_steps,
                                           memory_budget, backend, overwrite, progress)
    rep["seconds"] = time.perf_counter() - t0
    files = []
    if out_dir is not None:
        if loader is not None:
            loader.join()
        if figures is not False:
            with _figures(out_dir, ["error_vs_distance.png"], rep["figures"], figures,
                          "backtest.json and backtest.md"):
                figs.error_distance_figure(os.path.join(out_dir, "error_vs_distance.png"), model, last)
                rep["figures"].append("error_vs_distance.png")
        write_json(os.path.join(out_dir, "backtest.json"), rep)
        write_text(os.path.join(out_dir, "backtest.md"), backtest_markdown(rep))
        files = [os.path.join(out_dir, n) for n in ["backtest.json", "backtest.md"] + rep["figures"]]
    return Result(rep, files, time.perf_counter() - t0)


def _materialize(gp: GramPass, hist, step, out_dir, base_opts, model, eval_steps, memory_budget, backend,
                 overwrite, progress) -> dict:
    from .materialize import materialize as write_and_compare

    opts = replace(base_opts, rank=1, fit="linear")
    names = [tg.name for tg in gp.tensors]
    path, measured = write_and_compare(gp.base, {s: gp.checkpoints[s] for s in hist}, gp.checkpoints[step], step,
                                       os.path.join(out_dir, "predicted"), opts, names,
                                       memory_budget=memory_budget, backend=backend, overwrite=overwrite,
                                       progress=progress)
    tot = np.sum([measured[n] for n in names], axis=0)
    pp, pt, tt, ee = tot
    after = {"rel_error": float(np.sqrt(ee / tt)) if tt > 0 else None,
             "cosine": float(pt / np.sqrt(pp * tt)) if pp > 0 and tt > 0 else None,
             "magnitude_ratio": float(np.sqrt(pp / tt)) if tt > 0 else None}
    pre = model["relex"][eval_steps.index(step)]
    return {"step": step, "path": path, "method": "relex", "pre_rounding": pre, "after_rounding": after}
