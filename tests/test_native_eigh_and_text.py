"""The native host helpers beside the kernels, against references that do not share their code:

* ``eigh_small`` (csrc/cpu/eigh.cpp), the T x T eigen-solve of a group of Grams, against
  numpy's LAPACK ``eigh``: eigenvalues, eigenvectors (up to sign), orthonormality and
  reconstruction, on Grams shaped like a run's and on the hard cases (repeated eigenvalues,
  zero, extreme scales); its bits independent of the threads and of the place in the stack;
* ``fit._eigh_stack`` hands what the native solver did not solve to numpy;
* ``float_rows_text`` (csrc/cpu/float_text.cpp) against ``json.dumps`` over random bit
  patterns, and the report's entry lines against json's text.

Skipped when the extension is not built, except under CI (``CI`` or
``RELEX_REQUIRE_NATIVE`` set), where a missing extension is a failure.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from native_required import native_or_skip_module

from relex_kernels import fit

native = native_or_skip_module()

from relex_kernels.engine import report  # noqa: E402

MAX_T = native.eigh_max_t()


def run_like_grams(k: int, T: int, seed: int = 0) -> np.ndarray:
    """Grams of deltas as a run makes them: a dominant straight drift, a few weaker
    directions and noise, over a few hundred elements, computed in float32 like the kernels."""
    rng = np.random.default_rng(seed)
    m = 300
    t = np.arange(1, T + 1, dtype=np.float64)
    out = np.empty((k, T, T))
    for b in range(k):
        d = (t[:, None] * rng.standard_normal(m)[None, :]
             + rng.uniform(0.05, 0.5) * np.sqrt(t)[:, None] * rng.standard_normal((1, m))
             + rng.uniform(1e-3, 0.3) * rng.standard_normal((T, m))).astype(np.float32)
        out[b] = (d @ d.T).astype(np.float64) * 10.0 ** rng.integers(-12, 3)
    return out


def hard_cases(T: int) -> list[np.ndarray]:
    rng = np.random.default_rng(T)
    q, _ = np.linalg.qr(rng.standard_normal((T, T)))
    cases = [np.zeros((T, T)), np.eye(T), np.diag(np.arange(T, dtype=np.float64)[::-1]),
             np.ones((T, T)),                                  # rank 1, T-1 zero eigenvalues
             q @ np.diag(np.r_[5.0, np.full(T - 1, 2.0)]) @ q.T,  # a repeated eigenvalue
             1e-200 * np.ones((T, T)) + 1e-201 * np.eye(T),       # squares below float64's range
             1e160 * (np.ones((T, T)) + np.eye(T))]               # squares past it
    sym = rng.standard_normal((T, T))
    graded = q @ np.diag(np.logspace(-300, 300, T)) @ q.T
    arrow = np.eye(T) * 1e-300
    arrow[0, :] = arrow[:, 0] = 1.0
    arrow[0, 0] = 1e300
    cases += [1e200 * (sym + sym.T), 1e-200 * (sym + sym.T),  # indefinite, at fp64 Grams' extremes
              1e300 * (q @ np.diag(np.linspace(0.1, 1.0, T)) @ q.T), graded, arrow]
    return [0.5 * (c + c.T) for c in cases]


def check_eigh(G: np.ndarray, w: np.ndarray, V: np.ndarray) -> None:
    T = G.shape[-1]
    eps = np.finfo(np.float64).eps
    # compared at unit scale (the products below would overflow or underflow at 1e+-300)
    scale = 2.0 ** np.frexp(max(np.abs(G).max(), np.finfo(np.float64).tiny))[1]
    Gs, ws = G / scale, w / scale
    want = np.linalg.eigvalsh(Gs)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(V))
    assert np.all(np.diff(w) >= 0), "eigenvalues not ascending"
    assert np.abs(ws - want).max() <= 64 * T * eps
    assert np.abs(V.T @ V - np.eye(T)).max() <= 64 * T * eps
    assert np.abs(V @ np.diag(ws) @ V.T - Gs).max() <= 64 * T * eps


@pytest.mark.parametrize("T", sorted({1, 2, 3, 8, 16, 17, 32, MAX_T}))
def test_eigh_small_matches_numpy_on_run_like_grams(T):
    Gs = run_like_grams(40, T, seed=T)
    w, V, ok = native.eigh_small(Gs)
    assert ok.all()
    lw, lV = np.linalg.eigh(Gs)
    for b in range(len(Gs)):
        check_eigh(Gs[b], w[b], V[b])
        # the top direction, the one RELEX uses, agrees with LAPACK's up to its sign
        gap = (lw[b, -1] - lw[b, -2]) / lw[b, -1] if T > 1 else 1.0
        if gap > 1e-3:
            assert abs(abs(float(V[b, :, -1] @ lV[b, :, -1])) - 1) < 1e-12


@pytest.mark.parametrize("T", [1, 2, 5, 16, MAX_T])
def test_eigh_small_hard_cases(T):
    cases = np.stack(hard_cases(T))
    w, V, ok = native.eigh_small(cases)
    assert ok.all()
    for G, wb, Vb in zip(cases, w, V):
        check_eigh(G, wb, Vb)


def test_eigh_small_bits_do_not_depend_on_threads_or_place_in_the_stack():
    Gs = run_like_grams(300, 16, seed=1)
    native.set_num_threads(1)
    try:
        w1, V1, _ = native.eigh_small(Gs)
        native.set_num_threads(2)
        w2, V2, _ = native.eigh_small(Gs)
        w3, V3, _ = native.eigh_small(Gs[::-1].copy())
        w4, V4, _ = native.eigh_small(Gs[7:8])
    finally:
        native.set_num_threads(None)
    assert w1.tobytes() == w2.tobytes() and V1.tobytes() == V2.tobytes()
    assert w1[::-1].tobytes() == w3.tobytes() and V1[::-1].tobytes() == V3.tobytes()
    assert w1[7:8].tobytes() == w4.tobytes() and V1[7:8].tobytes() == V4.tobytes()


def test_eigh_small_flags_what_it_does_not_solve_and_checks_its_arguments():
    Gs = run_like_grams(4, 6)
    Gs[1, 2, 3] = Gs[1, 3, 2] = np.nan
    Gs[2, 0, 0] = np.inf
    _, _, ok = native.eigh_small(Gs)
    assert ok.tolist() == [True, False, False, True]
    for bad in (np.zeros((2, 3, 4)), np.zeros((3, 3)), np.zeros((1, MAX_T + 1, MAX_T + 1)), np.zeros((1, 0, 0))):
        with pytest.raises(ValueError, match="eigh_small needs"):
            native.eigh_small(bad)
    w, V, ok = native.eigh_small(np.zeros((0, 4, 4)))
    assert w.shape == (0, 4) and V.shape == (0, 4, 4) and ok.shape == (0,)


def test_fit_solves_with_the_native_solver_and_hands_the_rest_to_numpy(monkeypatch):
    assert fit.eigen_solver(16) == "native" and fit.eigen_solver(MAX_T + 1) == "lapack"
    Gs = run_like_grams(6, 16, seed=3)
    w, V = fit._eigh_stack(Gs)
    nw, nV, _ = native.eigh_small(Gs)
    assert w.tobytes() == nw.tobytes() and V.tobytes() == nV.tobytes()
    # a matrix the native solver gives up on gets numpy's answer, the others stay native
    real = native.eigh_small

    def gives_up_on_2(G):
        w, V, ok = real(G)
        ok = ok.copy()
        ok[2] = False
        w[2], V[2] = np.nan, np.nan
        return w, V, ok
    monkeypatch.setattr(native, "eigh_small", gives_up_on_2)
    w2, V2 = fit._eigh_stack(Gs)
    lw, lV = np.linalg.eigh(Gs[2:3])
    assert w2[2].tobytes() == lw[0].tobytes() and V2[2].tobytes() == lV[0].tobytes()
    assert np.delete(w2, 2, 0).tobytes() == np.delete(nw, 2, 0).tobytes()
    # past the native solver's size: numpy's LAPACK, as before
    big = run_like_grams(2, MAX_T + 1)
    bw, bV = fit._eigh_stack(big)
    lw, lV = np.linalg.eigh(big)
    assert bw.tobytes() == lw.tobytes() and bV.tobytes() == lV.tobytes()


def _edge_floats() -> np.ndarray:
    f = np.finfo(np.float64)
    return np.array([0.0, -0.0, 1.0, -1.5, 0.1, 1 / 3, 100.0, 1e15, 9.999999999999998e15, 1e16, 1.5e16, 1e-4,
                     9.99e-5, 1e-5, 123456789012345680.0, f.max, -f.max, f.tiny, f.smallest_subnormal, 2.0 ** -1074 * 3,
                     np.nan, np.inf, -np.inf, 1e22, 1e23, 5e-324, 0.30000000000000004])


def test_float_text_is_json_dumps_text():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 64, size=200_000, dtype=np.uint64).view(np.float64)
    usual = np.concatenate([rng.random(50_000), rng.random(50_000) * 10.0 ** rng.integers(-30, 30, 50_000)])
    vals = np.concatenate([bits, usual, _edge_floats()])
    got = native.float_rows_text(vals.reshape(-1, 1))
    want = [json.dumps(x) for x in vals.tolist()]
    bad = [(w, g) for w, g in zip(want, got) if w != g]
    assert not bad, bad[:5]
    rows = rng.standard_normal((7, 5))
    assert native.float_rows_text(rows) == [", ".join(map(json.dumps, r)) for r in rows.tolist()]
    assert native.float_rows_text(np.zeros((3, 0))) == ["", "", ""]
    with pytest.raises(ValueError, match="2-D"):
        native.float_rows_text(np.zeros(3))


def test_report_entry_lines_are_json_dumps_lines(monkeypatch):
    class Job:
        def __init__(self, name, shape):
            self.name, self.dtype, self.shape = name, "BF16", shape
    rng = np.random.default_rng(1)
    Gs = run_like_grams(50, 8)
    comps = fit.components_many(Gs, 2, [300] * 50, ["BF16"] * 50)
    jobs = [Job(f"model.layers.{i}.mlp.experts.{i}.w\u00e9\"", (64, i + 1)) for i in range(50)]
    entries = report.tensor_entries(jobs, comps)
    entries[3]["singular_values"][1] = float(rng.random() * 1e-300)
    entries[4]["explained_variance"] = 1e16
    lines = report.entry_lines(entries)
    assert lines == [json.dumps(e) for e in entries]
    # any other form goes to json: the caller's fallback
    monkeypatch.setattr(native, "float_text_available", lambda: False)  # (a build without std::to_chars)
    assert report.entry_lines(entries) is None
    monkeypatch.undo()
    for mutate in (lambda e: e.__setitem__("components", True), lambda e: e["singular_values"].__setitem__(0, 1),
                   lambda e: e.__setitem__("extra", 1), lambda e: e["singular_values"].pop(),
                   lambda e: e["shape"].__setitem__(0, 2.0)):
        other = json.loads(json.dumps(entries))
        mutate(other[5])
        assert report.entry_lines(other) is None
