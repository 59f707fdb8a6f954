"""The T x T mathematics of RELEX (method §2-3): tiny, fp64, no data access.

From one tensor's Gram ``G = M Mᵀ`` (T x T, float64) and the history steps, this
module finds the rank-r temporal subspace and turns a target into the weights
``α`` of the closed form ``θ̂ = θ₀ + Σ_i α_i (θ_i − θ₀)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from . import threads
from .errors import UsageError
from .ops import blas, native
from .ops.reference import GRAM_CHUNK

#: unit roundoff of a Gram's chunk partial sums: fp32 in every kernel, fp64 on the F64 path (ops.fp64)
U_FP32, U_FP64 = 2.0 ** -24, 2.0 ** -53
MODES = ("extrapolate", "reconstruct", "fit-reconstruct")
FITS = ("linear", "poly")
TIME_AXES = ("step", "index")


@dataclass(frozen=True)
class FitOptions:
    """Everything that turns Grams and steps into weights; saved with a fit."""

    rank: int = 1
    fit: str = "linear"
    degree: int = 1
    window: int | None = None
    time_axis: str = "step"
    step_scale: float = 1.0
    mode: str = "extrapolate"
    fp16_deltas: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def poly_degree(self) -> int:
        return 1 if self.fit == "linear" else self.degree


def is_int(x) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


#: what each :class:`FitOptions` field must hold (a bool is not an int here)
OPTION_TYPES = {
    "rank": ("an int", is_int), "fit": ("a str", lambda x: isinstance(x, str)), "degree": ("an int", is_int),
    "window": ("an int or None", lambda x: x is None or is_int(x)),
    "time_axis": ("a str", lambda x: isinstance(x, str)),
    "step_scale": ("a finite number", lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
                   and math.isfinite(x)),
    "mode": ("a str", lambda x: isinstance(x, str)), "fp16_deltas": ("a bool", lambda x: isinstance(x, bool)),
}


def wrong_option(opts: FitOptions) -> tuple[str, str] | None:
    """(field, what it must be) of the first field of ``opts`` holding the wrong type, else None."""
    for name, (want, ok) in OPTION_TYPES.items():
        if not ok(getattr(opts, name)):
            return name, want
    return None


@dataclass
class Components:
    """The kept temporal components of one tensor: ``u`` is (T, r'), ``s`` (r',), r' <= rank."""

    u: np.ndarray
    s: np.ndarray
    singular_values: np.ndarray  # all T, descending
    explained_variance: float  # of the kept rank r' (0.0 when G = 0)


def validate(opts: FitOptions, steps: list[int]) -> None:
    """Raise :class:`UsageError` for options that make no sense for these history steps."""
    T = len(steps)
    if T < 2:
        raise UsageError(f"RELEX needs at least 2 history checkpoints; got {T} "
                         f"(steps {steps}); raise --history-steps or add checkpoints")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise UsageError(f"history steps must be strictly increasing: {steps}")
    for s in steps:
        _check_step(s)
    if opts.mode not in MODES:
        raise UsageError(f"unknown mode {opts.mode!r} (choose from {', '.join(MODES)})")
    if opts.fit not in FITS:
        raise UsageError(f"unknown fit {opts.fit!r} (choose from {', '.join(FITS)})")
    if opts.time_axis not in TIME_AXES:
        raise UsageError(f"unknown time axis {opts.time_axis!r} (choose from {', '.join(TIME_AXES)})")
    if not 1 <= opts.rank <= T:
        raise UsageError(f"rank (--rank) must be between 1 and the number of history checkpoints ({T}); "
                         f"got {opts.rank}")
    W = window(opts, T)
    if not 2 <= W <= T:
        raise UsageError(f"window (--window) must be between 2 and the number of history checkpoints ({T}); got {W}")
    if opts.fit == "poly" and not 1 <= opts.degree <= W - 1:
        raise UsageError(f"degree (--degree) {opts.degree} needs a window of at least {opts.degree + 1} points "
                         f"and must be >= 1; the window has {W}")
    if not opts.step_scale > 0:
        raise UsageError(f"step_scale (--step-scale) must be positive; got {opts.step_scale}")
    if opts.step_scale != 1 and opts.mode != "extrapolate":
        # a history step is not a label to scale: like the authors' script, refuse rather than fit at a wrong τ
        raise UsageError(f"step_scale (--step-scale) {opts.step_scale:g} applies only to mode extrapolate; "
                         f"mode {opts.mode} reproduces a history step at its own index (leave it at 1)")


def window(opts: FitOptions, T: int) -> int:
    return T if opts.window is None else opts.window


