"""Diagnostics of one tensor from its extended Gram (history ∪ later checkpoints).

All figures are functions of the N x N Gram ``G`` of the deltas ``m_i = θ_i − θ₀``
over the sorted steps; the first ``T`` rows are the history. No data is read here.

* Rank-1 coefficients: with ``u₁, s₁`` the top eigenpair of the history block and
  ``v₁ = M_hᵀ u₁ / s₁`` the direction, every checkpoint's coefficient is
  ``c_j = ⟨m_j, v₁⟩ = (G[j, :T] · u₁) / s₁``; on the history this is ``s₁ u_{j,1}``
  (method §2), later it is the projection on the history subspace.
* The "oracle" subspace takes ``u₁, s₁`` from the whole Gram instead, so a low
  out-of-sample R² with the history subspace but a high one with the oracle subspace
  means the direction drifts; low with both means the coefficient curves.
* Any prediction that is a linear combination ``Δ̂ = Σ_i α_i m_i`` of the history has
  ``‖Δ̂ − m_S‖² = αᵀ G_hh α − 2 αᵀ g + g_SS`` with ``g = G[:T, S]``: an error, a cosine
  and a norm ratio from Gram entries alone.

The sign of an eigenvector is arbitrary; coefficients are signed so that the last
history coefficient is >= 0 (the oracle's so that it agrees with the history one).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .. import fit as fitmath
from ..errors import UsageError
from ..fit import FitOptions

#: Relative rounding of a Gram entry (chunk partials accumulated in fp32, method §2), used
#: to say below which size an error computed from Gram entries is noise: the error is
#: the small difference of large terms, so its resolution is about sqrt(4·eps) ≈ 1.4e-3.
#: Measured: exact straight lines in F32 (true error ~1e-7) score up to 4.7e-4
#: (tests/test_analysis.py checks the bound against fp64 sums of materialised deltas).
GRAM_REL_EPS = 2.0 ** -21

#: a per-tensor R² field ``r2_*`` has its ``[SS_res, SS_tot]`` beside it as ``r2_*_ss`` (for :func:`pooled_r2`)
SS_SUFFIX = "_ss"


# -- explained variance and coefficients ------------------------------------------------
def ev_curve(singular_values: np.ndarray, kmax: int) -> list[float]:
    """Explained variance of ranks 1..kmax (uncentred; 0.0 when the Gram is 0)."""
    lam = np.asarray(singular_values, dtype=np.float64) ** 2
    k = min(kmax, lam.size)
    total = lam.sum()
    if total <= 0:
        return [0.0] * k
    return [float(x) for x in np.cumsum(lam)[:k] / total]


def r2_terms(y: np.ndarray, yhat: np.ndarray) -> tuple[float, float] | None:
    """``(SS_res, SS_tot)``: Σ (y − ŷ)² and Σ (y − ȳ)² about the mean of ``y``; None for fewer
    than 2 points."""
    y = np.asarray(y, dtype=np.float64)
    if y.size < 2:
        return None
    return float(((y - np.asarray(yhat, dtype=np.float64)) ** 2).sum()), float(((y - y.mean()) ** 2).sum())


def pooled_r2(terms) -> float | None:
    """R² of a group of tensors: 1 − Σ SS_res / Σ SS_tot over their ``(SS_res, SS_tot)`` pairs.

    The squared errors of the coefficients are squared errors in parameter space (the rank-1
    component c·v₁ with ‖v₁‖ = 1), so this is the R² of the group's parameters taken together:
    each tensor counts by its squared error against the spread of all (the tensors that move most
    — embedding, head — weigh most). A tensor's error is not bounded by its own spread out of
    sample (nor in sample with a window), but it counts in parameter units, not divided by that
    spread: a tensor whose coefficient barely varies over the points has SS_tot near 0 and an R²
    of any size (−1e26 on a bf16 norm), which drives any mean of per-tensor R² values, whatever
    its weight, and not this.
    None when no pair is given or Σ SS_tot is 0."""
    pairs = [t for t in terms if t is not None]
    tot = sum(t[1] for t in pairs)
    if not pairs or not tot > 0:
        return None
    return 1.0 - sum(t[0] for t in pairs) / tot


def fit_matrix(steps: list[int], T: int, opts: FitOptions) -> np.ndarray:
    """(N, T): row j gives the fitted coefficient at steps[j] from the T history coefficients."""
    hist = steps[:T]
    return np.stack([fitmath.weights(opts, hist, s) for s in steps])


def _rank1(G: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    comp = fitmath.components(G, 1)
    if comp.u.shape[1] == 0:
        return np.zeros(G.shape[0]), 0.0, comp.singular_values
    return comp.u[:, 0], float(comp.s[0]), comp.singular_values


def _fit_stats(c: np.ndarray, c_fit: np.ndarray, T: int, tag: str = "") -> dict:
    """R² in and out of sample (with their SS pairs) and the later coefficients' error, keys ending
    in ``tag``."""
    out = {"coef_error_out" + tag: None}
    for key, sl in (("r2_in", slice(None, T)), ("r2_out", slice(T, None))):
        t = r2_terms(c[sl], c_fit[sl])
        out[key + tag] = pooled_r2([t])  # (R² of one pair: None for < 2 points or a constant y)
        out[key + tag + SS_SUFFIX] = list(t) if t is not None else None  # (what pooled_r2 sums)
    norm = float(np.sqrt((c[T:] ** 2).sum()))
    if c.size > T and norm > 0:
        out["coef_error_out" + tag] = float(np.sqrt(((c[T:] - c_fit[T:]) ** 2).sum())) / norm
    return out


def analyze_tensor(G: np.ndarray, T: int, fitm: np.ndarray, rank_max: int, steps: list[int] | None = None) -> dict:
    """Every per-tensor figure of ``relex analyze`` (see :data:`.report.TENSOR_FIELDS`).

    ``G``: (N, N) float64, history first; ``fitm``: :func:`fit_matrix` for these steps; ``steps``
    (history first, as ``G``): for the growth of the distance from the base.
    """
    G = np.asarray(G, dtype=np.float64)
    N = G.shape[0]
    u1, s1, sv = _rank1(G[:T, :T])
    c = G[:, :T] @ u1 / s1 if s1 > 0 else np.zeros(N)
    if c[T - 1] < 0 or (c[T - 1] == 0 and c.sum() < 0):
        c = -c
    c_fit = fitm @ c[:T]
    e = {"singular_values": [float(x) for x in sv],
         "explained_variance": ev_curve(sv, rank_max),
         "coef": [float(x) for x in c], "coef_fit": [float(x) for x in c_fit]}
    e["ev1"] = e["explained_variance"][0]
    e.update(_fit_stats(c, c_fit, T))
    diag_out = float(np.trace(G[T:, T:]))
    e["ev1_out"] = float((c[T:] ** 2).sum() / diag_out) if N > T and diag_out > 0 else None
    # oracle: the direction of all N checkpoints
    ua, sa, sva = _rank1(G)
    ca = sa * ua
    if float(ca @ c) < 0 or (float(ca @ c) == 0 and ca[T - 1] < 0):
        ca = -ca
    ca_fit = fitm @ ca[:T]
    e["coef_oracle"] = [float(x) for x in ca]
    e["coef_oracle_fit"] = [float(x) for x in ca_fit]
    e["ev1_oracle"] = ev_curve(sva, 1)[0] if sva.size else 0.0
    e.update(_fit_stats(ca, ca_fit, T, "_oracle"))
    e["subspace_cosine"] = (float(abs(u1 @ G[:T, :] @ ua)) / (s1 * sa)) if s1 > 0 and sa > 0 and N > T else None
    if steps is not None and (h := mid_index(steps, T)) is not None:
        e["dist2_mid"], e["dist2_last"] = float(G[h, h]), float(G[T - 1, T - 1])
        e["growth"] = growth_exponent(e["dist2_mid"], e["dist2_last"], steps[h], steps[T - 1])
    return e


# -- how the distance from the base grows -----------------------------------------------
def mid_index(steps: list[int], T: int) -> int | None:
    """The history index whose step is nearest half the last history step (None: too few steps)."""
    if T < 2 or steps[T - 1] <= 0:
        return None
    h = min(range(T - 1), key=lambda i: abs(steps[i] - steps[T - 1] / 2))
    return h if steps[h] > 0 else None


def growth_exponent(d2_mid: float, d2_last: float, x_mid: float, x_last: float) -> float | None:
    """p in ‖θ_x − θ₀‖ ∝ x^p between two history steps, from squared distances (None: no motion).

    A straight line at constant speed — what RELEX's line assumes — has p = 1; a random walk
    0.5. A line fitted to a run with p < 1 overshoots a far target S by about (S / x_last)^(1 − p).
    """
    if d2_mid <= 0 or d2_last <= 0 or x_last <= x_mid:
        return None
    return 0.5 * math.log(d2_last / d2_mid) / math.log(x_last / x_mid)


# -- predictions that are linear combinations of the history ---------------------------
#: method -> what it predicts (shown in reports). ``rank<r>`` works for any r.
METHODS = {
    "relex": "RELEX: rank-1 subspace, straight-line fit of the coefficient (α = (w̃·u₁)u₁)",
    "rank2": "rank-2 subspace, straight-line fit of each coefficient",
    "rank5": "rank-5 subspace, straight-line fit of each coefficient",
    "poly": "rank-1 subspace, polynomial fit of the coefficient (--poly-degree)",
    "full-rank": "per-element straight line through the raw deltas (α = w̃, 'raw delta')",
    "secant": "two-point secant from θ₀ through the last history checkpoint (α = S/x_last · e_last)",
    "keep-last": "the last history checkpoint itself (α = e_last)",
}
DEFAULT_METHODS = ("relex", "rank2", "rank5", "poly", "full-rank", "secant", "keep-last")


def parse_methods(text: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_METHODS)
    out = []
    for m in (x.strip() for x in text.split(",")):
        if not m:
            continue
        if m not in METHODS and not (m.startswith("rank") and m[4:].isdigit() and int(m[4:]) >= 1):
            raise UsageError(f"unknown method {m!r} (choose from {', '.join(DEFAULT_METHODS)}, or rank<R>)")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError("--methods names no method")
    return out


def method_options(method: str, base: FitOptions, poly_degree: int) -> FitOptions | None:
    """The fit options of a subspace method; None for the methods that need no Gram solve."""
    if method == "relex":
        return replace(base, rank=1, fit="linear")
    if method == "poly":
        return replace(base, rank=1, fit="poly", degree=poly_degree)
    if method.startswith("rank"):
        return replace(base, rank=int(method[4:]), fit="linear")
    return None


def applicable(method: str, base: FitOptions, poly_degree: int, hist: list[int]) -> str | None:
    """Why ``method`` cannot run on this history (None when it can)."""
    opts = method_options(method, base, poly_degree)
    try:
        fitmath.validate(opts or replace(base, rank=1, fit="linear"), hist)
    except UsageError as e:
        return str(e)
    return None


def method_weights(method: str, base: FitOptions, poly_degree: int, hist: list[int], target: int) -> np.ndarray:
    """w̃ (T,) of a method for one target — the same for every tensor."""
    T = len(hist)
    if method == "keep-last":
        w = np.zeros(T)
        w[-1] = 1.0
        return w
    if method == "secant":
        w = np.zeros(T)
        w[-1] = target / hist[-1]
        return w
    opts = method_options(method, base, poly_degree) or replace(base, rank=1, fit="linear")
    return fitmath.weights(opts, hist, target)


def method_alphas(method: str, Gh: np.ndarray, w: np.ndarray, base: FitOptions, poly_degree: int) -> np.ndarray:
    """α (K, T) of a method for one tensor's history Gram ``Gh`` and its weights ``w`` (K, T)."""
    opts = method_options(method, base, poly_degree)
    if opts is None:  # keep-last, secant, full-rank: α = w̃
        return np.atleast_2d(w)
    return fitmath.alphas(fitmath.components(Gh, opts.rank), w)


