"""Byte-balanced work plans for SPMD runs: which rank reads and writes which part of which tensor.

Every rank computes the same plan from the same inputs (names, dtypes, shapes, T, K,
world size — never from anything node-dependent such as the memory budget), so no
plan is ever sent. The cost of a tensor is the bytes a run moves for it:

* ``fit``: ``(T + 1 + n_out) · nbytes`` — its T + 1 versions read, ``n_out`` outputs
  written (K targets, 2K when it is the source of a tied head, which its owner writes);
* ``copy``: ``(1 + K) · nbytes``; ``tied``: nothing (written with its embedding).

The jobs, in storage order, are laid end to end on a line of length ``total`` and the
line is cut into ``world`` equal shares. A fit tensor of more than one ``GRAM_BLOCK``
is made of one unit per block, any other tensor is one unit; each unit goes to the
rank whose share holds the unit's midpoint. A rank's work is therefore a contiguous
stretch of the files (sequential reads), every rank is within one unit of its share,
and a tensor is split only where a cut crosses it, at block boundaries, so the Gram
block sums of :mod:`.streaming` add up to the single-process Gram bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..io import dtypes
from .gramsum import GRAM_BLOCK
from .trajectory import Job


@dataclass(frozen=True)
class Piece:
    """Elements ``[a, b)`` of ``job`` done by ``rank``; ``split`` when other ranks hold the rest."""

    job: Job
    a: int
    b: int
    rank: int
    split: bool

    @property
    def blocks(self) -> range:
        """Indices of the Gram blocks this piece covers (a split piece starts and ends on block edges)."""
        return range(self.a // GRAM_BLOCK, -(-self.b // GRAM_BLOCK))


@dataclass
class Plan:
    world: int
    pieces: list[Piece]  # job order, then element order
    cost: list[int]  # bytes moved per rank

    def of(self, rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.rank == rank]

    def split_jobs(self) -> list[Job]:
        """Fit jobs cut across ranks, in job order."""
        seen: dict[str, Job] = {}
        for p in self.pieces:
            if p.split:
                seen.setdefault(p.job.name, p.job)
        return list(seen.values())

    def digest(self, extra=None) -> str:
        doc = {"world": self.world, "extra": extra,
               "pieces": [[p.job.name, p.a, p.b, p.rank] for p in self.pieces]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _unit_cost(job: Job, T: int, K: int, tied_source: str | None) -> int:
    """Bytes moved per element of ``job``."""
    isz = dtypes.itemsize(job.dtype)
    if job.kind == "fit":
        return (T + 1 + K * (2 if job.name == tied_source else 1)) * isz
    if job.kind == "copy":
        return (1 + K) * isz
    return 0


def plan(jobs: list[Job], T: int, K: int, world: int, tied_source: str | None = None) -> Plan:
    """The byte-balanced plan of ``jobs`` (storage order) over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    units: list[tuple[Job, int, int, int]] = []
    for job in jobs:
        if job.kind == "tied":
            continue
        per = _unit_cost(job, T, K, tied_source)
        n = job.numel
        if job.kind == "fit" and n > GRAM_BLOCK:
            units += [(job, a, min(n, a + GRAM_BLOCK), per * (min(n, a + GRAM_BLOCK) - a))
                      for a in range(0, n, GRAM_BLOCK)]
        else:
            units.append((job, 0, n, per * n))
    total = sum(u[3] for u in units)
    cost = [0] * world
    owned: list[tuple[Job, int, int, int]] = []
    cum = 0
    for job, a, b, c in units:
        # the rank whose share [r, r+1) · total / world holds the unit's midpoint (integers: exact)
        r = min(world - 1, (2 * cum + c) * world // (2 * total)) if total else 0
        cum += c
        cost[r] += c
        if owned and owned[-1][0] is job and owned[-1][3] == r and owned[-1][2] == a:
            owned[-1] = (job, owned[-1][1], b, r)  # consecutive blocks of one rank: one piece
        else:
            owned.append((job, a, b, r))
    counts: dict[str, int] = {}
    for job, _, _, _ in owned:
        counts[job.name] = counts.get(job.name, 0) + 1
    pieces = [Piece(job, a, b, r, counts[job.name] > 1) for job, a, b, r in owned]
    return Plan(world, pieces, cost)
