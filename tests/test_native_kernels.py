"""The native CPU kernels (relex_kernels._C via ops.native) against the reference contract.

* combine: bit-identical to ops.reference for every dtype, SIMD path and thread count,
  exhaustively over the bf16 / fp16 bit patterns for the rounding;
* gram: within an fp32 summation tolerance of the exact (fp64) Gram of the same fp32
  deltas, the same bound the reference itself meets; bit-identical across thread
  counts and when a range is split at a GRAM_CHUNK multiple;
* both: fp16_deltas mode, unaligned read-only views, NaN/inf, validation errors.

Skipped when the extension is not built, except under CI (``CI`` or
``RELEX_REQUIRE_NATIVE`` set), where a missing extension is a failure.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from native_required import native_or_skip_module

from relex_kernels.io import dtypes
from relex_kernels.ops import reference as ref

native = native_or_skip_module()

from relex_kernels import _C  # noqa: E402

CHUNK = ref.GRAM_CHUNK
FLOATS = ("BF16", "F16", "F32")
LEVELS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(_C.best_simd_level()) + 1]
U32 = float(np.finfo(np.float32).eps) / 2


@pytest.fixture(params=LEVELS)
def simd(request):
    prev = native.set_simd(request.param)
    yield request.param
    native.set_simd(prev)


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}thr")
def threads(request):
    native.set_num_threads(request.param)
    yield request.param
    native.set_num_threads(None)


def make(dt: str, T: int, n: int, seed: int = 0, drift: float = 1e-3):
    """bf16/fp16/fp32 raw views: base ~ N(0, 0.05), history = base + a rank-1 drift + noise."""
    rng = np.random.default_rng(seed)
    b32 = (0.05 * rng.standard_normal(n)).astype(np.float32)
    direction = rng.standard_normal(n).astype(np.float32)
    base = dtypes.from_float32(b32, dt)
    hist = []
    for i in range(T):
        h = b32 + np.float32(drift * (i + 1)) * direction + np.float32(drift / 4) * rng.standard_normal(n).astype(np.float32)
        hist.append(dtypes.from_float32(h, dt))
    return base, hist


def exact_gram(base, hist, dt, fp16_deltas=False):
    """The fp64 Gram of the fp32 deltas, and of their absolute values (the error scale)."""
    T = len(hist)
    g = np.zeros((T, T))
    a = np.zeros((T, T))
    for c0 in range(0, base.shape[0], CHUNK):
        d = ref.deltas_fp32(base[c0:c0 + CHUNK], [h[c0:c0 + CHUNK] for h in hist], dt, fp16_deltas).astype(np.float64)
        g += d @ d.T
        a += np.abs(d) @ np.abs(d).T
    return g, a


def gram_tolerance(absgram: np.ndarray, n: int) -> np.ndarray:
    """fp32 summation error of chunk sums of length m = min(n, GRAM_CHUNK), in any order.

    Rounding errors of a sum of m terms behave like a random walk: ~u·sqrt(m) of the
    sum of magnitudes. 8·u·sqrt(m) leaves a wide margin for the order (lanes, blocks)
    yet stays ~1e-5 of the magnitude, far below what an indexing error would give.
    """
    m = min(max(n, 1), CHUNK)
    return 8 * U32 * np.sqrt(m) * absgram + 1e-300


def check_gram(got, base, hist, dt, fp16_deltas=False, exact=None):
    """``exact``: ``exact_gram``'s result for these inputs, when the caller already has it."""
    want, absg = exact if exact is not None else exact_gram(base, hist, dt, fp16_deltas)
    tol = gram_tolerance(absg, base.shape[0])
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"gram off at {np.argwhere(bad)[:5].tolist()}: got {got[bad][:3]}, want {want[bad][:3]}"
    np.testing.assert_array_equal(got, got.T)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ gram


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T", [1, 2, 3, 16, 33, 100])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_gram_matches_reference_small(simd, dt, T, n):
    base, hist = make(dt, T, n, seed=T * 31 + n)
    acc = np.zeros((T, T))
    native.gram(base, hist, dt, acc)
    check_gram(acc, base, hist, dt)
    # the reference meets the same tolerance (the bound is not tailored to the kernel)
    racc = np.zeros((T, T))
    ref.gram(base, hist, dt, racc)
    check_gram(racc, base, hist, dt)


