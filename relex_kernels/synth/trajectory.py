"""The fp32 master trajectory of every tensor, generated chunk by chunk.

Per tensor (d elements), at step t (t = 0 is the base):

    θ(t) = θ₀ + t·u + t²·u₂ + W(t)

- θ₀ = center + std·z (z ~ N(0,1) clipped to ±6): linear weights, biases,
  embeddings and the head ~N(0, 0.02..0.05); norm weights ~1 (N(1, 0.1)).
- u = a·v, v uniform with unit variance (|v| ≤ √3; bounded like Adam's per-element
  steps, and 16 random bits per element instead of a Gaussian's cost): the per-step drift. a = drift · kind factor ·
  exp(spread·ζ) · rms(θ₀), ζ ~ N(0,1) once per tensor, so per-step relative changes are
  spread log-normally around ``drift`` (norms move ~0.3x, embeddings ~0.5x).
- Curvature κ: with ``curvature_dir="orth"`` u₂ = κ·a·v₂ along an independent direction
  v₂ (drawn like v; rank 2); with ``"along"`` the line bends along v itself: t·u -> (t + κt²)·u.
- W is a random walk: W(0) = 0 and, between consecutive generated steps s < s',
  an independent increment of standard deviation b·√(s' − s), b = noise · kind factor ·
  exp(spread·ζ') · rms(θ₀). Increments are uniform (16 random bits per element: far
  cheaper than Gaussians; the walk is near-Gaussian after a few steps).

**Exact mode.** With ``noise == 0`` θ₀, u and u₂ are snapped to a per-tensor grid
q = 2^k chosen so that |θ(t)| < 2^24·q up to :func:`exact_horizon` (20x the last
generated step, truth steps included). Then for every such t θ₀ + t·u + t²·u₂ is
computed without any rounding in fp32, and θ(t) − θ₀ is
exactly t·u (+ t²·u₂): stored as F32 the trajectory is exactly rank 1 (rank 2 with
orthogonal curvature) and exactly linear (quadratic) in t. (``"along"`` curvature
rounds (t + κt²)·u and is not exact.)

Everything random is drawn from ``SeedSequence(seed, spawn_key=(crc32(name), stream,
chunk))`` over fixed chunks of :data:`CHUNK` elements, so each chunk can be produced
alone (any thread, any order) and a tensor's values do not depend on the other
tensors. θ₀ and v do not depend on the step list, drift or noise either: runs of one
seed share their base checkpoint. The walk does depend on the step list.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from math import ceil, log2, sqrt
from typing import Iterator

import numpy as np

from ..errors import UsageError
from .configs import TensorDef

CHUNK = 1 << 18  # elements; 1 MB of fp32, the buffers of one chunk stay in L2
_CLIP = 6.0
_S_THETA0, _S_DIR, _S_DIR2, _S_WALK, _S_SCALE = range(5)
# std of a uniform int16: sqrt((2^32 - 1) / 12)
_INT16_STD = sqrt((65536.0**2 - 1) / 12)
_UMAX = 32768 / _INT16_STD  # |v| bound of a unit-variance uniform from int16 (√3)

#: kind -> (center, init std, drift factor, noise factor)
KINDS = {
    "linear": (0.0, 0.02, 1.0, 1.0),
    "bias": (0.0, 0.05, 1.0, 1.0),
    "embed": (0.0, 0.02, 0.5, 0.5),
    "head": (0.0, 0.02, 1.0, 1.0),
    "norm": (1.0, 0.1, 0.3, 0.3),
}

CURVATURE_DIRS = ("orth", "along")


@dataclass(frozen=True)
class TrajectoryParams:
    """The knobs of the trajectory (all relative per-step magnitudes, see the module doc)."""

    seed: int = 0
    drift: float = 3e-4
    noise: float = 1e-4
    curvature: float = 0.0
    curvature_dir: str = "orth"
    spread: float = 0.5

    def check(self) -> None:
        for k in ("drift", "noise", "spread"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise UsageError(f"{k} must be a finite number >= 0, got {v!r}")
        if not np.isfinite(self.curvature):
            raise UsageError(f"curvature must be finite, got {self.curvature!r}")
        if self.curvature_dir not in CURVATURE_DIRS:
            raise UsageError(f"curvature_dir must be one of {', '.join(CURVATURE_DIRS)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class TensorPlan:
    """One generated tensor: the names it is stored under and its absolute scales."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str
    key: int
    center: float
    std: float
    drift: float   # rms of u (absolute, per step)
    noise: float   # std of one step's walk increment (absolute)
    curv: float    # rms of u₂ (orth) or κ (along)
    grid: float | None  # exact-mode quantum, None with noise

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "init_center": self.center,
                "init_std": self.std, "drift_per_step": self.drift, "noise_per_step": self.noise,
                "curvature": self.curv, "grid": self.grid, "stored_as": list(self.names)}


def _gen(seed: int, key: int, stream: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(key, stream, chunk))))


