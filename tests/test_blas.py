"""numpy's BLAS on one thread around the engine's LAPACK eigen-solves (relex_kernels/ops/blas.py)."""

from __future__ import annotations

import numpy as np
import pytest

from relex_kernels import fit
from relex_kernels.ops import blas, native

setter = blas.thread_local_setter()
needs_openblas = pytest.mark.skipif(setter is None, reason="numpy's BLAS is not an OpenBLAS with a thread-local count")


def current() -> int:
    """This thread's OpenBLAS thread count (set and put back)."""
    n = setter(1)
    setter(n)
    return n


@needs_openblas
def test_one_thread_holds_the_calling_thread_and_puts_its_count_back():
    before = setter(3)
    try:
        with blas.one_thread():
            inside = current()
        after = current()
    finally:
        setter(before)
    assert (inside, after) == (1, 3)


def _grams(T: int, k: int = 3) -> np.ndarray:
    X = np.random.default_rng(T).standard_normal((k, T, 2 * T))
    return X @ X.swapaxes(-1, -2)


@needs_openblas
@pytest.mark.parametrize("case", ["lapack", "handed back"])
def test_the_lapack_solves_run_on_one_blas_thread(monkeypatch, case):
    """Grams above the extension's solver, and any it hands back, go to numpy's eigh with this
    thread's BLAS count at 1 (the count of 3 set before would otherwise be seen); same eigenpairs."""
    counts = []
    real = np.linalg.eigh

    def spy(a):
        counts.append(current())
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
    before = setter(3)
    try:
        w, V = fit._eigh_stack(Gs)
    finally:
        setter(before)
    assert counts == [1]
    ref_w, _ = real(Gs)
    np.testing.assert_allclose(w, ref_w, rtol=1e-9, atol=1e-9 * float(np.abs(ref_w).max()))


def test_without_openblas_the_solve_is_left_alone(monkeypatch):
    monkeypatch.setattr(blas, "thread_local_setter", lambda: None)
    with blas.one_thread():
        w, _ = np.linalg.eigh(np.eye(70) * 2.0)
    assert np.allclose(w, 2.0)