def _check_step(s: int) -> None:
    """A step a float64 holds exactly (|s| < :data:`MAX_STEP`), else a :class:`UsageError`."""
    if not abs(s) < MAX_STEP:
        digits = str(abs(s))
        raise UsageError(f"step {s if len(digits) <= 20 else f'of {len(digits)} digits'} is too large "
                         "(steps are below 2^53)")


def validate_target(opts: FitOptions, steps: list[int], target: int) -> None:
    """A target that makes no sense for the mode is a :class:`UsageError`."""
    _check_step(target)
    if opts.mode == "extrapolate":
        if target <= steps[-1]:
            raise UsageError(f"target step {target} is not after the last history step {steps[-1]}; to "
                             "reproduce a history step, run 'relex extrapolate' with --mode reconstruct or "
                             "fit-reconstruct")
    elif target not in steps:
        raise UsageError(f"mode (--mode) {opts.mode} reproduces a history checkpoint; target step {target} is "
                         f"not one of the history steps {steps}")


def noise_floor(trace: float, n: int | None = None, dtype: str | None = None) -> float:
    """The eigenvalue up to which a component of a computed Gram is rounding error (method §2).

    The Gram of a tensor of ``n`` elements is a sum over chunks of m = min(n, GRAM_CHUNK)
    elements of partials Σ_k d_ik d_jk accumulated in fp32 (unit roundoff u = 2^-24; fp64
    for F64 tensors) and added in fp64. A partial is off by at most (m−1)·u·Σ_k |d_ik d_jk|
    in any order and, rounding errors behaving like independent zero-mean variables (Higham
    & Mary, SIAM J. Sci. Comput. 41(5), 2019), by about sqrt(m)·u·Σ_k |d_ik d_jk| in
    practice; the kernels' blocked and lane-wise sums do better still. Over all chunks (the
    fp64 additions add nothing comparable) and with Cauchy–Schwarz, Σ_k |d_ik d_jk| <=
    ‖d_i‖‖d_j‖ = sqrt(G_ii G_jj), the error E of the computed Gram has |E_ij| <= ε sqrt(G_ii G_jj)
    with ε = sqrt(m)·u, so ‖E‖₂ <= ε‖g gᵀ‖₂ = ε·trace(G) (g_i = sqrt(G_ii)). By Weyl's
    inequality no eigenvalue moves by more than ‖E‖₂: one <= ε·trace(G) cannot be told from
    zero, and its component is dropped. (The worst-case m·u would be 256 times larger at full
    chunks and drop real components up to s_k/s_1 ≈ 6%.) Measured on exactly rank-1
    trajectories (bf16 and fp32, the reference and every SIMD path): λ_2 <= 0.04·ε·trace(G).
    ``n`` None: full chunks; ``dtype`` None: fp32 — the larger floor.
    """
    return float(_floor_factors([n], [dtype])[0]) * trace


def _floor_factors(ns, dtypes) -> np.ndarray:
    """sqrt(m)·u of each tensor: :func:`noise_floor` per unit of trace, for a stack at once."""
    m = np.array([GRAM_CHUNK if n is None else max(1, min(int(n), GRAM_CHUNK)) for n in ns], dtype=np.float64)
    return np.sqrt(m) * np.array([U_FP64 if dt == "F64" else U_FP32 for dt in dtypes])


def components(G: np.ndarray, rank: int, n: int | None = None, dtype: str | None = None) -> Components:
    """Top-``rank`` eigenpairs of the Gram of a tensor of ``n`` elements of ``dtype``; components
    within the Gram's rounding error are dropped (:func:`noise_floor`), the first never."""
    return components_many(np.asarray(G, dtype=np.float64)[None], rank, [n], [dtype])[0]


