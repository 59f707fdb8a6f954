"""Issue 13: the kernel identity (resume key, report, SPMD agreement), unchanged tensors in the
summary, F64 in fp64 and FP8 refused, and the drop rule of small singular values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from trajgen import make_trajectory

from relex_kernels.engine import extrapolate, journal
from relex_kernels.fit import FitOptions
from relex_kernels.ops import get_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def native_or_skip():
    native = pytest.importorskip("relex_kernels.ops.native")
    if not native.available()[0]:
        pytest.skip("native kernels not built")
    return native


def lower_simd(native) -> str:
    """A SIMD path below the best one here (its Gram partials differ in the last bits)."""
    from relex_kernels import _C
    levels = ["scalar", "avx2", "avx512"]
    best = levels.index(_C.best_simd_level())
    if best == 0:
        pytest.skip("only the portable SIMD path runs here")
    return levels[best - 1]


def files_of(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


# -- 4: the kernel identity ------------------------------------------------------------------
def test_every_backend_names_its_kernel():
    assert get_backend("reference").identity.startswith("reference/")
    native = native_or_skip()
    prev = native.set_simd(lower_simd(native))
    try:
        assert get_backend("cpu").identity == f"cpu/{lower_simd(native)}"
    finally:
        native.set_simd(prev)


def test_resume_under_another_simd_path_starts_afresh(tmp, monkeypatch):
    """A run killed on one SIMD path and resumed on another equals an uninterrupted run on the second."""
    native = native_or_skip()
    other = lower_simd(native)
    monkeypatch.setenv("RELEX_JOURNAL_SYNC_SECONDS", "0")
    base, ck = make_trajectory(tmp, {"a": (300, 301), "b": (200, 333)}, range(1, 6), dtype="F32")
    out = os.path.join(tmp, "out")

    def interrupt(point):  # the run stops after its first finished tensor (kept for a resume)
        if point == "done":
            raise KeyboardInterrupt

    monkeypatch.setattr(journal, "hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        extrapolate(base, ck, [20], out, backend="cpu")
    monkeypatch.undo()
    prev = native.set_simd(other)
    try:
        fit_a, fit_b = os.path.join(tmp, "a.fit"), os.path.join(tmp, "b.fit")
        resumed = extrapolate(base, ck, [20], out, backend="cpu", save_fit=fit_a)
        whole = extrapolate(base, ck, [20], os.path.join(tmp, "whole"), backend="cpu", save_fit=fit_b)
    finally:
        native.set_simd(prev)
    assert resumed.report["resumed_tensors"] == 0
    assert resumed.report["kernel"] == whole.report["kernel"] == f"cpu/{other}"
    assert [t["singular_values"] for t in resumed.report["tensors"]] == \
        [t["singular_values"] for t in whole.report["tensors"]]
    assert open(fit_a, "rb").read() == open(fit_b, "rb").read()
    assert files_of(resumed.outputs[0]) == files_of(whole.outputs[0])
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    assert rep["kernel"] == f"cpu/{other}"


def test_resume_with_another_eigen_solver_starts_afresh(tmp, monkeypatch):
    """The report names the T x T solver; a run killed with the extension's solver and resumed with
    numpy's (an install without the extension) equals an uninterrupted run with numpy's."""
    from relex_kernels import fit
    from relex_kernels.ops import native as native_ops
    native_or_skip()
    monkeypatch.setenv("RELEX_JOURNAL_SYNC_SECONDS", "0")
    base, ck = make_trajectory(tmp, {"a": (300, 301), "b": (200, 333)}, range(1, 6), dtype="F32")
    out = os.path.join(tmp, "out")
    assert fit.eigen_solver(5) == "native"

    def interrupt(point):
        if point == "done":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(journal, "hook", interrupt)
        with pytest.raises(KeyboardInterrupt):
            extrapolate(base, ck, [20], out, backend="cpu")
    monkeypatch.setattr(native_ops, "eigh_max_t", lambda: 0)
    assert fit.eigen_solver(5) == "lapack"
    resumed = extrapolate(base, ck, [20], out, backend="cpu")
    whole = extrapolate(base, ck, [20], os.path.join(tmp, "whole"), backend="cpu")
    assert resumed.report["resumed_tensors"] == 0
    assert resumed.report["eigen_solver"] == whole.report["eigen_solver"] == "lapack"
    assert files_of(resumed.outputs[0]) == files_of(whole.outputs[0])
    monkeypatch.undo()
    fit_path = os.path.join(tmp, "run.fit")
    native_run = extrapolate(base, ck, [20], os.path.join(tmp, "native"), backend="cpu", save_fit=fit_path)
    assert native_run.report["eigen_solver"] == "native"
    assert native_run.report["run_key"] != whole.report["run_key"]
    # a saved fit solves nothing: its predictions (and their resume) do not depend on the solver
    from relex_kernels.engine import predict
    monkeypatch.setattr(native_ops, "eigh_max_t", lambda: 0)
    without = predict(fit_path, [20], os.path.join(tmp, "p1"), backend="cpu")
    monkeypatch.undo()
    with_ext = predict(fit_path, [20], os.path.join(tmp, "p2"), backend="cpu")
    assert without.report["eigen_solver"] == with_ext.report["eigen_solver"] == "saved fit"
    assert without.report["run_key"] == with_ext.report["run_key"]


def test_spmd_ranks_on_different_kernels_refuse(tmp):
    """Two ranks whose Gram kernels differ stop before any work, naming each rank's kernel."""
    import socket
    native = native_or_skip()
    other = lower_simd(native)
    from relex_kernels import _C
    base, ck = make_trajectory(tmp, {"w": (64, 64)}, range(1, 4))
    out = os.path.join(tmp, "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for r, simd in enumerate([_C.best_simd_level(), other]):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELEX_", "SLURM_"))}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RELEX_SIMD=simd,
                   RELEX_DIST_TIMEOUT="60")
        args = ["extrapolate", "--base", base, "--checkpoints", os.path.join(tmp, "run"), "--target-step", "9",
                "--out", out, "--backend", "cpu", "-q"]
        procs.append(subprocess.Popen([sys.executable, "-m", "relex_kernels", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    res = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for rc, err in res:
        assert rc == 2 and "Traceback" not in err, err
        assert f"rank 0: cpu/{_C.best_simd_level()}" in err and f"rank 1: cpu/{other}" in err, err
    assert not os.path.exists(out) or os.listdir(out) == []


def test_kernel_disagreement_message_names_every_rank():
    from relex_kernels.engine.distributed import kernel_mismatch
    assert kernel_mismatch(["cpu/avx2"] * 3) is None
    msg = kernel_mismatch(["cpu/avx512", "cpu/avx2", "cpu/avx512"])
    assert "ranks 0, 2: cpu/avx512" in msg and "rank 1: cpu/avx2" in msg


# -- 6: tensors that did not move ----------------------------------------------------------------
def write_run(root, tensors, steps):
    """base + run/step_S from {name: (dtype, [T+1 raw or fp32 arrays])}; returns (base, {step: dir})."""
    from relex_kernels.io import dtypes, write_checkpoint

    def ck(i):
        return {n: (dt, x[i] if x[i].dtype == dtypes.raw_numpy(dt) else dtypes.from_float32(x[i], dt))
                for n, (dt, x) in tensors.items()}

    dirs = {}
    for i, s in enumerate([0] + list(steps)):
        d = os.path.join(root, "base" if i == 0 else os.path.join("run", f"step_{s}"))
        os.makedirs(d)
        write_checkpoint(d, ck(i))
        dirs[s] = d
    return dirs.pop(0), dirs


def test_unchanged_tensors_are_reported_apart(tmp):
    from relex_kernels.engine.report import format_summary
    rng = np.random.default_rng(3)
    steps = [1, 2, 3, 4]
    th0, v = rng.normal(0, 1, 256).astype(np.float32), rng.normal(0, 1, 256).astype(np.float32)
    moving = [th0 + np.float32(0.01 * s) * v + np.float32(1e-3) * rng.normal(0, 1, 256).astype(np.float32)
              for s in [0] + steps]
    norm = np.ones(64, np.float32)
    tensors = {"w": ("BF16", moving), "u": ("F32", moving), "norm1": ("BF16", [norm] * 5),
               "norm2": ("F32", [norm * 2] * 5)}
    base, ck = write_run(tmp, tensors, steps)
    res = extrapolate(base, ck, [10], os.path.join(tmp, "out"), FitOptions())
    for key in ("summary", "summary_rank1"):
        s = res.report[key]
        assert s["tensors"] == 2 and s["unchanged"] == 2, s
        assert s["min"] > 0.9 and s["count_ge_0.90"] == 2, s
    text = format_summary(res.report["summary"], 1)
    assert "over 2 tensors" in text and ">= 0.90: 2/2" in text and "2 tensors did not move" in text, text
    assert "min 0.0000" not in text


# -- 7: F64 in fp64; FP8 refused -------------------------------------------------------------------
def f64_backends():
    names = ["reference"]
    try:
        names += ["cpu"] if get_backend("cpu") else []
    except Exception:
        pass
    return names + ["device-double"]


@pytest.fixture(params=f64_backends())
def f64_backend(request, monkeypatch):
    """Backend names; ``device-double``: the device pipeline on CPU (tests/devicedouble.py's reference kernels)."""
    if request.param != "device-double":
        return request.param
    pytest.importorskip("torch")
    import devicedouble
    devicedouble.install(monkeypatch.setattr)
    return "triton"


def test_f64_is_computed_in_fp64_and_an_unmoved_one_is_copied(tmp, f64_backend):
    rng = np.random.default_rng(5)
    steps = [1, 2, 3, 4]
    th0 = rng.normal(0, 1, 3000)  # not representable in fp32
    v, v2 = rng.normal(0, 1e-3, 3000), rng.normal(0, 1e-5, 3000)
    hist = [th0 + s * v + s * s * v2 for s in steps]
    still = rng.normal(0, 1, 500)
    tensors = {"x": ("F64", [th0] + hist), "still": ("F64", [still] * 5),
               "bf": ("BF16", [th0.astype(np.float32)] + [h.astype(np.float32) for h in hist])}
    base, ck = write_run(tmp, tensors, steps)
    res = extrapolate(base, ck, [8], os.path.join(tmp, "out"), backend=f64_backend)
    from relex_kernels.io import Checkpoint
    out = Checkpoint(res.outputs[0])
    got = {n: np.array(out.tensors[n].file.view(n)) for n in ("x", "still")}
    out.close()
    assert got["still"].tobytes() == still.tobytes()
    # the explicit rank-1 RELEX in fp64
    M = np.stack(hist) - th0
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    c = U[:, 0] * S[0]
    want = th0 + np.polyval(np.polyfit(steps, c, 1), 8) * Vh[0]
    assert np.abs(got["x"] - want).max() <= 1e-12 * np.abs(want).max()


def test_fp8_checkpoints_are_refused(tmp):
    from relex_kernels.io import dtypes
    rng = np.random.default_rng(6)
    w = [rng.normal(0, 1, 64).astype(np.float32) for _ in range(4)]
    q = [rng.integers(0, 255, 64).astype(np.uint8) for _ in range(4)]
    scale = [np.full(4, 0.5 + i, np.float32) for i in range(4)]
    tensors = {"w": ("BF16", w), "q_proj.weight": ("F8_E4M3", q), "k_proj.weight": ("F8_E5M2", q),
               "q_proj.weight_scale": ("F32", scale)}
    base, ck = write_run(tmp, tensors, [1, 2, 3])
    out = os.path.join(tmp, "out")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoints",
                        os.path.join(tmp, "run"), "--target-step", "9", "--out", out], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "FP8" in err and "q_proj.weight (F8_E4M3)" in err and "k_proj.weight (F8_E5M2)" in err, err
    assert not os.path.exists(out)
    assert dtypes.known("F8_E4M3")


# -- 8: components within the Gram's rounding error are dropped -----------------------------------
def cpu_backends():
    try:
        return ["reference"] + (["cpu"] if get_backend("cpu").name == "cpu" else [])
    except Exception:
        return ["reference"]


def rank1_run(tmp, dtype, n=300_000):
    """θ_s = s·v exactly in ``dtype`` (v on a coarse grid): an exactly rank-1 trajectory."""
    rng = np.random.default_rng(8)
    steps = [1, 2, 3, 4, 5]
    if dtype == "BF16":  # |round(4x)| <= ~20: 5 bits, times s <= 5: 8 bits, exact in bf16
        v = (np.round(rng.normal(0, 1, n) * 4) / 2**10).astype(np.float32)
    else:  # 2^-27 grid, |v| < 2^-3: 24 bits with s <= 5... kept below 2^-5 to stay exact
        v = (np.round(np.clip(rng.normal(0, 4e-3, n), -2**-5, 2**-5) * 2**27) / 2**27).astype(np.float32)
    rows = [np.zeros(n, np.float32)] + [np.float32(s) * v for s in steps]
    return write_run(tmp, {"v": (dtype, rows)}, steps)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_exactly_rank1_trajectory_keeps_one_component(tmp, backend, dtype):
    from relex_kernels.io import Checkpoint, dtypes
    base, ck = rank1_run(tmp, dtype)
    c = Checkpoint(ck[5])
    v5 = dtypes.to_float32(np.array(c.tensors["v"].file.view("v")), dtype)
    c.close()
    for rank in (2, 3):
        res = extrapolate(base, ck, [10], os.path.join(tmp, f"o{rank}"), FitOptions(rank=rank), backend=backend)
        t = res.report["tensors"][0]
        assert t["components"] == 1, t["singular_values"]
        assert t["explained_variance"] == pytest.approx(1.0, abs=1e-6)
        c = Checkpoint(res.outputs[0])
        got = dtypes.to_float32(np.array(c.tensors["v"].file.view("v")), dtype)
        c.close()
        want = dtypes.to_float32(dtypes.from_float32(2 * v5, dtype), dtype)
        assert np.abs(got - want).max() <= 2 * np.abs(np.spacing(want)).max()


@pytest.mark.parametrize("backend", cpu_backends())
def test_small_real_second_component_is_kept(tmp, backend):
    """s₂/s₁ ~ 5e-2: small, but far above the Gram's rounding error."""
    from relex_kernels.fit import noise_floor
    rng = np.random.default_rng(9)
    n, steps = 300_000, [1, 2, 3, 4, 5]
    v, w = rng.normal(0, 1e-2, n), rng.normal(0, 1e-2, n)
    th0 = rng.normal(0, 0.5, n)
    rows = [th0] + [th0 + s * v + 0.1 * (s - 3) ** 2 * w for s in steps]
    base, ck = write_run(tmp, {"x": ("F32", [r.astype(np.float32) for r in rows])}, steps)
    res = extrapolate(base, ck, [10], os.path.join(tmp, "o"), FitOptions(rank=2), backend=backend)
    t = res.report["tensors"][0]
    sv = np.array(t["singular_values"])
    assert 0.01 < sv[1] / sv[0] < 0.1
    assert sv[1] ** 2 > 50 * noise_floor(float((sv ** 2).sum()), n, "F32")  # well above the bound
    assert t["components"] == 2


def test_drop_rule_is_the_noise_floor():
    from relex_kernels.fit import components, noise_floor
    q = np.linalg.qr(np.random.default_rng(10).normal(size=(4, 4)))[0]
    for n, dtype in [(7, "BF16"), (10**6, "F32"), (10**6, "F64")]:
        floor = noise_floor(1.0 + 1e-6, n, dtype)  # trace ≈ 1
        for factor, keep in [(0.5, 1), (2.0, 2)]:
            lam2 = factor * floor
            G = (1.0 - lam2) * np.outer(q[0], q[0]) + lam2 * np.outer(q[1], q[1])
            assert components(G, 3, n, dtype).u.shape[1] == keep, (n, dtype, factor)
    assert noise_floor(1.0, 10**6, "F32") == 256 * 2.0**-24  # full chunks: sqrt(65536)·u
    assert components(np.zeros((3, 3)), 2).u.shape[1] == 0


def test_stack_solve_is_each_tensor_alone_bit_for_bit():
    """components_many (one solve for the stack, on every kernel thread; elementwise noise floors)
    gives every tensor of a large stack the bits components() gives it alone — what a MoE group
    writes must not depend on its neighbours. Components at the noise floor's edge (half and
    twice it), mixed sizes and dtypes (None: full chunks) make the keep rule count."""
    from relex_kernels import fit
    rng = np.random.default_rng(3)
    k, T = 293, 6
    dts = ["BF16", "F32", "F64", None]
    ns = [None if i % 5 == 0 else int(rng.integers(1, 10**6)) for i in range(k)]
    types = [dts[i % 4] for i in range(k)]
    Gs = np.empty((k, T, T))
    for i in range(k):
        q = np.linalg.qr(rng.normal(size=(T, T)))[0]
        floor = fit.noise_floor(1.0, ns[i], types[i])
        lam = np.array([1.0, (0.5, 2.0, 1e-3)[i % 3] * floor, 0.3 * floor, 0, 0, 0])
        Gs[i] = (q * lam) @ q.T + rng.normal(size=(T, T)) * 1e-18
    many = fit.components_many(Gs, 3, ns, types)
    for i, c in enumerate(many):
        one = fit.components(Gs[i], 3, ns[i], types[i])
        assert c.u.shape[1] == (2 if i % 3 == 1 else 1), i  # only the component at twice the floor stays
        for a, b in [(c.u, one.u), (c.s, one.s), (c.singular_values, one.singular_values)]:
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), i
        assert c.explained_variance == one.explained_variance


def test_a_stack_with_and_without_repeated_eigenvalues_is_ordered_like_an_explicit_sort():
    """components_many reverses the solver's ascending order (views) when no eigenvalue repeats and
    sorts otherwise: either way each tensor gets the bits it gets alone, its singular values in
    descending order and its first direction the top eigenvector (checked against numpy's eigh)."""
    from relex_kernels import fit
    rng = np.random.default_rng(5)
    T = 5
    free = []
    for _ in range(6):
        X = rng.normal(size=(T, 3 * T))
        free.append(X @ X.T)
    tied = [np.diag([2.0, 2.0, 1.0, 0.5, 0.0]), np.diag([1.0, 0.0, 3.0, 0.0, 3.0])]
    Gs = np.stack(free[:3] + tied + free[3:])
    n = len(Gs)
    many = fit.components_many(Gs, 3, [1000] * n, ["F32"] * n)
    without = fit.components_many(np.stack(free), 3, [1000] * 6, ["F32"] * 6)
    for i, c in enumerate(many):
        one = fit.components(Gs[i], 3, 1000, "F32")
        for a, b in [(c.u, one.u), (c.s, one.s), (c.singular_values, one.singular_values)]:
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), i
        w, V = np.linalg.eigh(Gs[i])
        want = np.sqrt(np.clip(np.sort(w)[::-1], 0.0, None))
        np.testing.assert_allclose(c.singular_values, want, rtol=1e-12, atol=1e-12 * want[0])
        assert list(c.singular_values) == sorted(c.singular_values, reverse=True)
        if i not in (3, 4):  # (a repeated top eigenvalue has no one direction)
            assert abs(abs(float(c.u[:, 0] @ V[:, -1])) - 1.0) < 1e-9, i
    for c, d in zip(many[:3] + many[5:], without):  # the tie-free Grams, stacked without the tied ones
        assert c.u.tobytes() == d.u.tobytes() and c.singular_values.tobytes() == d.singular_values.tobytes()