@pytest.mark.parametrize("dt,T", [("BF16", 3), ("BF16", 16), ("F16", 5), ("F32", 7), ("BF16", 33)])
def test_gram_matches_reference_large(threads, dt, T):
    base, hist = make(dt, T, 1_000_003, seed=T)
    acc = np.zeros((T, T))
    native.gram(base, hist, dt, acc)
    check_gram(acc, base, hist, dt)


@pytest.mark.parametrize("T", [2, 5, 7, 20])
def test_gram_bitwise_independent_of_thread_count(simd, T):
    base, hist = make("BF16", T, 9 * CHUNK + 1234, seed=5)
    results = []
    for t in (1, 2, 3):
        native.set_num_threads(t)
        acc = np.full((T, T), 0.25)  # += semantics: acc is not overwritten
        native.gram(base, hist, "BF16", acc)
        results.append(acc)
    native.set_num_threads(None)
    for r in results[1:]:
        assert same_bits(r, results[0])
    check_gram(results[0] - 0.25, base, hist, "BF16")


@pytest.mark.parametrize("T", [3, 9])
def test_gram_split_at_chunk_multiple_is_identical(T):
    base, hist = make("F16", T, 5 * CHUNK + 77, seed=9)
    whole = np.zeros((T, T))
    native.gram(base, hist, "F16", whole)
    parts = np.zeros((T, T))
    for a, b in [(0, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, base.shape[0])]:
        native.gram(base[a:b], [h[a:b] for h in hist], "F16", parts)
    assert same_bits(whole, parts)


def _in_pieces(base, hist, cuts):
    """The versions of a range as pieces ``[cuts[p], cuts[p + 1])``, each version's piece a copy
    of its own (as in files apart): (starts, rows, keep)."""
    keep, rows = [], np.zeros((len(cuts) - 1, len(hist) + 1), dtype=np.uint64)
    for p in range(len(cuts) - 1):
        for v, x in enumerate([base, *hist]):
            keep.append(np.array(x[cuts[p]:cuts[p + 1]]))
            rows[p, v] = keep[-1].ctypes.data
    return np.array(cuts, dtype=np.uint64), rows, keep


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T,n,cuts", [(3, 3 * CHUNK + 17, [CHUNK]), (16, 5 * CHUNK, [CHUNK, 3 * CHUNK, 4 * CHUNK]),
                                      (33, 2 * CHUNK + 5, [2 * CHUNK]), (100, 2 * CHUNK + 9, [CHUNK, 2 * CHUNK])])
@pytest.mark.parametrize("fp16_deltas", [False, True])
def test_gram_pieces_equal_one_contiguous_call(simd, threads, dt, T, n, cuts, fp16_deltas):
    """A range held in pieces (a tensor over rank files) sums to the bits of the same range in one
    buffer: every SIMD path, the fused (small T) and panel kernels, with a last partial chunk."""
    base, hist = make(dt, T, n, seed=T)
    want = np.zeros((T, T))
    native.gram(base, hist, dt, want, fp16_deltas=fp16_deltas)
    starts, rows, keep = _in_pieces(base, hist, [0, *cuts, n])
    got = np.zeros((T, T))
    native.gram_pieces(starts, rows, n, dt, got, fp16_deltas=fp16_deltas)
    assert same_bits(got, want)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T,K", [(3, 1), (16, 2), (100, 1)])
@pytest.mark.parametrize("fp16_deltas", [False, True])
def test_combine_pieces_equal_one_contiguous_call(simd, threads, dt, T, K, fp16_deltas):
    """Pieces anywhere (inside combine blocks and SIMD steps, one element long) write the bits of
    one contiguous call."""
    n = 2 * CHUNK + 333
    base, hist = make(dt, T, n, seed=K)
    alphas = np.random.default_rng(T).standard_normal((K, T)).astype(np.float32)
    want = [np.zeros(n, dtype=base.dtype) for _ in range(K)]
    native.combine(base, hist, alphas, dt, want, fp16_deltas=fp16_deltas)
    starts, rows, keep = _in_pieces(base, hist, [0, 5, 6, 1000, CHUNK + 3, 2 * CHUNK - 1, n])
    got = [np.zeros(n, dtype=base.dtype) for _ in range(K)]
    native.combine_pieces(starts, rows, n, alphas, dt, got, fp16_deltas=fp16_deltas)
    assert all(same_bits(g, w) for g, w in zip(got, want))


