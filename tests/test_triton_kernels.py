"""The Triton kernels against ops/reference.py, with the device as a parametrize axis.

Triton 3.9 decides interpreter or compiler when ``triton.language`` is first imported
(its own ``@jit`` helpers such as ``tl.zeros`` are built then), so one process cannot
hold both. This module therefore runs in two ways:

* normally (``TRITON_INTERPRET`` unset): the ``cuda`` cases run the compiled kernels
  (skipped without a GPU), and ``test_interpreter_suite`` runs this same file in a
  subprocess with ``TRITON_INTERPRET=1``;
* in that subprocess: the ``interp`` cases run every kernel on the CPU, tiny shapes.

Nothing here queries CUDA at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from relex_kernels.io import dtypes  # noqa: E402
from relex_kernels.ops import reference  # noqa: E402

#: (storage dtype, fp16_deltas): the authors' fp16 deltas come from 16-bit checkpoints
DT_FP16 = [("BF16", False), ("BF16", True), ("F16", False), ("F16", True), ("F32", False), ("F64", False)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_interpreter_suite():
    """Every kernel under TRITON_INTERPRET=1 on the CPU (this file, in a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.fixture(params=["interp" if INTERPRETED else "cuda"])
def kd(request):
    """(kernel modules, device) for the device of this process."""
    from relex_kernels.kernels.triton import combine, eig, gram
    mods = {"gram": gram, "combine": combine, "eig": eig}
    if request.param == "interp":
        return mods, torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no GPU (the interp cases run in test_interpreter_suite)")
    return mods, torch.device("cuda")


def _data(rng, dtype, T, n, scale=1e-2):
    b = rng.normal(0, 0.5, n).astype(np.float32)
    hs = [b + scale * rng.normal(0, 1, n).astype(np.float32) for _ in range(T)]
    return dtypes.from_float32(b, dtype), [dtypes.from_float32(h, dtype) for h in hs]


def _block(base, hist, device):
    x = np.stack([base] + hist)
    if x.dtype.itemsize == 2:
        x = x.view(np.int16)
    return torch.from_numpy(x).to(device)


def _gram(mods, device, base, hist, dtype, fp16=False, precision=None, acc=None):
    T, n = len(hist), base.shape[0]
    g = mods["gram"]
    acc = torch.zeros((T, T), dtype=torch.float64, device=device) if acc is None else acc
    part = torch.empty(g.partials_numel(T, n), dtype=torch.float32, device=device)
    g.gram_block(_block(base, hist, device), n, T, dtypes.DTYPE_CODES[dtype], acc, part, fp16, precision)
    return acc.cpu().numpy()


def _exact_gram(base, hist, dtype, fp16):
    d = reference.deltas_fp32(base, hist, dtype, fp16).astype(np.float64)
    return d @ d.T, np.abs(d) @ np.abs(d).T


@pytest.mark.parametrize("dtype,fp16", DT_FP16)
@pytest.mark.parametrize("T,n", [(1, 1), (3, 1000), (7, 513), (9, 300), (17, 257)])
def test_gram_matches_reference(kd, dtype, T, n, fp16):
    mods, device = kd
    rng = np.random.default_rng(T * 1000 + n)
    base, hist = _data(rng, dtype, T, n)
    got = _gram(mods, device, base, hist, dtype, fp16)
    ref = np.zeros((T, T))
    reference.gram(base, hist, dtype, ref, fp16)
    exact, mag = _exact_gram(base, hist, dtype, fp16)
    # error against the exact Gram at most twice the reference's own, plus a few fp32
    # roundings of the magnitudes (the products' order is each backend's own)
    ref_err = np.abs(ref - exact).max()
    tol = 2 * ref_err + 8 * np.finfo(np.float32).eps * mag.max()
    assert np.abs(got - exact).max() <= tol
    np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_gram_precisions_and_reproducibility(kd, precision):
    mods, device = kd
    rng = np.random.default_rng(5)
    base, hist = _data(rng, "BF16", 20, 700)
    a = _gram(mods, device, base, hist, "BF16", precision=precision)
    b = _gram(mods, device, base, hist, "BF16", precision=precision)
    np.testing.assert_array_equal(a, b)  # bit-reproducible run to run
    exact, mag = _exact_gram(base, hist, "BF16", False)
    rel = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 1e-2}[precision]
    assert np.abs(a - exact).max() <= rel * mag.max()
    with pytest.raises(ValueError):
        mods["gram"].resolve_precision(20, "fp8")


