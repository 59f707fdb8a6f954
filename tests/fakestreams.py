"""Asynchronous stand-ins for CUDA streams and events, on the CPU.

The device pipeline (engine/gpu.py) overlaps host→device copies, kernels and device→host
copies on three CUDA streams and hands pinned buffers between threads guarded by events.
On the CPU its stand-ins run every copy at once, so a missing ``wait_event`` or an event
recorded in the wrong place would pass every CPU test and corrupt data on a GPU. These
stand-ins make the copy streams really asynchronous: each runs its operations in order on a
worker thread, after a random delay, and an event is complete only when the stream reaches
the point where it was recorded — CUDA's semantics:

* ``stream.submit(fn)``: ``fn`` runs later, after everything submitted before it;
* ``event.record(stream)``: the event completes when ``stream`` gets there; an event never
  recorded is complete (``cudaEventSynchronize`` on a fresh event returns at once);
* ``stream.wait_event(ev)``: later work on ``stream`` waits for ``ev`` (the caller does not);
* the compute stand-in (:class:`EngineThreadStream`) runs its work on the engine's thread at
  once, as the pipeline issues kernels there, so its ``wait_event`` blocks that thread.

What this cannot check: with kernels done when issued, an event recorded on the compute stream
is complete at once, so a missing wait *for the compute stream* — the H2D copy into a stage slot
a kernel still reads (``h2d.wait_event(slot_free)``), the D2H copy of an output slot before its
kernel finished (``d2h.wait_event(done)``) — never shows here. Those need a real device (or an
asynchronous compute stand-in running the kernels and the Gram sums on a worker thread).
"""

from __future__ import annotations

import queue
import random
import threading
import time


class FakeEvent:
    def __init__(self):
        self._done = threading.Event()
        self._done.set()  # never recorded: complete

    def record(self, stream) -> None:
        self._done.clear()
        stream.submit(self._done.set)

    def synchronize(self) -> None:
        if not self._done.wait(timeout=60):
            raise TimeoutError("a fake event was never reached by its stream (deadlock)")

    def query(self) -> bool:
        return self._done.is_set()


class AsyncStream:
    """A stream whose operations run in order on a worker thread, each after a random delay."""

    def __init__(self, name: str, seed: int, min_delay: float, max_delay: float):
        self.name, self.min_delay, self.max_delay = name, min_delay, max_delay
        self.rng = random.Random(seed)
        self.q: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.ops = 0
        self.thread = threading.Thread(target=self._work, name=f"fake-{name}", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            fn = self.q.get()
            if fn is None:
                return
            time.sleep(self.rng.uniform(self.min_delay, self.max_delay))
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test, the stream goes on
                self.errors.append(e)
            self.ops += 1

    def submit(self, fn) -> None:
        self.q.put(fn)

    def wait_event(self, ev) -> None:
        self.submit(ev.synchronize)

    def event(self) -> FakeEvent:
        return FakeEvent()

    def synchronize(self) -> None:
        ev = FakeEvent()
        ev.record(self)
        ev.synchronize()

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=60)


class EngineThreadStream:
    """The compute stream: kernels run on the engine's thread as they are issued."""

    def submit(self, fn) -> None:
        fn()

    def wait_event(self, ev) -> None:
        ev.synchronize()

    def event(self) -> FakeEvent:
        return FakeEvent()

    def synchronize(self) -> None:
        pass