def test_pieces_tables_are_checked():
    base, hist = make("BF16", 2, 2 * CHUNK)
    acc = np.zeros((2, 2))
    starts, rows, keep = _in_pieces(base, hist, [0, CHUNK + 1, 2 * CHUNK])
    with pytest.raises(ValueError, match="inside a chunk"):  # the Gram's chunks need whole pieces
        native.gram_pieces(starts, rows, 2 * CHUNK, "BF16", acc)
    starts, rows, keep = _in_pieces(base, hist, [0, CHUNK, 2 * CHUNK])
    with pytest.raises(ValueError, match="rise from 0 to n"):
        native.gram_pieces(starts, rows, 2 * CHUNK + 1, "BF16", acc)
    rows[1, 2] = 0
    with pytest.raises(ValueError, match="null pointer"):
        native.gram_pieces(starts, rows, 2 * CHUNK, "BF16", acc)
    with pytest.raises(ValueError, match="pieces: starts"):
        native.gram_pieces(starts, rows[:1], 2 * CHUNK, "BF16", acc)


def test_gram_matches_reference_chunk_order_on_exact_data():
    """Dyadic data: every chunk partial is exact, so native and reference agree to the bit."""
    T, n = 4, 3 * CHUNK + 5
    rng = np.random.default_rng(1)
    base = dtypes.from_float32(np.zeros(n, np.float32), "BF16")
    hist = [dtypes.from_float32((rng.integers(-8, 8, n) / 8).astype(np.float32), "BF16") for _ in range(T)]
    a, b = np.full((T, T), 1e-3), np.full((T, T), 1e-3)
    native.gram(base, hist, "BF16", a)
    ref.gram(base, hist, "BF16", b)
    assert same_bits(a, b)


