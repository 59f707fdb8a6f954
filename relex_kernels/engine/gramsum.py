"""The one resumable Gram accumulator: the two-level sum every executor uses.

Within each ``GRAM_BLOCK`` of elements the kernels add their chunk partials in fp64
from zero, in chunk order (the op contract of :mod:`..ops.reference`); the block sums
are added to the total in block order. A tensor cut at block boundaries — into
memory-budget ranges, device groups, or pieces on several ranks — therefore sums to
the same bits, and a run resumed from a journalled partial sum continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: elements per Gram block (128 GRAM_CHUNKs): the unit of the two-level sum, the granularity
#: at which a tensor is split across ranks, and where the journal can record a partial Gram.
#: Part of the output's definition.
GRAM_BLOCK = 1 << 23


class GramSum:
    """The Gram of one tensor of ``numel`` elements, fed range by range in element order.

    ``zeros()`` makes a zeroed (T, T) fp64 accumulator — a numpy array on the host, a
    torch tensor on a device; ``acc`` resumes a partial sum that ends at element
    ``start`` (what :meth:`state` returned there).
    """

    def __init__(self, numel: int, zeros: Callable, start: int = 0, acc=None, name: str = ""):
        self.numel, self.zeros = numel, zeros
        self.total, self.blk = zeros(), None  # blk: the open block's sum
        if acc is not None:
            if start % GRAM_BLOCK == 0:
                self.total = acc
            elif start < GRAM_BLOCK:
                self.blk = acc  # the total before block 0 is zero
            else:
                raise ValueError(f"cannot resume the Gram of {name} inside block {start // GRAM_BLOCK}")

    def pieces(self, a: int, b: int):
        """Split ``[a, b)`` at block edges: yields ``(c0, c1, acc)``; the caller adds the Gram of
        elements ``[c0, c1)`` into ``acc`` before asking for the next piece."""
        c0 = a
        while c0 < b:
            c1 = min(b, (c0 // GRAM_BLOCK + 1) * GRAM_BLOCK)
            if self.blk is None:
                self.blk = self.zeros()
            yield c0, c1, self.blk
            if c1 % GRAM_BLOCK == 0 or c1 == self.numel:
                self.total += self.blk
                self.blk = None
            c0 = c1

    def resumable(self, b: int) -> bool:
        """Whether :meth:`state` alone is the whole state after element ``b`` (a block edge, or
        inside block 0), so a journal record taken there resumes to the same bits."""
        return self.blk is None or b < GRAM_BLOCK

    def state(self):
        return self.total if self.blk is None else self.blk

    def result(self):
        """The Gram (the ranges may end inside a block: a caller asking for part of a tensor)."""
        if self.blk is not None:
            self.total += self.blk
            self.blk = None
        return self.total


def sum_blocks(block_sums: Iterable, zeros: Callable):
    """The total of per-block sums, in block order: what :class:`GramSum` gives over the whole tensor."""
    total = zeros()
    for s in block_sums:
        total += s
    return total