def components_many(Gs: np.ndarray, rank: int, ns, dtypes) -> list[Components]:
    """:func:`components` of a stack of Grams (k, T, T), tensor ``i`` of ``ns[i]`` elements of ``dtypes[i]``.

    One eigen-solve for the whole stack (:func:`_eigh_stack`): an engine run over thousands
    of small tensors would otherwise spend more time in per-call overhead than in its data.
    Each matrix of the stack is solved as a lone one would be, so every tensor gets the same
    bits as alone; the per-tensor scalars below use the same 1-D sums.
    """
    Gs = np.asarray(Gs, dtype=np.float64)
    Gs = 0.5 * (Gs + Gs.swapaxes(-1, -2))
    lam_all, vec_all = _eigh_stack(Gs)
    # Elementwise steps and sorts over the stack; every sum runs over contiguous rows, which
    # numpy adds in the same (pairwise) order as a row alone.
    if bool((lam_all[:, 1:] > lam_all[:, :-1]).all()):
        # strictly ascending, as solved (no ties): the descending order is the reversal, taken as
        # views (the sort and gathers below cost ~0.4 s for 18,432 Grams at T = 50)
        lam, vec = np.clip(lam_all[:, ::-1], 0.0, None), vec_all[:, :, ::-1]
    else:
        order = np.argsort(lam_all, axis=-1)[:, ::-1]
        lam = np.clip(np.take_along_axis(lam_all, order, -1), 0.0, None)
        vec = np.take_along_axis(vec_all, order[:, None, :], -1)
    s = np.sqrt(lam)
    total = lam.sum(axis=-1)
    trace = np.ascontiguousarray(np.diagonal(Gs, 0, 1, 2)).sum(axis=-1)
    floors = _floor_factors(ns, dtypes) * trace  # noise_floor(trace, n, dtype) of each
    keep = np.where(s[:, 0] > 0, np.minimum(rank, 1 + np.count_nonzero(lam[:, 1:] > floors[:, None], axis=1)), 0)
    # explained variance of the kept rank: lam[0] / total at rank 1 (the usual; elementwise, the
    # same division as a Python float's), the sum of the kept lam otherwise (each row as alone)
    pos = total > 0
    ev = np.divide(lam[:, 0], total, out=np.zeros_like(total), where=pos)
    for i in np.flatnonzero(pos & (keep > 1)).tolist():
        ev[i] = lam[i, :keep[i]].sum() / total[i]
    # one copy of the kept columns for the stack when every tensor keeps as many (the usual);
    # each tensor's arrays are contiguous rows of it
    if keep.size and bool((keep == keep[0]).all()):
        us, ss = list(vec[:, :, :keep[0]].copy()), list(s[:, :keep[0]].copy())
    else:
        us = [vec[i, :, :r].copy() for i, r in enumerate(keep.tolist())]
        ss = [s[i, :r].copy() for i, r in enumerate(keep.tolist())]
    return list(map(Components, us, ss, list(s), ev.tolist()))


def eigen_solver(T: int, fitted: bool = False) -> str:
    """What solves the T x T Grams of this process: ``native`` (the extension's Householder + QL,
    csrc/cpu/eigh.cpp, T <= its EIGH_MAX_T) or ``lapack`` (numpy's eigh); ``saved fit`` for a run
    from a saved fit (``fitted``), which solves nothing. The fits' last bits depend on it, so the
    report and the run journal's key carry it."""
    if fitted:
        return "saved fit"
    return "native" if 1 <= T <= native.eigh_max_t() else "lapack"


def _eigh_stack(Gs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of a (k, T, T) stack. Up to the extension's EIGH_MAX_T rows its solver, on the
    kernels' threads (3072 Grams at T = 16: ~20 ms against numpy's 84 ms in a 2-core run); a matrix
    it does not solve (not finite, not converged) gets numpy's answer, or numpy's error, as before.
    Otherwise (or without the extension) numpy's ``eigh``, :func:`_lapack_eigh`."""
    if Gs.shape[0] and eigen_solver(Gs.shape[-1]) == "native":
        w, V, ok = native.eigh_small(Gs)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            w[bad], V[bad] = _lapack_eigh(Gs[bad])
        return w, V
    return _lapack_eigh(Gs)


#: Grams per worker below which a stack is solved by one call (a pool's start would cost more)
LAPACK_GRAMS_PER_THREAD = 32