def test_bulk_json_records_equal_one_call_per_record():
    """The journal's records and the report's tensor lines come from one encoder call cut at the
    object boundaries (journal.encode_each): the same text as one call per object, also for names
    that imitate a boundary and for objects whose nested dicts would add cuts."""
    import json

    from relex_kernels.engine.journal import _ENCODER, encode_each
    tricky = ['a}, {"name": "b', 'x},{"kind":1', "line\nbreak", "}{", 'ü"\\']
    objs = [{"name": n, "dtype": "BF16", "singular_values": [1.5, 0.0]} for n in tricky * 3]
    assert encode_each(json.dumps, objs, "name", ", ") == [json.dumps(o) for o in objs]
    recs = [{"kind": "fit", "name": n, "u": "AAAA", "ev": 0.5} for n in tricky] + [{"kind": "done", "name": "z"}]
    assert encode_each(_ENCODER.encode, recs, "kind", ",") == [_ENCODER.encode(r) for r in recs]
    nested = [{"name": "a", "sub": [{"name": 1}, {"name": 2}]}, {"name": "b", "sub": []}]
    assert encode_each(json.dumps, nested, "name", ", ") == [json.dumps(o) for o in nested]


def test_group_weights_and_report_entries_are_each_tensor_alone():
    """A group's α (one broadcast product) and report entries (stacked row sums) hold, for every
    tensor, the bits computed from it alone with the textbook formulas: α = (w̃ U) Uᵀ and
    explained_variance_rank1 = s_0² / Σ s_i²; mixed ranks take the one-by-one path."""
    from relex_kernels import fit
    from relex_kernels.engine.report import tensor_entries
    from relex_kernels.engine.trajectory import Job
    rng = np.random.default_rng(5)
    T, K = 9, 3
    W = rng.normal(size=(K, T))
    for ranks in ([1] * 40, [2] * 40, [1, 2, 3] * 13):
        comps = []
        for r in ranks:
            u = np.linalg.qr(rng.normal(size=(T, T)))[0][:, :r].copy()
            sv = np.sort(np.abs(rng.normal(size=T)))[::-1].copy()
            sv[-1] = 0.0
            comps.append(fit.Components(u=u, s=sv[:r].copy(), singular_values=sv, explained_variance=0.5))
        comps.append(fit.Components(u=comps[0].u, s=np.zeros(ranks[0]), singular_values=np.zeros(T),
                                    explained_variance=0.0))  # an unmoved tensor: rank-1 share 0
        A = fit.alphas_many(comps, W)
        entries = tensor_entries([Job(f"t{i}", "BF16", (3, 4), "fit") for i in range(len(comps))], comps)
        for c, a, e in zip(comps, A, entries):
            assert a.tobytes() == ((W @ c.u) @ c.u.T).tobytes()
            lam = c.singular_values ** 2
            assert e["explained_variance_rank1"] == (float(lam[0] / lam.sum()) if lam.sum() > 0 else 0.0)
            assert e["singular_values"] == [float(x) for x in c.singular_values]
            assert e["components"] == c.u.shape[1] and e["shape"] == [3, 4]