def combo_terms(G: np.ndarray, T: int, alphas: np.ndarray, cols: list[int]) -> np.ndarray:
    """(K, 3) rows ``(‖Δ̂‖², ⟨Δ̂, m_S⟩, ‖m_S‖²)`` for α ``alphas[k]`` against checkpoint ``cols[k]``."""
    A = np.atleast_2d(alphas)
    Gh = G[:T, :T]
    pp = np.einsum("kt,ts,ks->k", A, Gh, A)
    pt = np.einsum("kt,tk->k", A, G[:T, cols])
    tt = G[cols, cols]
    return np.stack([pp, pt, tt], axis=1)


def combo_scores(pp: float, pt: float, tt: float) -> dict:
    """Relative error ‖Δ̂ − Δ‖/‖Δ‖, cosine(Δ̂, Δ), ‖Δ̂‖/‖Δ‖ and the Gram's resolution of the error."""
    if not tt > 0:
        return {"rel_error": None, "cosine": None, "magnitude_ratio": None, "resolution": None}
    err2 = max(pp - 2.0 * pt + tt, 0.0)
    return {"rel_error": float(np.sqrt(err2 / tt)),
            "cosine": float(pt / np.sqrt(pp * tt)) if pp > 0 else None,
            "magnitude_ratio": float(np.sqrt(pp / tt)),
            "resolution": float(np.sqrt(GRAM_REL_EPS * (pp + 2.0 * abs(pt) + tt) / tt))}