def _lapack_eigh(Gs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's ``eigh`` of a (k, T, T) stack with its BLAS on one thread (:func:`.ops.blas.one_thread`:
    woken BLAS threads spun beside the kernels' own, and a pool of solvers oversubscribed the cores
    with them), the stack split over the kernels' threads (:func:`.ops.native.get_num_threads`), each
    part solved by one call on a worker. Each matrix gets the bits it gets alone on one thread. At
    T = 50-100 (a real run's T) a MoE model's thousands of Grams took seconds on one core."""
    k = Gs.shape[0]
    n = min(native.get_num_threads(), k // LAPACK_GRAMS_PER_THREAD)
    with blas.one_thread():
        # (another BLAS than OpenBLAS is not held at one thread: solvers side by side would
        # oversubscribe the cores with its threads, as OpenBLAS's did)
        if n <= 1 or not blas.thread_counts():
            return np.linalg.eigh(Gs)
        w, V = np.empty(Gs.shape[:2]), np.empty(Gs.shape)

        def solve(a: int, b: int) -> None:
            w[a:b], V[a:b] = np.linalg.eigh(Gs[a:b])

        cuts = np.linspace(0, k, n + 1).astype(int).tolist()
        with threads.pool(n, "relex-eigh") as workers:
            for done in [workers.submit(solve, a, b) for a, b in zip(cuts[:-1], cuts[1:])]:
                done.result()
        return w, V


def _time_coords(opts: FitOptions, steps: list[int]) -> np.ndarray:
    W = window(opts, len(steps))
    if opts.time_axis == "index":
        return np.arange(W, dtype=np.float64)
    return np.asarray(steps[len(steps) - W:], dtype=np.float64)


def target_time(opts: FitOptions, steps: list[int], target: int) -> float:
    """τ on the fit's time axis. Index axis: τ = (W−1) + round(L·scale) − x_{T−1} (method §3)."""
    if opts.time_axis == "index":
        W = window(opts, len(steps))
        # Python's round() is half-to-even, like the authors' numpy/torch round
        return float((W - 1) + round(target * opts.step_scale) - steps[-1])
    return float(target)


def fit_weights(t: np.ndarray, tau: float, degree: int) -> np.ndarray:
    """``w`` with ĉ(τ) = Σ_j w_j c_j for the least-squares polynomial of ``degree`` through (t_j, c_j)."""
    t = np.asarray(t, dtype=np.float64)
    center = t.mean()
    scale = np.abs(t - center).max() or 1.0
    x = (t - center) / scale
    A = np.vander(x, degree + 1, increasing=True)  # (W, p+1)
    phi = ((tau - center) / scale) ** np.arange(degree + 1)
    return np.linalg.pinv(A).T @ phi


def weights(opts: FitOptions, steps: list[int], target: int) -> np.ndarray:
    """``w̃`` (length T): the temporal weights of a target before projection on the subspace."""
    T = len(steps)
    w = np.zeros(T)
    if opts.mode == "reconstruct":
        w[steps.index(target)] = 1.0
        return w
    W = window(opts, T)
    w[T - W:] = fit_weights(_time_coords(opts, steps), target_time(opts, steps, target), opts.poly_degree)
    return w


#: steps are below 2^53, so that a float64 holds each exactly
MAX_STEP = 2 ** 53
#: the largest norm of a target's weights w̃ (a line through steps 1..100 to step 10^9: ~10^7)
MAX_WEIGHT = 1e12


def target_weights(opts: FitOptions, steps: list[int], targets: list[int]) -> np.ndarray:
    """(K, T) weights ``w̃`` of ``targets``, after every check of the options, the steps and the
    targets (at least one, each valid for the mode, none repeated) — before any tensor is read."""
    validate(opts, steps)
    if not targets:
        raise UsageError("give at least one target step")
    for t in targets:
        validate_target(opts, steps, t)
    if len(set(targets)) != len(targets):
        raise UsageError(f"target steps repeat: {targets}")
    # α = U Uᵀ w̃ is no larger than w̃, and a delta no larger than the square root of its finite
    # fp32 Gram entry: a w̃ within MAX_WEIGHT keeps every prediction far inside the fp32 and bf16
    # range (fp16 outputs are checked as written). Past it the target is absurdly far away; weights
    # that overflow float64 (inf, nan) fail the same test.
    scale = f", step scale {opts.step_scale:g}" if opts.time_axis == "index" else ""
    rows = []
    for t in targets:
        try:  # (round() of a target time past float64, e.g. --step-scale 1e306 on the index axis)
            with np.errstate(all="ignore"):
                w = weights(opts, steps, t)
                n = float(np.linalg.norm(w))
        except OverflowError:
            n = float("inf")
        if not n <= MAX_WEIGHT:
            raise UsageError(f"target step {t} is too far from the history (steps {steps[0]}..{steps[-1]}{scale}): "
                             f"its weights reach {n:.3g}, and the prediction would overflow; predict a nearer step")
        rows.append(w)
    return np.stack(rows)


def alphas(comp: Components, w_tilde: np.ndarray) -> np.ndarray:
    """α = U_r U_rᵀ w̃ for each row of ``w_tilde`` (K, T) -> (K, T) float64."""
    w_tilde = np.atleast_2d(w_tilde)
    return (w_tilde @ comp.u) @ comp.u.T


def alphas_many(comps: list[Components], w_tilde: np.ndarray) -> np.ndarray:
    """:func:`alphas` of each fit, stacked (k, K, T): one broadcast product when every fit keeps as
    many components (numpy runs the same product per matrix: the bits of each alone), else one each."""
    w_tilde = np.atleast_2d(w_tilde)
    if comps and len({c.u.shape for c in comps}) == 1:
        U = np.stack([c.u for c in comps])
        return (w_tilde @ U) @ U.swapaxes(-1, -2)
    return np.stack([alphas(c, w_tilde) for c in comps]) if comps else np.empty((0, *w_tilde.shape))
