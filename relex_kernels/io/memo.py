"""Process-wide caches of what was parsed from input files, bounded and least recently used first.

The checkpoints of a run repeat their headers and indexes byte for byte: what one checkpoint's
bytes gave is kept for the next (:mod:`.reader`'s parsed headers, :mod:`.checkpoint`'s layouts).
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class BoundedCache:
    """Values by key, each built once (:meth:`get`) and kept while the total of their ``weight``
    stays within ``limit``; the least recently used leave first, the newest always stays. Safe
    from several threads: a value two threads built at once is kept once, the first one."""

    def __init__(self, limit: int, weight=lambda value: 1):
        self.limit, self.weight = limit, weight
        self.total = 0
        self._values: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build):
        """The value for ``key``, from ``build()`` the first time (an error is raised, not kept)."""
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
                return value
        value = build()  # (outside the lock: parsing takes milliseconds)
        with self._lock:
            if key in self._values:
                return self._values[key]
            self._values[key] = value
            self.total += self.weight(value)
            while self.total > self.limit and len(self._values) > 1:
                self.total -= self.weight(self._values.popitem(last=False)[1])
        return value

    def keys(self) -> list:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._values)

    def __len__(self) -> int:
        return len(self._values)
