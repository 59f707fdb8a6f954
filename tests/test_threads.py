"""The engine's worker threads never take Ctrl-C or SIGTERM (relex_kernels/threads.py): the kernel
then hands those to the main thread, which alone runs Python's handlers and stops at once."""

from __future__ import annotations

import queue
import signal

from relex_kernels import threads

WANTED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}


def _mask() -> set:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, ()))


def test_started_threads_block_the_async_signals_and_the_caller_keeps_its_mask():
    before = _mask()
    seen = queue.SimpleQueue()
    t = threads.start(lambda: seen.put(_mask()), name="probe")
    t.join(10)
    inside = seen.get(timeout=10)
    assert WANTED <= inside, inside
    assert not {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE} & inside  # (faults stay the thread's own)
    assert t.daemon and t.name == "probe"
    assert _mask() == before


def test_pool_threads_block_the_async_signals():
    with threads.pool(2, "relex-test") as pool:
        masks = list(pool.map(lambda _: _mask(), range(4)))
    assert all(WANTED <= m for m in masks), masks


def test_the_read_ahead_thread_blocks_the_async_signals():
    """The host streamer's read-ahead thread, as :meth:`Streamer.read_ahead` starts it, runs its
    prefetches with the signals blocked."""
    from relex_kernels.engine import streaming

    class Host:  # the attributes read_ahead keeps on its streamer
        _ahead_q = None
    host, seen = Host(), queue.SimpleQueue()
    streaming.Streamer.read_ahead(host, lambda: seen.put(_mask()))
    try:
        assert WANTED <= seen.get(timeout=10)
    finally:
        host._ahead_end()


def test_no_engine_module_starts_a_bare_thread():
    """Every thread the engine starts goes through :func:`threads.start` (or a pool with its
    initializer): a bare ``threading.Thread`` would be born taking Ctrl-C."""
    import inspect

    from relex_kernels import fit
    from relex_kernels.analysis import figures
    from relex_kernels.engine import gpu, streaming
    from relex_kernels.io import direct
    from relex_kernels.synth import generate
    for mod in (streaming, direct, gpu, figures, generate, fit):
        src = inspect.getsource(mod)
        assert "threading.Thread(" not in src, mod.__name__
        assert src.count("ThreadPoolExecutor(") == src.count("initializer="), mod.__name__
