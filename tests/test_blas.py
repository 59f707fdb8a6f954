"""numpy's BLAS on one thread around the engine's LAPACK eigen-solves (relex_kernels/ops/blas.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from relex_kernels import fit
from relex_kernels.ops import blas, native

counts = blas.thread_counts()
needs_openblas = pytest.mark.skipif(not counts, reason="numpy's BLAS is not OpenBLAS")


def current() -> list[int]:
    return [get() for _, get in counts]


@pytest.fixture
def three_threads():
    """Every OpenBLAS at 3 threads for the test (a count the one-thread limit must not leave)."""
    before = current()
    for setter, _ in counts:
        setter(3)
    yield
    for (setter, _), n in zip(counts, before):
        setter(n)


@needs_openblas
def test_one_thread_holds_the_count_and_puts_it_back(three_threads):
    with blas.one_thread():
        inside = current()
        with blas.one_thread():  # nested: the outer block still restores
            pass
        still = current()
    assert inside == still == [1] * len(counts)
    assert current() == [3] * len(counts)


@needs_openblas
def test_solves_on_several_threads_never_leave_the_count_at_one(three_threads):
    """The first solve to start saves the count and the last to end puts it back: without the depth,
    a thread that saved another's 1 restored 1 for good."""
    start = threading.Barrier(4)
    seen, errors = [], []

    def solve():
        try:
            start.wait()
            for _ in range(20):
                with blas.one_thread():
                    seen.append(current())
                    np.linalg.eigh(np.eye(64))
        except Exception as e:  # (reported below)
            errors.append(e)
    threads = [threading.Thread(target=solve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(c == [1] * len(counts) for c in seen)
    assert current() == [3] * len(counts)


def _grams(T: int, k: int = 3) -> np.ndarray:
    X = np.random.default_rng(T).standard_normal((k, T, 2 * T))
    return X @ X.swapaxes(-1, -2)


@needs_openblas
@pytest.mark.parametrize("case", ["lapack", "handed back"])
def test_the_lapack_solves_run_on_one_blas_thread(monkeypatch, three_threads, case):
    """Grams above the extension's solver, and any it hands back, go to numpy's eigh with OpenBLAS
    at one thread (the 3 set before would otherwise be seen); the same eigenpairs."""
    seen = []
    real = np.linalg.eigh

    def spy(a):
        seen.append(current())
        return real(a)

    if case == "lapack":
        Gs = _grams(native.eigh_max_t() + 16 if native.available()[0] else 64)
    else:
        if not native.available()[0]:
            pytest.skip("no native solver")
        Gs = _grams(16)
        solve = native.eigh_small

        def refuse_one(G):  # the native solver gives up on matrix 1 (not converged)
            w, V, ok = solve(G)
            ok[1] = False
            return w, V, ok
        monkeypatch.setattr(native, "eigh_small", refuse_one)
    monkeypatch.setattr(np.linalg, "eigh", spy)
    w, V = fit._eigh_stack(Gs)
    assert seen == [[1] * len(counts)]
    assert current() == [3] * len(counts)
    ref_w, _ = real(Gs)
    np.testing.assert_allclose(w, ref_w, rtol=1e-9, atol=1e-9 * float(np.abs(ref_w).max()))


def test_the_libraries_are_found_in_the_maps_whatever_their_paths():
    maps = "\n".join([
        "7f00-7f01 r-xp 00000000 fd:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f02-7f03 r-xp 00000000 fd:01 12 /home/u/My Envs/site-packages/numpy.libs/libscipy_openblas64_-ab.so",
        "7f04-7f05 r-xp 00000000 fd:01 13 /opt/old/libopenblas.so.0 (deleted)",
        "7f06-7f07 rw-p 00000000 00:00 0 ",
        "7f08-7f09 r--p 00000000 fd:01 14 /usr/lib/libopenblasp-r0.3.so",
        "7f0a-7f0b r-xp 00000000 00:00 0 [vdso]",
    ])
    assert blas.mapped_libraries(maps) == ["/home/u/My Envs/site-packages/numpy.libs/libscipy_openblas64_-ab.so",
                                           "/usr/lib/libopenblasp-r0.3.so"]


def test_without_openblas_the_solve_is_left_alone(monkeypatch):
    monkeypatch.setattr(blas, "thread_counts", lambda: ())
    with blas.one_thread():
        w, _ = np.linalg.eigh(np.eye(70) * 2.0)
    assert np.allclose(w, 2.0)


@needs_openblas
def test_a_large_lapack_stack_is_split_over_the_kernel_threads_with_the_bits_of_one_call(monkeypatch, three_threads):
    """Past the extension's solver, a stack of many Grams is solved in parts on the kernels'
    threads (each part one numpy call, its BLAS on one thread): the eigenpairs of one call,
    bit for bit; with one kernel thread, one call."""
    T = native.eigh_max_t() + 2 if native.available()[0] else 50
    Gs = _grams(T, k=4 * fit.LAPACK_GRAMS_PER_THREAD + 3)
    real = np.linalg.eigh
    with blas.one_thread():
        want_w, want_V = real(Gs)
    seen = []

    def spy(a):
        seen.append((threading.current_thread().name, len(a), current()))
        return real(a)

    monkeypatch.setattr(np.linalg, "eigh", spy)
    native.set_num_threads(2)
    try:
        w, V = fit._eigh_stack(Gs)
    finally:
        native.set_num_threads(None)
    assert w.tobytes() == want_w.tobytes() and V.tobytes() == want_V.tobytes()
    assert len(seen) == 2 and sum(n for _, n, _ in seen) == len(Gs)
    assert all(name.startswith("relex-eigh") for name, _, _ in seen)
    assert all(c == [1] * len(counts) for _, _, c in seen) and current() == [3] * len(counts)
    seen.clear()
    native.set_num_threads(1)
    try:
        w1, _ = fit._eigh_stack(Gs)
    finally:
        native.set_num_threads(None)
    assert [n for _, n, _ in seen] == [len(Gs)] and w1.tobytes() == want_w.tobytes()