@pytest.mark.parametrize("T", [1, 5])
def test_gram_fp64_reduction_follows_chunk_order(threads, T):
    """Chunk partials 2^54, 2, 2 (all exact in fp32): in chunk order each 2 is a tie that
    rounds to even and is lost (ulp(2^54) = 4); in reverse order they add up to 4 first."""
    n = 3 * CHUNK
    base = np.zeros(n, np.float32)
    hist = [np.zeros(n, np.float32) for _ in range(T)]
    for h in hist:
        h[[10, CHUNK + 10, CHUNK + 11, 2 * CHUNK + 10, 2 * CHUNK + 11]] = [2.0**27, 1, 1, 1, 1]
    acc = np.zeros((T, T))
    native.gram(base, hist, "F32", acc)
    assert (acc == 2.0**54).all()
    acc = np.zeros((T, T))
    native.gram(base, [h[::-1].copy() for h in hist], "F32", acc)
    assert (acc == 2.0**54 + 4).all()


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T", [1, 4, 6, 13])
def test_gram_fp16_deltas(simd, dt, T):
    base, hist = make(dt, T, 3 * CHUNK // 2 + 3, seed=T, drift=3e-2)
    acc = np.zeros((T, T))
    native.gram(base, hist, dt, acc, fp16_deltas=True)
    check_gram(acc, base, hist, dt, fp16_deltas=True)
    # and the fp16 rounding of the deltas did happen (it changes the Gram measurably here)
    plain, _ = exact_gram(base, hist, dt)
    assert not np.allclose(acc, plain, rtol=1e-7, atol=0)


# ------------------------------------------------------------------ combine


def run_combine(fn, base, hist, alphas, dt, fp16_deltas=False):
    outs = [np.full(base.shape[0], 0x5A, dtype=dtypes.raw_numpy(dt)) for _ in range(alphas.shape[0])]
    fn(base, hist, alphas, dt, outs, fp16_deltas)
    return outs


def check_combine(base, hist, alphas, dt, fp16_deltas=False):
    want = run_combine(ref.combine, base, hist, alphas, dt, fp16_deltas)
    got = run_combine(native.combine, base, hist, alphas, dt, fp16_deltas)
    for k, (g, w) in enumerate(zip(got, want)):
        diff = np.flatnonzero(g.view(np.uint8) != w.view(np.uint8))
        assert diff.size == 0, f"output {k}: {diff.size} bytes differ, first at byte {diff[:5]}"


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T", [1, 2, 3, 16, 33, 100])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_combine_bitwise_small(simd, dt, T, n):
    base, hist = make(dt, T, n, seed=T + n)
    alphas = np.random.default_rng(T).standard_normal((2, T)).astype(np.float32)
    check_combine(base, hist, alphas, dt)


@pytest.mark.parametrize("dt,T,K", [("BF16", 3, 1), ("BF16", 16, 3), ("F16", 5, 2), ("F32", 33, 1)])
def test_combine_bitwise_large(simd, threads, dt, T, K):
    base, hist = make(dt, T, 1_000_003, seed=K)
    alphas = np.random.default_rng(K).standard_normal((K, T)).astype(np.float32) * 7
    check_combine(base, hist, alphas, dt)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("T", [1, 5, 16])
def test_combine_fp16_deltas(simd, dt, T):
    base, hist = make(dt, T, 10_000, seed=T, drift=5e-2)
    alphas = np.random.default_rng(0).standard_normal((3, T)).astype(np.float32)
    check_combine(base, hist, alphas, dt, fp16_deltas=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN/overflow
@pytest.mark.parametrize("dt", ["BF16", "F16"])
def test_combine_rounding_exhaustive(simd, dt):
    """Every 16-bit pattern (subnormals, ties, overflow, inf, NaN) times scales that make ties."""
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtypes.raw_numpy(dt))
    base = np.zeros_like(raw)
    base[1::2] = raw[::2]  # also non-zero bases (b + s rounding, cancellation)
    scales = [1.0, 1 + 2**-8, 1 + 3 * 2**-9, 0.5 + 2**-10, -(1 - 2**-9), 2**-20 + 2**-28, 3e4, 1e38]
    alphas = np.array([[s] for s in scales], dtype=np.float32)
    check_nan_aware(base, [raw], alphas, dt)


def check_nan_aware(base, hist, alphas, dt, fp16_deltas=False):
    """Bit-identical outputs, except that a NaN may carry another payload or sign."""
    want = run_combine(ref.combine, base, hist, alphas, dt, fp16_deltas)
    got = run_combine(native.combine, base, hist, alphas, dt, fp16_deltas)
    for g, w in zip(got, want):
        gf, wf = dtypes.to_float32(g, dt), dtypes.to_float32(w, dt)
        np.testing.assert_array_equal(np.isnan(gf), np.isnan(wf))
        keep = ~np.isnan(wf)
        diff = np.flatnonzero(g[keep].view(np.uint16) != w[keep].view(np.uint16))
        assert diff.size == 0, f"{diff.size} elements differ, e.g. got {g[keep][diff[:3]]} want {w[keep][diff[:3]]}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN/overflow
def test_combine_writes_nothing_else_and_handles_T0():
    base, _ = make("BF16", 0, 1000)
    base[:3] = [0x8000, 0x0000, 0x7FC0]  # -0 (b + 0 is +0), +0, NaN
    check_combine(base, [], np.zeros((2, 0), np.float32), "BF16")
    buf = np.full(1010, 0x1234, np.uint16)
    native.combine(base, [], np.zeros((1, 0), np.float32), "BF16", [buf[5:1005]])
    assert (buf[:5] == 0x1234).all() and (buf[1005:] == 0x1234).all()


# ------------------------------------------------------------------ memory layout, NaN, F64


def unaligned(x: np.ndarray, writable: bool) -> np.ndarray:
    """A copy of x at an odd address, like a tensor at an odd offset of a memory-mapped file."""
    storage = bytearray(x.nbytes + 1) if writable else None
    if writable:
        v = np.frombuffer(storage, dtype=x.dtype, count=x.shape[0], offset=1)
        v[...] = x
        return v
    return np.frombuffer(b"\0" + x.tobytes(), dtype=x.dtype, count=x.shape[0], offset=1)


@pytest.mark.parametrize("dt", FLOATS)
def test_unaligned_read_only_views(simd, dt):
    T, n = 5, 2 * CHUNK + 333
    base, hist = make(dt, T, n, seed=3)
    ubase, uhist = unaligned(base, False), [unaligned(h, False) for h in hist]
    assert not ubase.flags.aligned or dtypes.itemsize(dt) == 1
    assert not ubase.flags.writeable
    a, b = np.zeros((T, T)), np.zeros((T, T))
    native.gram(base, hist, dt, a)
    native.gram(ubase, uhist, dt, b)
    assert same_bits(a, b)
    alphas = np.random.default_rng(0).standard_normal((2, T)).astype(np.float32)
    want = run_combine(ref.combine, base, hist, alphas, dt)
    outs = [unaligned(np.zeros_like(base), True) for _ in range(2)]
    native.combine(ubase, uhist, alphas, dt, outs)
    for o, w in zip(outs, want):
        assert same_bits(o, w)


def test_strided_inputs_and_outputs():
    base, hist = make("BF16", 3, 2 * 5000, seed=4)
    sb, sh = base[::2], [h[::2] for h in hist]
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    native.gram(sb, sh, "BF16", a)
    native.gram(sb.copy(), [h.copy() for h in sh], "BF16", b)
    assert same_bits(a, b)
    alphas = np.ones((1, 3), np.float32)
    out = np.zeros(2 * 5000, np.uint16)
    native.combine(sb, sh, alphas, "BF16", [out[::2]])
    want = run_combine(ref.combine, sb.copy(), [h.copy() for h in sh], alphas, "BF16")[0]
    assert same_bits(out[::2].copy(), want) and not out[1::2].any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN/overflow
@pytest.mark.parametrize("dt", FLOATS)
def test_nan_and_inf_propagate(simd, dt):
    T, n = 6, CHUNK + 100
    base, hist = make(dt, T, n, seed=8)
    nan, inf = dtypes.from_float32(np.array([np.nan, np.inf], np.float32), dt)
    hist[1][5] = nan
    hist[3][CHUNK + 50] = inf
    base[77] = nan
    acc, racc = np.zeros((T, T)), np.zeros((T, T))
    native.gram(base, hist, dt, acc)
    ref.gram(base, hist, dt, racc)
    np.testing.assert_array_equal(np.isnan(acc), np.isnan(racc))
    assert np.isnan(acc).all()  # the NaN base element poisons every delta
    alphas = np.random.default_rng(0).standard_normal((2, T)).astype(np.float32)
    check_nan_aware(base, hist, alphas, dt)
    hist_ok = [h.copy() for h in hist]
    base[77] = base[76]
    acc = np.zeros((T, T))
    native.gram(base, hist_ok, dt, acc)
    assert np.isnan(acc[1]).all() and np.isnan(acc[:, 1]).all()
    assert not np.isnan(acc[np.ix_([0, 2, 4, 5], [0, 2, 4, 5])]).any()


def test_f64_supported_and_matches_reference():
    assert native.supports("F64")
    rng = np.random.default_rng(2)
    base = rng.standard_normal(50_001)
    hist = [base + 1e-3 * rng.standard_normal(base.shape[0]) for _ in range(5)]
    acc = np.zeros((5, 5))
    native.gram(base, hist, "F64", acc)
    check_gram(acc, base, hist, "F64")
    alphas = rng.standard_normal((2, 5)).astype(np.float32)
    check_combine(base, hist, alphas, "F64")
    check_combine(base, hist, alphas, "F64", fp16_deltas=True)


def test_empty_range_is_a_no_op():
    acc = np.full((2, 2), 3.0)
    e = np.zeros(0, np.uint16)
    native.gram(e, [e, e], "BF16", acc)
    native.combine(e, [e, e], np.ones((1, 2), np.float32), "BF16", [e.copy()])
    assert (acc == 3.0).all()


# ------------------------------------------------------------------ the API boundary


@pytest.mark.parametrize("bad,match", [
    (lambda b, h, a: native.gram(b.astype(np.int16), h, "BF16", a), "numpy dtype"),
    (lambda b, h, a: native.gram(b, h + [h[0][:-1]], "BF16", np.zeros((3, 3))), "elements"),
    (lambda b, h, a: native.gram(b, h, "BF16", np.zeros((2, 3))), "shape"),
    (lambda b, h, a: native.gram(b, h, "BF16", np.zeros((2, 2), np.float32)), "float64"),
    (lambda b, h, a: native.gram(b, h, "BF16", np.zeros((2, 4))[:, ::2]), "C-contiguous"),
    (lambda b, h, a: native.gram(b, h, "I32", a), "no native kernel"),
    (lambda b, h, a: native.gram(b.reshape(2, -1), h, "BF16", a), "1-D"),
    (lambda b, h, a: native.combine(b, h, np.ones((1, 3), np.float32), "BF16", [b.copy()]), "alphas"),
    (lambda b, h, a: native.combine(b, h, np.ones((1, 2), np.float32), "BF16", [b[:-1].copy()]), "outs\\[0\\]"),
    (lambda b, h, a: native.combine(b, h, np.ones((1, 2), np.float32), "BF16", [b]), "read-only"),
])
def test_validation_errors(bad, match):
    b = np.zeros(10, np.uint16)
    b.flags.writeable = False
    h = [np.zeros(10, np.uint16), np.zeros(10, np.uint16)]
    with pytest.raises(ValueError, match=match):
        bad(b, h, np.zeros((2, 2)))


def test_threads_and_simd_settings():
    with pytest.raises(ValueError):
        native.set_num_threads(0)
    with pytest.raises(ValueError):
        native.set_simd("sse9")
    info = native.info()
    assert info["simd"] in LEVELS and info["gram_chunk"] == CHUNK
    assert _C.GRAM_CHUNK == CHUNK and dtypes.DTYPE_CODES == {"F32": 0, "F16": 1, "BF16": 2, "F64": 3}


def test_bad_thread_env_is_a_usage_error(monkeypatch):
    from relex_kernels.errors import UsageError
    monkeypatch.setenv("RELEX_NUM_THREADS", "many")
    assert native.available()[0]  # probing does not fail ...
    with pytest.raises(UsageError, match="RELEX_NUM_THREADS"):  # ... the call does
        native.gram(np.zeros(3, np.uint16), [np.zeros(3, np.uint16)], "BF16", np.zeros((1, 1)))


def test_missing_extension_is_reported_not_raised():
    code = (
        "import sys; sys.modules['relex_kernels._C'] = None\n"
        "import relex_kernels\n"
        "from relex_kernels.ops import native, get_backend\n"
        "ok, why = native.available(); assert not ok and 'pip install -e .' in why, why\n"
        "assert get_backend().name == 'reference'\n"
        "import numpy as np\n"
        "from relex_kernels.errors import BackendError\n"
        "try:\n"
        "    native.gram(np.zeros(1, np.uint16), [], 'BF16', np.zeros((0, 0)))\n"
        "except BackendError as e:\n"
        "    print('raised', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RELEX_BACKEND": ""})
    assert r.returncode == 0, r.stderr
    assert "raised" in r.stdout and "pip install -e ." in r.stdout