def test_targets_too_far_or_too_large_are_refused_before_any_read():
    """A target whose weights would overflow the prediction (bf16/fp32 outputs have no check as
    written, unlike fp16) and steps no float64 holds: one UsageError each, from the shared weights."""
    from relex_kernels.errors import UsageError
    from relex_kernels.fit import MAX_WEIGHT, FitOptions, target_weights
    steps = list(range(1, 101))
    w = target_weights(FitOptions(), steps, [10**9])  # far, and fine
    assert np.isfinite(w).all() and np.linalg.norm(w) < MAX_WEIGHT
    with pytest.raises(UsageError, match=r"target step 10{15} is too far from the history \(steps 1\.\.100\)"):
        target_weights(FitOptions(), steps, [10**15])
    with pytest.raises(UsageError, match="step of 401 digits is too large"):
        target_weights(FitOptions(), steps, [10**400])
    with pytest.raises(UsageError, match=f"step {2**53} is too large"):
        target_weights(FitOptions(), steps[:-1] + [2**53], [2**53 + 5])
    for scale in (1e306, 1e200):  # a target time past float64, or weights past MAX_WEIGHT
        with pytest.raises(UsageError, match="too far from the history"):
            target_weights(FitOptions(time_axis="index", step_scale=scale), steps, [10**5])