def test_gram_chunk_contract(kd):
    """Chunk partials go to the fp64 accumulator in chunk order: splitting at a chunk boundary changes no bit."""
    mods, device = kd
    rng = np.random.default_rng(1)
    n = reference.GRAM_CHUNK + 301
    base, hist = _data(rng, "F32", 1, n)
    whole = _gram(mods, device, base, hist, "F32")
    c = reference.GRAM_CHUNK
    acc = torch.zeros((1, 1), dtype=torch.float64, device=device)
    _gram(mods, device, base[:c], [h[:c] for h in hist], "F32", acc=acc)
    split = _gram(mods, device, base[c:], [h[c:] for h in hist], "F32", acc=acc)
    np.testing.assert_array_equal(whole, split)
    # and the second chunk's partial was added to the first in fp64
    ref = np.zeros((1, 1))
    reference.gram(base, hist, "F32", ref)
    assert abs(whole[0, 0] - ref[0, 0]) <= 1e-5 * ref[0, 0]


def _specials(dtype):
    vals = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 65504.0, 1e-7, -3e38], np.float32)
    with np.errstate(all="ignore"):
        return dtypes.from_float32(vals, dtype)


@pytest.mark.parametrize("dtype,fp16", DT_FP16)
@pytest.mark.parametrize("T,K,n", [(1, 1, 5), (3, 2, 1000), (8, 3, 1500), (12, 1, 200)])
def test_combine_bit_exact(kd, dtype, T, K, n, fp16):
    mods, device = kd
    rng = np.random.default_rng(T + 10 * K + n)
    base, hist = _data(rng, dtype, T, n)
    if n >= 8:  # NaN, infinities, signed zeros, fp16 overflow and subnormal results
        base[:8] = _specials(dtype)
    alphas = rng.normal(0, 3, (K, T)).astype(np.float32)
    ref = [np.zeros(n, dtypes.raw_numpy(dtype)) for _ in range(K)]
    with np.errstate(all="ignore"):
        reference.combine(base, hist, alphas, dtype, ref, fp16)
    tdt = {"F32": torch.float32, "F64": torch.float64}.get(dtype, torch.int16)
    out = torch.zeros((K, n), dtype=tdt, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on NaN/Inf
        mods["combine"].combine_block(_block(base, hist, device), n, T, dtypes.DTYPE_CODES[dtype],
                                      torch.from_numpy(alphas).to(device), out, fp16)
    got = out.cpu().numpy()
    np.testing.assert_array_equal(got.view(np.uint8), np.stack(ref).view(got.dtype).view(np.uint8))


def _grams(rng, B, T, rank1=True):
    M = rng.normal(0, 1, (B, T, 40))
    if rank1:
        M = 0.05 * M + np.linspace(1, 2, T)[None, :, None] * rng.normal(0, 1, (B, 1, 40))
    return torch.from_numpy(M @ M.transpose(0, 2, 1))


@pytest.mark.parametrize("T,rank", [(2, 1), (6, 1), (5, 2), (16, 2)])
def test_power_iteration_matches_eigh(kd, T, rank):
    mods, device = kd
    from relex_kernels.kernels.triton.eig_ref import eigh_top
    rng = np.random.default_rng(T * 7 + rank)
    G = _grams(rng, 3, T).to(device)
    lam, U, it = mods["eig"].top_eigenpairs(G, rank)
    lam_r, U_r = eigh_top(G, rank)
    scale = lam_r[:, :1]
    assert (torch.abs(lam - lam_r) <= 1e-9 * scale).all()
    # subspace agreement (robust to near-degenerate trailing components)
    P, P_r = U @ U.transpose(1, 2), U_r @ U_r.transpose(1, 2)
    assert torch.abs(P - P_r)[it].max().item() <= 1e-6 if it.any() else True
    assert torch.abs(U[:, :, 0] - U_r[:, :, 0]).max().item() <= 1e-7  # the RELEX direction, signs normalised


def test_power_iteration_fallbacks(kd):
    mods, device = kd
    rng = np.random.default_rng(3)
    G = _grams(rng, 4, 6).to(device)
    Q, _ = torch.linalg.qr(torch.from_numpy(rng.normal(0, 1, (6, 6))))
    lam1 = torch.tensor([1.0, 0.97, 0.3, 0.1, 0.0, 0.0], dtype=torch.float64)
    G[1] = (Q @ torch.diag(lam1) @ Q.T).to(device)  # λ₂/λ₁ = 0.97: too slow, goes to eigh
    G[2] = 0.0  # zero Gram: λ = 0
    G[3] = torch.diag(torch.tensor([1.0, 1.0, 0.5, 0.1, 0.0, 0.0], dtype=torch.float64)).to(device)
    lam, U, it = mods["eig"].top_eigenpairs(G, 2, v0=torch.arange(1.0, 7.0, dtype=torch.float64))
    assert it[0] and it[2] and not it[1]
    assert torch.allclose(lam[1], lam1[:2].to(device))
    # a degenerate top eigenvalue is no obstacle: any vector of its eigenspace is exact
    assert torch.allclose(lam[3], torch.tensor([1.0, 1.0], dtype=torch.float64, device=device))
    assert torch.allclose(G[3] @ U[3], U[3] * lam[3], atol=1e-9)
    assert (lam[2].abs() <= 1e-300).all()
    big = _grams(rng, 2, 130).to(device)  # beyond MAX_T: eigh for all
    lam, U, it = mods["eig"].top_eigenpairs(big, 1)
    assert not it.any() and U.shape == (2, 130, 1)


# -- ahead-of-time compile for the GPU targets (no GPU needed) --------------------------------
def _aot_configs():
    from relex_kernels.kernels.triton import combine, eig, gram
    for T, dt, fp16 in ((3, 2, True), (8, 0, False), (16, 2, False), (32, 1, True), (128, 2, False), (128, 3, False)):
        cfg = gram.tile_config(T)
        consts = {"DT": dt, "FP16": fp16, "BT": cfg["BT"], "BD": cfg["BD"], "SUB_N": gram.SUB,
                  "USE_DOT": cfg["USE_DOT"], "PREC": gram.resolve_precision(T, None)}
        ptr = {0: "*fp32", 1: "*i16", 2: "*i16", 3: "*fp64"}[dt]
        sig = {"x_ptr": ptr, "stride": "i32", "n": "i32", "T": "i32", "part_ptr": "*fp32"}
        yield gram._gram_partials, sig, consts, {"num_warps": cfg["num_warps"], "enable_fp_fusion": True}
    yield (gram._gram_reduce, {"part_ptr": "*fp32", "acc_ptr": "*fp64", "TT": "i32", "n_chunks": "i32"},
           {"SPLIT_N": gram.SPLIT, "BE": 256}, {"num_warps": 4, "enable_fp_fusion": True})
    for dt, kp in ((0, 1), (1, 2), (2, 4), (3, 1)):
        ptr = {0: "*fp32", 1: "*i16", 2: "*i16", 3: "*fp64"}[dt]
        sig = {"x_ptr": ptr, "stride": "i32", "n": "i32", "T": "i32", "a_ptr": "*fp32", "K": "i32", "out_ptr": ptr,
               "out_stride": "i32"}
        yield (combine._combine, sig, {"DT": dt, "FP16": dt in (1, 2), "KP": kp, "BLOCK": max(128, 1024 // kp)},
               {"num_warps": 4, "enable_fp_fusion": False})
    sig = {"g_ptr": "*fp64", "v0_ptr": "*fp64", "lam_ptr": "*fp64", "u_ptr": "*fp64", "st_ptr": "*i32", "T": "i32",
           "R": "i32", "max_iter": "i32", "tol": "fp64", "max_rate": "fp64"}
    for tp in (8, eig.MAX_T):
        yield eig._power, sig, {"TP": tp}, {"num_warps": 4 if tp <= 32 else 8, "enable_fp_fusion": True}


@pytest.mark.skipif(INTERPRETED, reason="compiles, does not interpret")
@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_sm80_and_sm90(cc):
    """Every kernel shape the launchers use compiles to a cubin for A100/H100 (Triton's own ptxas).

    Catches what the interpreter cannot: type errors of the compiled path, unsupported
    ops, shared memory beyond the card's limit.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    limit = {80: 163 << 10, 90: 227 << 10}[cc]
    for fn, sig, consts, opts in _aot_configs():
        if cc == 80 and consts.get("TP") == 128:
            continue  # the slowest compile; its sm_90 twin stands for it
        sig = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", cc, 32), options=opts)
        assert k.asm.get("cubin"), (fn.__name__, consts)
        assert k.metadata.shared <= limit, (fn.__name__, consts, k.metadata.shared)