@pytest.mark.parametrize("threads_n", [1, 2, 3])
@pytest.mark.parametrize("fp16", [False, True])
def test_tables_of_many_tensors_equal_calls_of_their_own(simd, threads_n, fp16):
    """gram_table / combine_table (the engine's groups): every tensor gets the bits of its own
    gram / combine call, small ones (one thread each) and large ones (every thread) mixed,
    whatever the thread count; an empty tensor is skipped. The small ones go to the threads in
    runs of neighbours of about a Gram chunk each (here several, cut by the large tensors too)."""
    T, K = 5, 2
    sizes = [1, 7, 300, 0, 2 * CHUNK + 5, 64, 3 * (1 << 16) + 1, 33, 40000, 30001, 50000, 9]
    dts = ["BF16", "F16", "F32", "BF16", "BF16", "F32", "F16", "BF16", "F16", "BF16", "F32", "F16"]
    data = [make(dt, T, n, seed=i) for i, (dt, n) in enumerate(zip(dts, sizes))]
    alphas = np.random.default_rng(1).standard_normal((len(sizes), K, T)).astype(np.float32)
    want_g, want_o = [], []
    for (base, hist), dt, A in zip(data, dts, alphas):
        g = np.zeros((T, T))
        native.gram(base, hist, dt, g, fp16_deltas=fp16)
        outs = [np.zeros_like(base) for _ in range(K)]
        native.combine(base, hist, A, dt, outs, fp16_deltas=fp16)
        want_g.append(g)
        want_o.append(outs)
    native.set_num_threads(threads_n)
    try:
        Gs = np.zeros((len(sizes), T, T))
        outs = [[np.full_like(base, 7) for _ in range(K)] for base, _ in data]
        codes = [dtypes.DTYPE_CODES[dt] for dt in dts]
        gt = [[n, c, Gs[i].ctypes.data, base.ctypes.data] + [h.ctypes.data for h in hist]
              for i, (n, c, (base, hist)) in enumerate(zip(sizes, codes, data))]
        native.gram_table(np.array(gt, dtype=np.uint64), fp16)
        ct = [[n, c, alphas[i].ctypes.data, base.ctypes.data] + [h.ctypes.data for h in hist]
              + [o.ctypes.data for o in outs[i]] for i, (n, c, (base, hist)) in enumerate(zip(sizes, codes, data))]
        native.combine_table(np.array(ct, dtype=np.uint64), T, K, fp16)
    finally:
        native.set_num_threads(None)
    for i in range(len(sizes)):
        assert np.array_equal(Gs[i], want_g[i]), i
        for o, w in zip(outs[i], want_o[i]):
            assert o.tobytes() == w.tobytes(), i