def _int16(bitgen, n: int) -> np.ndarray:
    return bitgen.random_raw((n + 3) // 4).view(np.int16)[:n]


def _uniform(g: np.random.Generator, std: float, out: np.ndarray) -> np.ndarray:
    """Fill float32 ``out`` with uniform values of standard deviation ``std``."""
    return np.multiply(_int16(g.bit_generator, out.size), np.float32(std / _INT16_STD), out=out)


def exact_horizon(max_step: int) -> int:
    """Largest step at which exact mode stays exact: 20x the last generated step (RELEX
    extrapolates 10-20x beyond the history), at least 100."""
    return max(100, 20 * int(max_step))


def plan_tensors(defs: list[TensorDef], p: TrajectoryParams, max_step: int) -> list[TensorPlan]:
    """Per-tensor scales; tensors sharing a ``source`` (a stored tied head) become one plan.

    ``max_step``: the last generated step (sets the exact-mode grid, see :func:`exact_horizon`).
    """
    p.check()
    groups: dict[str, list[TensorDef]] = {}
    for d in defs:
        groups.setdefault(d.source, []).append(d)
    plans = []
    for source, ds in groups.items():
        d0 = next(d for d in ds if d.name == source)
        center, std, fd, fn = KINDS[d0.kind]
        key = zlib.crc32(source.encode())
        zd, zn = _gen(p.seed, key, _S_SCALE, 0).standard_normal(2)
        ref = sqrt(center * center + std * std)
        drift = p.drift * fd * float(np.exp(p.spread * zd)) * ref
        noise = p.noise * fn * float(np.exp(p.spread * zn)) * ref
        curv = p.curvature * drift if p.curvature_dir == "orth" else p.curvature
        grid = None
        if noise == 0:
            h = exact_horizon(max_step)
            lin = h * _UMAX * drift
            quad = h * h * _UMAX * (abs(curv) if p.curvature_dir == "orth" else abs(curv) * drift)
            bound = abs(center) + _CLIP * std + lin + quad
            grid = 2.0 ** (ceil(log2(bound)) - 24)
        plans.append(TensorPlan(tuple(d.name for d in ds), d0.shape, d0.kind, key, center, std,
                                drift, noise, curv, grid))
    return plans


class Scratch:
    """Chunk buffers for one thread, reused chunk after chunk (fresh megabyte arrays
    would cost a page fault per 4 KB, more than the arithmetic on them)."""

    _NAMES = ("th0", "u", "u2", "acc", "x", "inc", "tmp")

    def __init__(self) -> None:
        self._bufs = {k: np.empty(CHUNK, np.float32) for k in self._NAMES}

    def __getitem__(self, key: tuple[str, int]) -> np.ndarray:
        name, n = key
        return self._bufs[name][:n]


def chunk_trajectory(plan: TensorPlan, p: TrajectoryParams, steps: list[int], lo: int, hi: int,
                     walk: bool = True, scratch: Scratch | None = None) -> Iterator[np.ndarray]:
    """Yield θ(0), θ(steps[0]), θ(steps[1]), ... for elements [lo, hi) of ``plan``.

    ``lo`` must be a multiple of :data:`CHUNK` and ``hi - lo <= CHUNK``. Each yield is a
    1-D fp32 buffer of ``hi - lo`` elements (in ``scratch``) that is overwritten by the
    next one. ``walk=False`` gives the noise-free mean trajectory (any steps, any order).
    """
    c, n = lo // CHUNK, hi - lo
    s = scratch or Scratch()
    th0 = s["th0", n]
    _gen(p.seed, plan.key, _S_THETA0, c).standard_normal(n, dtype=np.float32, out=th0)
    np.clip(th0, -_CLIP, _CLIP, out=th0)
    th0 *= np.float32(plan.std)
    th0 += np.float32(plan.center)
    u = _uniform(_gen(p.seed, plan.key, _S_DIR, c), plan.drift, s["u", n])
    u2 = None
    if plan.curv and p.curvature_dir == "orth":
        u2 = _uniform(_gen(p.seed, plan.key, _S_DIR2, c), plan.curv, s["u2", n])
    if plan.grid is not None:
        g = np.float32(plan.grid)
        for a in (th0, u) if u2 is None else (th0, u, u2):
            a /= g  # a power of two: exact
            np.rint(a, out=a)
            a *= g
    yield th0
    acc = th0
    rng = None
    if walk and plan.noise:
        acc = s["acc", n]
        acc[...] = th0
        rng = _gen(p.seed, plan.key, _S_WALK, c).bit_generator
    x, inc, tmp = s["x", n], s["inc", n], s["tmp", n]
    prev = 0
    along = plan.curv if p.curvature_dir == "along" else 0.0
    for t in steps:
        if rng is not None:
            scale = np.float32(plan.noise * sqrt(t - prev) / _INT16_STD)
            np.multiply(_int16(rng, n), scale, out=inc)
            acc += inc
            prev = t
        np.multiply(u, np.float32(t + along * t * t), out=x)
        if u2 is not None:
            np.multiply(u2, np.float32(t * t), out=tmp)
            x += tmp
        x += acc
        yield x


def tensor_values(plan: TensorPlan, p: TrajectoryParams, steps: list[int], step: int,
                  walk: bool = True) -> np.ndarray:
    """The fp32 master values (flat) of one tensor at ``step`` (0 = base), regenerated.

    With ``walk=True`` ``step`` must be 0 or one of ``steps`` (the walk depends on them).
    """
    out = np.empty(plan.numel, np.float32)
    if walk and step != 0 and step not in steps:
        raise UsageError(f"step {step} was not generated (steps {steps}); use walk=False for the mean")
    upto = [s for s in steps if s <= step] if walk else [step]
    idx = 0 if step == 0 else len(upto)
    scratch = Scratch()
    for lo in range(0, plan.numel, CHUNK):
        hi = min(lo + CHUNK, plan.numel)
        for k, x in enumerate(chunk_trajectory(plan, p, upto if step else [], lo, hi, walk, scratch)):
            if k == idx:
                out[lo:hi] = x
                break
    return out
