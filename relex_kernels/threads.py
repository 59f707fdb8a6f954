"""Worker threads that never take the process's asynchronous signals.

The kernel hands a signal sent to the process (Ctrl-C's SIGINT, a scheduler's SIGTERM) to any
of its threads that does not block it, and Python runs the handler on the main thread only: a
signal a worker thread happens to take is seen there late, after the main thread has finished
what it was doing (in 6 of 98 tries, the next tensor, recorded as done by the journal of a run
interrupted before it). Every thread the engine starts is therefore born with these signals
blocked, so that the kernel delivers them to the main thread, which stops at once.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

#: the signals a worker thread never takes (all but those a fault raises in the thread itself)
ASYNC_SIGNALS = signal.valid_signals() - {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                                          signal.SIGKILL, signal.SIGSTOP}


def start(target, args=(), name: str | None = None) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` with :data:`ASYNC_SIGNALS` blocked from its
    first instruction (the mask a thread is born with is its creator's)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    # Python runs a pending signal's handler as pthread_sigmask returns, after the mask changed:
    # the mask to restore is read first (a no-op), so that a Ctrl-C raised there leaves it restored
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def block_async_signals() -> None:
    """Block :data:`ASYNC_SIGNALS` in the calling thread (a thread pool's ``initializer``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads named ``name-N``, each born blocking :data:`ASYNC_SIGNALS`."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=block_async_signals)