# ------------------------------------------------------------------ pinned bits

def _hashed_inputs(dt: str, T: int, n: int):
    """Inputs from integer hashing only (no RNG whose stream a numpy release may change):
    base values in ±0.05, each history row the base plus a drift of row i and a ±1e-3 wiggle."""
    i = np.arange(n, dtype=np.uint64)
    def unit(salt: int) -> np.ndarray:  # in [-1, 1), from a multiplicative hash of (element, salt)
        h = ((i + np.uint64(salt * 0x9E3779B1)) * np.uint64(2654435761)) % np.uint64(1 << 32)
        return (h.astype(np.float64) / 2.0 ** 31 - 1.0).astype(np.float32)
    b32 = np.float32(0.05) * unit(0)
    hist = [dtypes.from_float32(b32 + np.float32(1e-3 * (r + 1)) * unit(1) + np.float32(1e-3) * unit(r + 2), dt)
            for r in range(T)]
    return dtypes.from_float32(b32, dt), hist


# sha256 (first 16 hex digits) of the fp64 Gram each SIMD path computes for _hashed_inputs(dt, T,
# 3 chunks + 1000). The kernels promise the same bits for any thread count, range split and rank
# count, and a kernel change is meant to keep them (the panel Gram of issue 10 did): a change of
# summation order must show up here and be stated, not slip in.
PINNED_GRAM = {
    ('scalar', 'BF16', 4, False): "6c0914da83e04026",
    ('scalar', 'BF16', 8, False): "d127dc400816c64a",
    ('scalar', 'BF16', 16, False): "c63b70f03733c281",
    ('scalar', 'BF16', 37, False): "6b4d54d27dd4ca20",
    ('scalar', 'F16', 16, True): "06fb8bbb70c6d245",
    ('scalar', 'F32', 16, False): "8eaea6712584d446",
    ('avx2', 'BF16', 4, False): "9213d52bb4d4f19d",
    ('avx2', 'BF16', 8, False): "dbde136fa22e09fe",
    ('avx2', 'BF16', 16, False): "6d1925464be679d7",
    ('avx2', 'BF16', 37, False): "b13c9b05e6852a53",
    ('avx2', 'F16', 16, True): "32fdd799c7395ec4",
    ('avx2', 'F32', 16, False): "9835fa7a52597a1d",
    ('avx512', 'BF16', 4, False): "7ce1473e29386305",
    ('avx512', 'BF16', 8, False): "c715593f223c179c",
    ('avx512', 'BF16', 16, False): "8bde38db92d92130",
    ('avx512', 'BF16', 37, False): "d3b73f3d6c498b67",
    ('avx512', 'F16', 16, True): "db54b2c4d04d7a91",
    ('avx512', 'F32', 16, False): "6f6f1e78d65fba14",
}


@functools.lru_cache(maxsize=None)
def _pinned_case(dt, T, f16):
    """The pinned inputs and their fp64 Gram: made once per case, whichever SIMD path is checked."""
    base, hist = _hashed_inputs(dt, T, 3 * CHUNK + 1000)
    return base, hist, exact_gram(base, hist, dt, f16)


@pytest.mark.parametrize("dt,T,f16", [("BF16", 4, False), ("BF16", 8, False), ("BF16", 16, False),
                                      ("BF16", 37, False), ("F16", 16, True), ("F32", 16, False)])
def test_gram_bits_pinned(simd, dt, T, f16):
    base, hist, exact = _pinned_case(dt, T, f16)
    acc = np.zeros((T, T))
    native.gram(base, hist, dt, acc, fp16_deltas=f16)
    check_gram(acc, base, hist, dt, fp16_deltas=f16, exact=exact)
    got = hashlib.sha256(acc.tobytes()).hexdigest()[:16]
    assert got == PINNED_GRAM[(simd, dt, T, f16)], f"the Gram's bits changed for {simd}/{dt}/T={T}/f16={f16}"
