"""The torch-native API (relex_kernels.api): every function equals the engine's bytes on the same
trajectory, checkpoints written by safetensors' own writer; errors are RelexError subclasses."""

from __future__ import annotations

import ast
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

import relex_kernels as rk  # noqa: E402
from relex_kernels import FitOptions, extrapolate  # noqa: E402
from relex_kernels.engine.gramsum import GRAM_BLOCK  # noqa: E402
from relex_kernels.engine.streaming import Streamer  # noqa: E402
from relex_kernels.engine.trajectory import Trajectory  # noqa: E402
from relex_kernels.errors import (ArgumentError, DeviceError, DTypeError, NonFiniteError, RelexError,  # noqa: E402
                                  ShapeError)
from relex_kernels.ops import get_backend, native  # noqa: E402
from relex_kernels.ops.reference import GRAM_CHUNK  # noqa: E402

STEPS = [2, 4, 6, 8, 10]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _trajectory(seed: int, shapes: dict, dtype, steps=STEPS, nonfloat=True):
    """{name: [θ0, θ_s1, ...]} drifting along a direction with noise (fp32 values, stored in dtype)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        th0 = torch.randn(shape, generator=g) * 0.5
        v = torch.randn(shape, generator=g)
        out[name] = [th0] + [th0 + 1e-2 * s * v + 1e-3 * torch.randn(shape, generator=g) for s in steps]
        out[name] = [x.to(dtype) for x in out[name]]
    if nonfloat:
        out["ids"] = [torch.arange(7, dtype=torch.int64)] * (len(steps) + 1)
    return out


def _write(root: str, traj: dict, steps=STEPS, config=None, tie=None) -> tuple[str, dict[int, str]]:
    """Base and checkpoint directories written by safetensors.torch.save_file."""
    dirs = [os.path.join(root, "base")] + [os.path.join(root, f"checkpoint-{s}") for s in steps]
    for i, d in enumerate(dirs):
        os.makedirs(d)
        sd = {n: v[i].contiguous() for n, v in traj.items() if n != tie}
        safetensors_torch.save_file(sd, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as fh:
            json.dump(config or {"model_type": "test", "tie_word_embeddings": False}, fh)
    return dirs[0], dict(zip(steps, dirs[1:]))


def _load(d: str) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _bits(x: torch.Tensor) -> bytes:
    return x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dt", list(DTYPES))
def test_every_function_equals_the_engine_bytes(tmp, dt):
    """gram equals the engine's Gram bit for bit (Streamer.gram, the engine's own pass), and
    extrapolate_tensor / Fit + combine equal the bytes `relex extrapolate` writes."""
    shapes = {"w": (96, 700), "b": (333,)}
    traj = _trajectory(1, shapes, DTYPES[dt])
    base, ck = _write(tmp, traj)
    opts = FitOptions(rank=2)
    run = extrapolate(base, ck, [20, 40], os.path.join(tmp, "out"), opts)
    outs = [_load(o) for o in run.outputs]
    t = Trajectory(base, ck)
    try:
        st = Streamer(t, get_backend(None), 1 << 30)
        for name in shapes:
            job = next(j for j in t.jobs if j.name == name)
            G_engine = st.gram(job, [(0, job.numel)], True)
            G = rk.gram(traj[name][0], traj[name][1:])
            assert G.dtype == torch.float64 and np.array_equal(G.numpy(), G_engine), name
            preds = rk.extrapolate_tensor(traj[name][0], traj[name][1:], STEPS, [20, 40], opts)
            fit = rk.Fit.from_gram(G, STEPS, opts, numel=job.numel, dtype=traj[name][0].dtype)
            both = rk.combine(traj[name][0], torch.stack(traj[name][1:]), fit.alphas([20, 40]))
            for k, o in enumerate(outs):
                assert preds[k].dtype == DTYPES[dt] and preds[k].shape == shapes[name]
                assert _bits(preds[k]) == _bits(o[name]), (name, k)
                assert _bits(both[k]) == _bits(o[name]), (name, k)
    finally:
        t.close()


def test_non_contiguous_inputs_give_the_same_bytes():
    traj = _trajectory(2, {"w": (300, 64)}, torch.bfloat16, nonfloat=False)["w"]
    strided = [x.t().contiguous().t() for x in traj]  # same values, column-major strides
    assert not strided[0].is_contiguous()
    a = rk.extrapolate_tensor(traj[0], traj[1:], STEPS, [30])
    b = rk.extrapolate_tensor(strided[0], strided[1:], STEPS, [30])
    assert _bits(a[0]) == _bits(b[0])
    assert np.array_equal(rk.gram(traj[0], traj[1:]).numpy(), rk.gram(strided[0], strided[1:]).numpy())


def test_accumulator_in_any_pieces_equals_one_gram_across_a_block():
    """Pieces of any size, crossing GRAM_CHUNK and GRAM_BLOCK edges, give the bits of one call."""
    n = GRAM_BLOCK + 3 * GRAM_CHUNK + 5
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    hist = [(base.float() + 1e-2 * (i + 1) * torch.randn(n, generator=g)).to(torch.bfloat16) for i in range(2)]
    whole = rk.gram(base, hist)
    acc = rk.GramAccumulator()
    a = 0
    for size in [1000, GRAM_CHUNK, 3, GRAM_BLOCK - 7, 2 * GRAM_CHUNK + 11]:
        acc.add(base[a:a + size], [h[a:a + size] for h in hist])
        a += size
    acc.add(base[a:], [h[a:] for h in hist])
    assert acc.numel == n
    assert np.array_equal(acc.result().numpy(), whole.numpy())
    with pytest.raises(ArgumentError):
        acc.result()


def test_state_dict_round_trip_equals_relex_extrapolate(tmp):
    """Lazy safe_open handles in, predicted state dicts out: the bytes of the engine's output
    directory, the tied head written as the embedding, integer tensors copied."""
    shapes = {"model.embed_tokens.weight": (50, 32), "model.layers.0.w": (32, 48), "model.norm.weight": (32,)}
    traj = _trajectory(4, shapes, torch.bfloat16)
    cfg = {"model_type": "test", "tie_word_embeddings": True}
    base, ck = _write(tmp, traj, config=cfg)
    run = extrapolate(base, ck, [16, 24], os.path.join(tmp, "out"))
    handles = {s: safe_open(os.path.join(d, "model.safetensors"), "pt") for s, d in ck.items()}
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as b:
        got = rk.extrapolate_state_dict(b, handles, [16, 24])
    for t, o in zip([16, 24], run.outputs):
        want = _load(o)
        for name in shapes:
            assert _bits(got[t][name]) == _bits(want[name]), (t, name)
        assert torch.equal(got[t]["ids"], traj["ids"][0])
    # a state dict of a tied model: the head shares the embedding's storage -> written as it
    sds = {s: {n: v[i + 1] for n, v in traj.items()} for i, s in enumerate(STEPS)}
    base_sd = {n: v[0] for n, v in traj.items()}
    base_sd["lm_head.weight"] = base_sd["model.embed_tokens.weight"]
    for s in STEPS:
        sds[s]["lm_head.weight"] = sds[s]["model.embed_tokens.weight"]
    pred = rk.extrapolate_state_dict(base_sd, sds, [16])
    assert pred[16]["lm_head.weight"] is pred[16]["model.embed_tokens.weight"]
    assert list(pred[16]) == list(base_sd)
    untied = rk.extrapolate_state_dict(base_sd, sds, [16], tied=False)
    assert _bits(untied[16]["lm_head.weight"]) == _bits(pred[16]["model.embed_tokens.weight"])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_over_the_ops(compiler):
    """The fake implementations let a whole function trace (fullgraph) and compile; the ops run
    inside the compiled graph with their eager bits."""
    import relex_kernels.api  # noqa: F401  (registers torch.ops.relex.*)
    traj = _trajectory(5, {"w": (64, 40)}, torch.float32, nonfloat=False)["w"]
    base, hist = traj[0], traj[1:]

    def predict(b, h, a):
        G = torch.ops.relex.gram(b, h)
        return torch.ops.relex.combine(b, h, a) * 1.0, G.trace()

    A = rk.Fit.from_gram(rk.gram(base, hist), STEPS).alphas([12]).float()
    eager = predict(base, hist, A)
    compiled = torch.compile(predict, backend=compiler, fullgraph=True)(base, hist, A)
    assert _bits(compiled[0]) == _bits(eager[0]) and float(compiled[1]) == float(eager[1])


def test_fit_save_load_and_alphas(tmp):
    traj = _trajectory(6, {"w": (500,)}, torch.float32, nonfloat=False)["w"]
    G = rk.gram(traj[0], traj[1:])
    fit = rk.Fit.from_gram(G, STEPS, FitOptions(rank=2), numel=500, dtype=torch.float32)
    assert 0.5 < fit.explained_variance <= 1.0
    p = os.path.join(tmp, "w.relexfit")
    fit.save(p)
    again = rk.Fit.load(p)
    assert again.steps == fit.steps and again.options == fit.options
    assert torch.equal(again.alphas([12, 20]), fit.alphas([12, 20]))
    assert fit.alphas(12).shape == (1, 5) and fit.alphas(12).dtype == torch.float64
    with open(p, "wb") as fh:
        fh.write(b"not a fit")
    with pytest.raises(RelexError):
        rk.Fit.load(p)


def test_errors_are_relex_errors_with_clear_messages():
    b = torch.zeros(10, dtype=torch.bfloat16)
    h = [torch.ones(10, dtype=torch.bfloat16)] * 2
    cases = [
        (lambda: rk.gram([1, 2], h), ArgumentError, "torch.Tensor"),
        (lambda: rk.gram(b, [torch.ones(11, dtype=torch.bfloat16)] * 2), ShapeError, "shape"),
        (lambda: rk.gram(b, [torch.ones(10)] * 2), DTypeError, "dtype"),
        (lambda: rk.gram(torch.zeros(10, dtype=torch.int32), h), DTypeError, "float"),
        (lambda: rk.gram(b, [torch.ones(10, dtype=torch.bfloat16, device="meta")] * 2), DeviceError, "meta"),
        (lambda: rk.gram(b, []), ArgumentError, "empty"),
        (lambda: rk.combine(b, h, torch.ones(3)), ShapeError, "alphas"),
        (lambda: rk.combine(b, h, torch.ones(1, 2), out=torch.empty(2, 10, dtype=torch.bfloat16)), ShapeError, "out"),
        (lambda: rk.extrapolate_tensor(b, h, [1, 2], [5], FitOptions(rank=3)), RelexError, "rank"),
        (lambda: rk.extrapolate_tensor(b, h, [1, 2, 3], [5]), ShapeError, "steps"),
        (lambda: rk.extrapolate_state_dict({"x": b}, {1: {"x": h[0]}, 2: {}}, [5]), RelexError, "step 2"),
        (lambda: rk.extrapolate_state_dict({"x": b}, [h], [5]), ArgumentError, "mapping"),
        (lambda: rk.Fit.from_gram(torch.zeros(3, 3), [1, 2]), ShapeError, "(2, 2)"),
        (lambda: rk.extrapolate({"x": b}, {1: "a", 2: "b"}, [5], "out"), ArgumentError, "extrapolate_state_dict"),
        (lambda: rk.extrapolate("base", {1: {"x": b}, 2: {"x": b}}, [5], "out"), ArgumentError,
         "extrapolate_state_dict"),
    ]
    for fn, kind, words in cases:
        with pytest.raises(kind, match=None) as e:
            fn()
        assert words in str(e.value), (kind, str(e.value))


def test_nan_and_fp16_range_are_errors_naming_the_input():
    b = torch.zeros(100, dtype=torch.float32)
    h = [torch.full((100,), 0.1 * (i + 1)) for i in range(3)]
    h[1][7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"history\[1\] holds 1 NaN/Inf"):
        rk.gram(b, h)
    with pytest.raises(NonFiniteError, match=r"tensor w: history\[1\]"):
        rk.extrapolate_state_dict({"w": b}, {1: {"w": h[0]}, 2: {"w": h[1]}, 3: {"w": h[2]}}, [5])
    b16 = torch.full((10,), 60000.0, dtype=torch.float16)
    h16 = [torch.full((10,), 60000.0 + 100 * (i + 1), dtype=torch.float16) for i in range(3)]
    with pytest.raises(NonFiniteError, match="F16 range"):
        rk.extrapolate_tensor(b16, h16, [1, 2, 3], [400])


def test_kernels_use_the_callers_thread_count(monkeypatch):
    """Inside a host program the native kernels take torch's thread count for the call, not a
    second pool of their own; RELEX_NUM_THREADS still wins."""
    if not native.available()[0]:
        pytest.skip("native kernels not built")
    seen = []
    real = native.gram

    def spy(*a, **k):
        seen.append(native.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(native, "gram", spy)
    b = torch.zeros(1000)
    h = [torch.ones(1000)] * 2
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rk.gram(b, h, backend="cpu")
        monkeypatch.setenv("RELEX_NUM_THREADS", "2")
        rk.gram(b, h, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    assert seen == [1, 2]
    assert native._num_threads is None  # nothing left behind


def test_the_callers_thread_count_holds_for_calls_from_several_threads(monkeypatch):
    """Two Python threads calling the kernels at once: each call still takes torch's thread count
    (a setting shared by the threads, reset by whichever call ended first, let the other fall back
    to OpenMP's default: a pool of every core inside a training process)."""
    import threading
    if not native.available()[0]:
        pytest.skip("native kernels not built")
    seen, real, lock = [], native.combine, threading.Lock()

    def spy(*a, **k):
        n = native.get_num_threads()
        with lock:
            seen.append(n)
        return real(*a, **k)

    monkeypatch.setattr(native, "combine", spy)
    monkeypatch.delenv("RELEX_NUM_THREADS", raising=False)
    b, h = torch.zeros(4096), [torch.ones(4096)] * 3
    go = threading.Barrier(2)

    def work():
        go.wait()
        for _ in range(300):
            rk.combine(b, h, [0.5, 0.25, 0.25], backend="cpu")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        torch.set_num_threads(prev)
    assert len(seen) == 600 and set(seen) == {1}, sorted(set(seen))
    assert native.get_num_threads() == native._C.max_threads()  # nothing left behind


def test_the_device_path_with_a_stand_in_device(monkeypatch):
    """The device runner (packed (T+1, n) blocks, groups of chunks, device accumulators) gives the
    bits of the reference backend when its kernels are the reference's."""
    import devicedouble
    devicedouble.install(monkeypatch.setattr)
    traj = _trajectory(7, {"w": (3 * GRAM_CHUNK + 123,)}, torch.bfloat16, nonfloat=False)["w"]
    G_dev = rk.gram(traj[0], traj[1:], backend="triton")
    G_ref = rk.gram(traj[0], traj[1:], backend="reference")
    assert np.array_equal(G_dev.numpy(), G_ref.numpy())
    A = rk.Fit.from_gram(G_ref, STEPS).alphas([30, 50])
    assert _bits(rk.combine(traj[0], traj[1:], A, backend="triton")) == \
        _bits(rk.combine(traj[0], traj[1:], A, backend="reference"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dt", list(DTYPES))
def test_cuda_tensors_stay_on_the_device(dt):
    traj = _trajectory(8, {"w": (1000, 257)}, DTYPES[dt], nonfloat=False)["w"]
    dev = [x.cuda() for x in traj]
    G = rk.gram(dev[0], dev[1:])
    assert G.device.type == "cuda"
    G_cpu = rk.gram(traj[0], traj[1:])
    np.testing.assert_allclose(G.cpu().numpy(), G_cpu.numpy(), rtol=1e-4)
    A = rk.Fit.from_gram(G_cpu, STEPS).alphas([30])
    out = rk.combine(dev[0], dev[1:], A)
    assert out.device.type == "cuda"
    assert _bits(out.cpu()) == _bits(rk.combine(traj[0], traj[1:], A))  # combine is bit-exact everywhere


def test_no_assert_checks_arguments_anywhere_in_the_package():
    """`python -O` removes asserts: argument checks must be real errors."""
    root = os.path.dirname(rk.__file__)
    found = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            if fn.endswith(".py"):
                path = os.path.join(dp, fn)
                with open(path) as fh:
                    tree = ast.parse(fh.read())
                found += [f"{path}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert found == []


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, relex_kernels; assert 'torch' not in sys.modules; "
            "relex_kernels.extrapolate; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_each_target_of_a_state_dict_has_its_own_storage():
    """Keeping (or torch.save-ing) one target's tensors keeps that target's bytes, not all K."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g)}
    d = torch.randn(64, 32, generator=g)
    cks = {s: {"w": base["w"] + 1e-2 * s * d + 1e-4 * torch.randn(64, 32, generator=g)} for s in (1, 2, 3, 4)}
    preds = rk.extrapolate_state_dict(base, cks, [10, 20, 30], backend="reference")
    for t, sd in preds.items():
        w = sd["w"]
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size(), t
    one = rk.extrapolate_tensor(base["w"], [cks[s]["w"] for s in (1, 2, 3, 4)], [1, 2, 3, 4], [10],
                                backend="reference")[0]
    assert torch.equal(one, preds[10]["w"])


def test_a_tied_pair_given_by_name_is_checked():
    g = torch.Generator().manual_seed(1)
    base = {"emb": torch.randn(50, 16, generator=g), "head": torch.randn(50, 16, generator=g),
            "lin.weight": torch.randn(16, 16, generator=g)}
    cks = {s: {n: t + 1e-2 * s for n, t in base.items()} for s in (1, 2, 3)}
    with pytest.raises(ArgumentError, match=r"head head .*\(50, 16\).* embedding lin.weight .*\(16, 16\).* differ"):
        rk.extrapolate_state_dict(base, cks, [10], tied=("head", "lin.weight"), backend="reference")
    with pytest.raises(ArgumentError, match="two tensors, got 'lin.weight' twice"):
        rk.extrapolate_state_dict(base, cks, [10], tied=("lin.weight", "lin.weight"), backend="reference")
    with pytest.raises(ArgumentError, match="no \\(head, embedding\\) pair of known names \\(heads lm_head.weight"):
        rk.extrapolate_state_dict(base, cks, [10], tied=True, backend="reference")
    out = rk.extrapolate_state_dict(base, cks, [10], tied=("head", "emb"), backend="reference")[10]
    assert out["head"] is out["emb"]
    # tied=True finds the pair by name, and checks it the same way
    hf = {"model.embed_tokens.weight": torch.randn(60, 16, generator=g),
          "lm_head.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16)}
    hf_cks = {s: {n: t + 1e-2 * s for n, t in hf.items()} for s in (1, 2, 3)}
    with pytest.raises(ArgumentError, match=r"head lm_head.weight \(torch.bfloat16, \(50, 16\)\).* differ"):
        rk.extrapolate_state_dict(hf, hf_cks, [10], tied=True, backend="reference")


def test_a_lazy_handles_tied_pair_is_checked_from_its_header(tmp):
    """A safe_open base: the pair's shapes and dtypes come from the file's header, no tensor is
    loaded for the check (an embedding is the largest tensor of a model)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(2)
    sd = {"emb": torch.randn(60, 16, generator=g), "head": torch.randn(50, 16, generator=g)}
    save_file(sd, os.path.join(tmp, "base.safetensors"))

    class Counting:  # a safe_open handle that counts the tensors it loads
        def __init__(self, f):
            self.f, self.loaded = f, []

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            self.loaded.append(name)
            return self.f.get_tensor(name)

    with safe_open(os.path.join(tmp, "base.safetensors"), "pt") as f:
        base = Counting(f)
        cks = {s: {n: t + 1e-2 * s for n, t in sd.items()} for s in (1, 2, 3)}
        with pytest.raises(ArgumentError, match=r"head head \(F32, \(50, 16\)\) and embedding emb \(F32, \(60, 16\)\)"):
            rk.extrapolate_state_dict(base, cks, [10], tied=("head", "emb"), backend="reference")
        assert base.loaded == []


def test_combine_refuses_alphas_it_cannot_use_and_never_returns_inf():
    w0 = torch.zeros(100)
    hs = [torch.full((100,), float(i)) for i in (1, 2, 3)]
    cases = [(torch.zeros(0, 3), ShapeError, "K >= 1"), ("abc", ArgumentError, "alphas must be numbers"),
             ([1e39, 0, 0], NonFiniteError, "past the fp32 range"),
             ([1e38, 1e38, 1e38], NonFiniteError, "overflows torch.float32 at 100 of 100")]
    for alphas, err, words in cases:
        with pytest.raises(err, match=words):
            rk.combine(w0, hs, alphas, backend="reference")
