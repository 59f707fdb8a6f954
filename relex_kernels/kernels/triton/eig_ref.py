"""Torch-only parts of the batched eigensolver, shared by the Triton and CUDA kernels.

``eigh_top`` is the reference (and the fallback) of the power iteration; the start
vectors and the post-processing are the same for both device backends. Importing
this module needs torch, not triton.
"""

import torch


def normalise_signs(U):
    """U (..., T, r): each column with its largest-magnitude entry positive (ties: the positive one)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    pick = torch.gather(U, -2, idx)
    return torch.where(pick < 0, -U, U)


def eigh_top(G, rank: int):
    """Reference: (λ (B, rank) descending, U (B, T, rank)) of symmetrised G from ``torch.linalg.eigh``."""
    lam, vec = torch.linalg.eigh(0.5 * (G + G.transpose(-1, -2)))
    lam = lam.flip(-1)[..., :rank]
    U = vec.flip(-1)[..., :rank]
    return lam, normalise_signs(U)


def power_starts(v0, B: int, rank: int, T: int, device):
    """(B, rank, T) float64 start vectors, contiguous.

    Component 0: the warm start ``v0`` ((T,), (B, T); default all ones, close to a
    trajectory's linear-in-time direction). Later components: fixed generic vectors —
    a start inside the span of the deflated components would stall at λ = 0. A
    (B, rank, T) ``v0`` gives every component's start.
    """
    j = torch.arange(T, dtype=torch.float64, device=device)
    generic = torch.stack([1.0 + 0.5 * torch.cos(0.6180339887 * (k + 1) * (j + 1) + k) for k in range(rank)])
    out = generic[None].repeat(B, 1, 1)
    if v0 is None:
        out[:, 0] = 1.0
        return out
    v0 = v0.to(device=device, dtype=torch.float64)
    if v0.dim() == 3:
        return v0.expand(B, rank, T).contiguous()
    out[:, 0] = v0 if v0.dim() == 1 else v0.reshape(B, T)
    return out


def check_batch(G, rank: int):
    if G.dim() != 3 or G.shape[1] != G.shape[2] or G.dtype != torch.float64:
        raise ValueError(f"expected a (B, T, T) float64 batch of Grams; got {tuple(G.shape)} {G.dtype}")
    T = G.shape[1]
    if not 1 <= rank <= T:
        raise ValueError(f"rank must be between 1 and T={T}; got {rank}")


def all_eigh(G, rank: int):
    lam, U = eigh_top(G, rank)
    return lam, U, torch.zeros(G.shape[0], dtype=torch.bool, device=G.device)


def finish(G, lam, U, status, rank: int):
    """Kernel outputs -> (λ (B, rank), U (B, T, rank), iterative (B,)); flagged Grams go to eigh.

    ``U`` comes from the kernels as (B, rank, T); ``status`` is 1 where a component
    converged, 0 (max_iter) or 2 (spectral gap too small) where it did not.
    """
    U = U.transpose(1, 2)
    ok = (status == 1).all(dim=1)
    bad = (~ok).nonzero().flatten()
    if bad.numel():
        lb, ub = eigh_top(G[bad], rank)
        lam = lam.clone()
        lam[bad] = lb
        U = U.clone()
        U[bad] = ub
    return lam, U, ok
