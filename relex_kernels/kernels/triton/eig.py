"""Top eigenpairs of many small symmetric PSD matrices at once: batched power iteration.

One program per T x T Gram (T <= MAX_T, held in registers, fp64): power iteration
from a warm start, stopped when the residual ``‖G v − λ v‖ <= tol · trace(G)``;
then deflation ``G -= λ v vᵀ`` for the next of ``rank`` components. The observed
contraction ``‖v_{k+1} − v_k‖ / ‖v_k − v_{k−1}‖`` estimates λ₂/λ₁: when it stays
above ``max_rate`` the spectral gap is too small for the iteration to be worth it
(or accurate), and the Gram is flagged and handed to ``torch.linalg.eigh``, which is
also the reference of the tests. Eigenvectors are returned with their largest-
magnitude entry positive (the sign cancels out of RELEX's α anyway).
"""

import torch
import triton
import triton.language as tl

from .eig_ref import all_eigh, check_batch, finish, power_starts

#: largest T solved in registers; larger Grams go to eigh
MAX_T = 128


@triton.jit(do_not_specialize=["T", "R", "max_iter"])
def _power(g_ptr, v0_ptr, lam_ptr, u_ptr, st_ptr, T, R, max_iter, tol, max_rate, TP: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, TP)
    m = r < T
    A = tl.load(g_ptr + g * T * T + r[:, None] * T + r[None, :], mask=m[:, None] & m[None, :], other=0.0)
    A = 0.5 * (A + tl.trans(A))
    scale = tl.sum(tl.where(r[:, None] == r[None, :], A, 0.0))  # trace >= λ₁ (PSD)
    floor = scale * T * 1e-15
    ones = tl.where(m, 1.0, 0.0).to(tl.float64)
    for k in range(R):
        v = tl.load(v0_ptr + (g * R + k) * T + r, mask=m, other=0.0)
        nv = tl.sqrt(tl.sum(v * v))
        v = tl.where(nv > 0, v / tl.where(nv > 0, nv, 1.0), ones / tl.sqrt(tl.sum(ones)))
        lam = tl.sum(v * 0.0)
        prev = lam + 1.0e300
        it = 0
        done = 0
        while (it < max_iter) & (done == 0):
            w = tl.sum(A * v[None, :], axis=1)
            lam = tl.sum(v * w)
            res = tl.sqrt(tl.sum((w - lam * v) * (w - lam * v)))
            nw = tl.sqrt(tl.sum(w * w))
            # relative to this component, with a floor at the rounding noise of the
            # (deflated) matrix so tiny trailing components still terminate
            conv = res <= tol * tl.abs(lam) + floor
            vn = tl.where(nw > 0, w / tl.where(nw > 0, nw, 1.0), v)
            step = tl.sqrt(tl.sum((vn - v) * (vn - v)))
            slow = (it >= 8) & (step > max_rate * prev)
            v = tl.where(conv, v, vn)
            done = tl.where(conv, 1, tl.where(slow, 2, 0))
            prev = step
            it += 1
        mx = tl.max(tl.abs(v))
        pick = tl.max(tl.where(tl.abs(v) == mx, v, -1.0e300))
        v = tl.where(pick < 0, -v, v)
        tl.store(lam_ptr + g * R + k, lam)
        tl.store(u_ptr + (g * R + k) * T + r, v, mask=m)
        tl.store(st_ptr + g * R + k, done)
        A = A - lam * (v[:, None] * v[None, :])


def top_eigenpairs(G, rank: int = 1, v0=None, tol: float = 1e-10, max_iter: int = 500, max_rate: float = 0.9):
    """Top ``rank`` eigenpairs of each symmetric PSD matrix of a batch.

    ``G``: (B, T, T) float64 on the kernels' device. ``v0``: warm start (see
    :func:`.eig_ref.power_starts`). Returns ``(lam (B, rank) float64 descending,
    U (B, T, rank) float64, iterative (B,) bool)``; ``iterative[b]`` is False where
    Gram b went to ``eigh`` (T > MAX_T, no convergence in ``max_iter``, or estimated
    λ₂/λ₁ above ``max_rate``).
    """
    check_batch(G, rank)
    B, T, _ = G.shape
    if B == 0 or T > MAX_T:
        return all_eigh(G, rank)
    G = G.contiguous()
    v0 = power_starts(v0, B, rank, T, G.device)
    lam = torch.empty((B, rank), dtype=torch.float64, device=G.device)
    U = torch.empty((B, rank, T), dtype=torch.float64, device=G.device)
    st = torch.empty((B, rank), dtype=torch.int32, device=G.device)
    tp = max(2, triton.next_power_of_2(T))
    _power[(B,)](G, v0, lam, U, st, T, rank, max_iter, tol, max_rate, TP=tp, num_warps=4 if tp <= 32 else 8,
                 enable_fp_fusion=True)
    return finish(G, lam, U, st, rank)
