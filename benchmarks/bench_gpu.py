"""GPU benchmark of the device backends against the card's own bounds, measured in the same run.

Run: ``python benchmarks/bench_gpu.py`` (on a GPU; ``--smoke`` runs every code path on tiny
shapes, also on a CPU with ``TRITON_INTERPRET=1``). Writes
``benchmarks/results/gpu_<card>.json`` and ``.md``; every figure carries the card's name.

Bounds (same process, same buffers where it matters):

* device copy bandwidth: ``dst.copy_(src)`` of a large buffer, bytes read + written / s;
* tensor-core rates: ``torch.mm`` 8192² in bf16 and in TF32;
* pinned host -> device bandwidth: one large ``copy_`` from pinned memory.

Figures:

1. fused Gram on device-resident bf16 data, per backend and Gram precision: input GB/s vs
   copy bandwidth (T <= 32), and TFLOP/s (GEMM-equivalent 2·T²·n, and as executed by the
   3xTF32 split) vs the tensor-core rates (T >= 128); error against an fp64 Gram;
2. fused combine: bytes moved / s vs copy bandwidth; bit-exactness against the reference;
3. batched power iteration vs ``torch.linalg.eigh`` on the device, 400 Grams;
4. RELEX per tensor (fused Gram + T x T eigh) vs ``torch.linalg.svd`` of the delta matrix on
   the device, same tensors;
5. end to end (``relex extrapolate``) from a warm page cache: input GB/s vs pinned H2D
   bandwidth, and outputs against the reference / CPU backend (identical or <= 1 ulp);
6. many small tensors (MoE-shaped) end to end: small tensors in groups (one upload, one wait
   for the Grams, one batched solve per group) against each tensor alone, same run, same
   bytes written (identical), with the pipeline's stage seconds.

Sections 5 and 6 also time each device backend with the upload of the next group ahead of the
device wait switched off (``upload ahead`` no), in the same run: the before/after of that overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from relex_kernels.io import dtypes  # noqa: E402
from relex_kernels.ops import availability, reference  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


# -- timing --------------------------------------------------------------------------------
def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def card() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "cpu_count": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, cuda_runtime=torch.version.cuda)
    else:
        info["name"] = "CPU (no GPU: smoke run)"
    info["backends"] = {k: {"available": ok, "why": why} for k, (ok, why) in availability().items()}
    return info


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


# -- bounds --------------------------------------------------------------------------------
def bounds(s: dict) -> dict:
    out = {}
    n = s["copy_bytes"]
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src))
    out["copy_GBps"] = 2 * n / t / 1e9
    m = s["mm"]
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True)):
        a = torch.randn(m, m, device=DEV).to(dt)
        b = torch.randn(m, m, device=DEV).to(dt)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = timeit(lambda: torch.mm(a, b), repeat=5)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[f"mm_{name}_TFLOPs"] = 2 * m**3 / t / 1e12
    h = torch.empty(s["h2d_bytes"], dtype=torch.uint8, pin_memory=CUDA)
    d = torch.empty(s["h2d_bytes"], dtype=torch.uint8, device=DEV)
    t = timeit(lambda: d.copy_(h, non_blocking=True))
    out["h2d_pinned_GBps"] = s["h2d_bytes"] / t / 1e9
    return out


# -- data ----------------------------------------------------------------------------------
def block(T: int, n: int, dtype: str = "BF16", seed: int = 0):
    """(T+1, n) device tensor of storage bits: base + a near rank-1 trajectory."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    b = torch.randn(n, device=DEV, generator=g) * 0.5
    v = torch.randn(n, device=DEV, generator=g)
    rows = [b] + [b + 1e-3 * (i + 1) * v + 1e-4 * torch.randn(n, device=DEV, generator=g) for i in range(T)]
    x = torch.stack(rows)
    if dtype == "BF16":
        return x.to(torch.bfloat16).view(torch.int16)
    if dtype == "F16":
        return x.to(torch.float16).view(torch.int16)
    return x.to(torch.float32 if dtype == "F32" else torch.float64)


def deltas_f32(x, dtype, sl=slice(None)):
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
    y = x[:, sl].view(tdt).float() if tdt is not None else x[:, sl].float()
    return y[1:] - y[0]


def kernel_sets() -> dict:
    out = {}
    for name in ("triton", "cuda"):
        ok, _ = availability()[name]
        if ok:
            mod = __import__(f"relex_kernels.ops.{name}", fromlist=["device_kernels"])
            out[name] = mod.device_kernels()
    return out


# -- 1. Gram ------------------------------------------------------------------------------
def bench_gram(s: dict, kern: dict, b: dict) -> list[dict]:
    rows = []
    for T in s["gram_T"]:
        n = max(1, s["gram_bytes"] // ((T + 1) * 2))
        x = block(T, n)
        nsl = min(n, 1 << 20)
        d = deltas_f32(x, "BF16", slice(0, nsl)).double()
        exact = d @ d.T
        mag = (d.abs() @ d.abs().T).max().item()
        naive = timeit(lambda: (lambda D: D @ D.T)(deltas_f32(x, "BF16")), repeat=3) if T <= 64 or CUDA else None
        for kname, k in kern.items():
            for prec in ("ieee", "tf32x3", "tf32"):
                if T <= 8 and prec != "ieee":
                    continue  # T <= 8 never uses tensor cores: exact fp32 products whatever the precision
                acc = torch.zeros((T, T), dtype=torch.float64, device=DEV)
                part = torch.empty(k.scratch_numel(T, n), dtype=torch.float32, device=DEV)
                t = timeit(lambda: k.gram(x, n, T, "BF16", acc, part, False, prec), repeat=s["repeat"])
                acc.zero_()
                k.gram(x[:, :nsl], nsl, T, "BF16", acc, part, False, prec)
                err = (acc - exact).abs().max().item() / mag
                flops = 2 * T * T * n
                executed = flops * (3 if prec == "tf32x3" and T > 8 else 1)  # T <= 8: no tensor cores
                rows.append({"backend": kname, "T": T, "precision": prec, "n": n, "seconds": t,
                             "input_GBps": (T + 1) * n * 2 / t / 1e9,
                             "vs_copy_bw": (T + 1) * n * 2 / t / 1e9 / b["copy_GBps"],
                             "TFLOPs_gemm_equiv": flops / t / 1e12,
                             "vs_tf32_rate": flops / t / 1e12 / b["mm_tf32_TFLOPs"],
                             "vs_bf16_rate": flops / t / 1e12 / b["mm_bf16_TFLOPs"],
                             "executed_vs_tf32_rate": executed / t / 1e12 / b["mm_tf32_TFLOPs"],
                             "rel_err_vs_fp64": err,
                             "speedup_vs_torch_naive": (naive / t) if naive else None})
        x = None  # free the device data before the next size
    return rows


# -- 2. combine ---------------------------------------------------------------------------
def bench_combine(s: dict, kern: dict, b: dict) -> list[dict]:
    rows = []
    for T in s["combine_T"]:
        n = max(1, s["gram_bytes"] // ((T + 1) * 2))
        x = block(T, n)
        alphas = torch.randn(1, T, device=DEV) * 0.1
        out = torch.empty((1, n), dtype=torch.int16, device=DEV)
        nsl = min(n, 1 << 18)
        host = x[:, :nsl].cpu().numpy().view(np.uint16)
        ref = [np.zeros(nsl, np.uint16)]
        reference.combine(host[0], list(host[1:]), alphas.cpu().numpy(), "BF16", ref)
        for kname, k in kern.items():
            t = timeit(lambda: k.combine(x, n, T, "BF16", alphas, out), repeat=s["repeat"])
            o = torch.empty((1, nsl), dtype=torch.int16, device=DEV)
            k.combine(x[:, :nsl].contiguous(), nsl, T, "BF16", alphas, o)
            same = bool((o.cpu().numpy().view(np.uint16)[0] == ref[0]).all())
            moved = (T + 2) * n * 2
            rows.append({"backend": kname, "T": T, "K": 1, "n": n, "seconds": t, "GBps": moved / t / 1e9,
                         "vs_copy_bw": moved / t / 1e9 / b["copy_GBps"], "bit_exact_vs_reference": same})
        x = None  # free the device data before the next size
    return rows


# -- 3. eigensolver -----------------------------------------------------------------------
def bench_eig(s: dict, kern: dict) -> list[dict]:
    from relex_kernels.kernels.triton.eig_ref import eigh_top
    rows = []
    B, T = s["eig_B"], s["eig_T"]
    g = torch.Generator(device=DEV).manual_seed(1)
    M = (0.05 * torch.randn(B, T, 64, device=DEV, dtype=torch.float64, generator=g)
         + torch.linspace(1, 2, T, device=DEV, dtype=torch.float64)[None, :, None]
         * torch.randn(B, 1, 64, device=DEV, dtype=torch.float64, generator=g))
    G = M @ M.transpose(1, 2)
    t_eigh = timeit(lambda: eigh_top(G, 1), repeat=3)
    lam_r, U_r = eigh_top(G, 1)
    for kname, k in kern.items():
        t = timeit(lambda: k.top_eigenpairs(G, 1), repeat=3)
        lam, U, it = k.top_eigenpairs(G, 1)
        rows.append({"backend": kname, "B": B, "T": T, "seconds": t, "eigh_seconds": t_eigh,
                     "speedup_vs_eigh": t_eigh / t, "iterative_fraction": it.float().mean().item(),
                     "max_vec_err": (U - U_r).abs().max().item()})
    return rows


# -- 4. vs torch.linalg.svd ---------------------------------------------------------------
def bench_svd(s: dict, kern: dict) -> list[dict]:
    rows = []
    T, n, count = s["svd_T"], s["svd_n"], s["svd_tensors"]
    xs = [block(T, n, seed=i) for i in range(count)]

    def via_svd():
        for x in xs:
            D = deltas_f32(x, "BF16")
            torch.linalg.svd(D, full_matrices=False)

    t_svd = timeit(via_svd, repeat=2)
    for kname, k in kern.items():
        part = torch.empty(k.scratch_numel(T, n), dtype=torch.float32, device=DEV)

        def via_gram():
            for x in xs:
                acc = torch.zeros((T, T), dtype=torch.float64, device=DEV)
                k.gram(x, n, T, "BF16", acc, part)
                torch.linalg.eigh(acc)

        t = timeit(via_gram, repeat=3)
        rows.append({"backend": kname, "T": T, "n": n, "tensors": count, "seconds": t, "svd_seconds": t_svd,
                     "speedup_vs_svd": t_svd / t})
    return rows


# -- 5. end to end ------------------------------------------------------------------------
def make_trajectory(root: str, params: int, T: int, dtype: str = "BF16") -> tuple[str, dict]:
    """A synthetic run: a few transformer-like tensors, base + T checkpoints (generated on the device)."""
    hidden = 1024
    shapes = {"model.embed_tokens.weight": (max(1, params // (8 * hidden)), hidden),
              "model.norm.weight": (hidden,)}
    left = params - shapes["model.embed_tokens.weight"][0] * hidden
    i = 0
    while left > hidden * 4:
        rows = min(4 * hidden, left // hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (rows, hidden)
        left -= rows * hidden
        i += 1
    return write_trajectory(root, shapes, T, dtype)


def write_trajectory(root: str, shapes: dict, T: int, dtype: str = "BF16") -> tuple[str, dict]:
    """base/ and step_1..T/ of ``shapes``: a straight drift plus noise (generated on the device)."""
    from relex_kernels.io import write_checkpoint
    g = torch.Generator(device=DEV).manual_seed(0)
    base = {k: torch.randn(int(np.prod(v)), device=DEV, generator=g) * 0.05 for k, v in shapes.items()}
    direc = {k: torch.randn_like(v) for k, v in base.items()}
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]

    def ckpt(step: int) -> dict:
        out = {}
        for k, v in base.items():
            x = v + 1e-4 * step * direc[k] + (1e-5 * torch.randn_like(v) if step else 0)
            y = x.to(tdt)
            raw = (y.view(torch.int16) if y.element_size() == 2 else y).cpu().numpy()
            out[k] = (dtype, raw.view(dtypes.raw_numpy(dtype)).reshape(shapes[k]))
        return out

    bdir = os.path.join(root, "base")
    os.makedirs(bdir)
    write_checkpoint(bdir, ckpt(0))
    with open(os.path.join(bdir, "config.json"), "w") as fh:
        json.dump({"model_type": "bench", "tie_word_embeddings": True}, fh)
    cks = {}
    for s in range(1, T + 1):
        d = os.path.join(root, f"step_{s}")
        os.makedirs(d)
        write_checkpoint(d, ckpt(s))
        cks[s] = d
    return bdir, cks


def _ulp_diff(a_dir: str, b_dir: str) -> dict:
    from relex_kernels.io import Checkpoint
    a, b = Checkpoint(a_dir), Checkpoint(b_dir)
    total = same = 0
    worst = 0
    for n, loc in a.tensors.items():
        x = np.array(loc.file.view(n)).view(np.int16).astype(np.int64)
        y = np.array(b.tensors[n].file.view(n)).view(np.int16).astype(np.int64)
        ox = np.where(x < 0, -(x & 0x7FFF), x)
        oy = np.where(y < 0, -(y & 0x7FFF), y)
        d = np.abs(ox - oy)
        total += d.size
        same += int((d == 0).sum())
        worst = max(worst, int(d.max(initial=0)))
    a.close()
    b.close()
    return {"elements": total, "identical_fraction": same / max(total, 1), "max_ulp": worst}


@contextlib.contextmanager
def upload_ahead(on: bool):
    """The device pipeline with (the engine's default) or without the upload of the plan's next group
    before it waits for the device (engine/gpu.py ``_look_ahead``): the A/B of that overlap."""
    from relex_kernels.engine import gpu
    kept = gpu.DeviceStreamer._look_ahead
    if not on:
        gpu.DeviceStreamer._look_ahead = lambda self: None
    try:
        yield
    finally:
        gpu.DeviceStreamer._look_ahead = kept


def bench_e2e(s: dict, b: dict, work: str) -> dict:
    from relex_kernels.engine import extrapolate
    from relex_kernels.fit import FitOptions
    out = {"runs": []}
    root = os.path.join(work, "traj")
    t0 = time.perf_counter()
    base, cks = make_trajectory(root, s["e2e_params"], s["e2e_T"])
    out["generate_seconds"] = time.perf_counter() - t0
    out["trajectory_bytes"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs)
    backends = [n for n in ("cuda", "triton", "cpu") if availability()[n][0]]
    for name in backends:
        device = name != "cpu"
        # the first run warms the page cache (and compiles the Triton kernels); a device backend's
        # third runs without the upload ahead (its outputs: the same bytes, compared below)
        for rep in range(3 if device else 2):
            od = os.path.join(work, f"out_{name}_{rep}")
            with upload_ahead(rep < 2):
                r = extrapolate(base, cks, [10 * s["e2e_T"]], od, FitOptions(), backend=name, resume=False)
            if rep:
                out["runs"].append(_rate_row(r, b, backend=name, bytes_read=r.bytes_read,
                                             upload_ahead=("yes" if rep < 2 else "no") if device else ""))
        if device:
            step = f"step_{10 * s['e2e_T']}"
            out[f"{name}_upload_ahead_vs_not"] = _ulp_diff(os.path.join(work, f"out_{name}_1", step),
                                                           os.path.join(work, f"out_{name}_2", step))
    # outputs: device backends against the CPU backend (same contract) on this trajectory
    if "cpu" in backends:
        ref_dir = os.path.join(work, "out_cpu_1", f"step_{10 * s['e2e_T']}")
        out["vs_cpu_backend"] = {n: _ulp_diff(ref_dir, os.path.join(work, f"out_{n}_1", f"step_{10 * s['e2e_T']}"))
                                 for n in backends if n != "cpu"}
    # and against the numpy reference on a small trajectory
    small = os.path.join(work, "small")
    base, cks = make_trajectory(small, s["ref_params"], 8)
    extrapolate(base, cks, [80], os.path.join(small, "ref"), FitOptions(rank=2), backend="reference")
    out["vs_reference"] = {}
    for n in backends:
        extrapolate(base, cks, [80], os.path.join(small, n), FitOptions(rank=2), backend=n)
        out["vs_reference"][n] = _ulp_diff(os.path.join(small, "ref", "step_80"), os.path.join(small, n, "step_80"))
    shutil.rmtree(root, ignore_errors=True)
    return out


def _rate_row(r, b: dict, **extra) -> dict:
    """A timed run ``r`` (an extrapolate result): its seconds, input rate, and that rate against the
    pinned host-to-device copy rate of section ``b``; plus ``extra``."""
    gbps = r.bytes_read / r.seconds / 1e9
    return {**extra, "seconds": r.seconds, "input_GBps": gbps, "vs_pinned_h2d": gbps / b["h2d_pinned_GBps"]}


def bench_many(s: dict, b: dict, work: str) -> dict:
    """Section 6: a MoE-shaped trajectory on each device backend, grouped against per tensor."""
    from relex_kernels.engine import extrapolate, plan
    n, shape, T = s["many_tensors"], s["many_shape"], s["many_T"]
    root = os.path.join(work, "many")
    t0 = time.perf_counter()
    base, cks = write_trajectory(root, {f"model.layers.{i // 128}.mlp.experts.{i % 128}.down_proj.weight": shape
                                        for i in range(n)}, T)
    out = {"tensors": n, "shape": list(shape), "T": T, "generate_seconds": time.perf_counter() - t0, "runs": []}
    kept = plan.GROUP_MAX
    try:
        for name in [x for x in ("cuda", "triton") if availability()[x][0]]:
            for mode, gmax, ahead in (("per tensor", 1, True), ("grouped", kept, True),
                                      ("grouped, no upload ahead", kept, False)):
                plan.GROUP_MAX = gmax
                # one untimed run per backend first: it warms the page cache and compiles the kernels
                for _ in range(2 if mode == "per tensor" else 1):
                    od = os.path.join(work, f"many_{name}_{gmax}" + ("" if ahead else "_alone"))
                    shutil.rmtree(od, ignore_errors=True)
                    with upload_ahead(ahead):
                        r = extrapolate(base, cks, [10 * T], od, backend=name, resume=False)
                out["runs"].append(_rate_row(r, b, backend=name, mode=mode,
                                             **{f"{k}_s": v for k, v in r.report.get("device_stages", {}).items()}))
            a, c = (os.path.join(work, f"many_{name}_{m}", f"step_{10 * T}") for m in (1, kept))
            out[f"{name}_grouped_vs_per_tensor"] = _ulp_diff(a, c)
            out[f"{name}_upload_ahead_vs_not"] = _ulp_diff(c, os.path.join(work, f"many_{name}_{kept}_alone",
                                                                           f"step_{10 * T}"))
    finally:
        plan.GROUP_MAX = kept
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- report -------------------------------------------------------------------------------
SIZES = {
    "full": dict(copy_bytes=2 << 30, mm=8192, h2d_bytes=1 << 30, gram_bytes=3 << 30, gram_T=[8, 16, 32, 128],
                 combine_T=[8, 32, 128], eig_B=400, eig_T=100, svd_T=32, svd_n=4 << 20, svd_tensors=4,
                 e2e_params=128 << 20, e2e_T=15, ref_params=4 << 20, repeat=5,
                 many_tensors=1024, many_shape=(256, 512), many_T=15),
    "smoke": dict(copy_bytes=1 << 20, mm=256, h2d_bytes=1 << 20, gram_bytes=60_000, gram_T=[3, 17],
                  combine_T=[3], eig_B=3, eig_T=5, svd_T=4, svd_n=3000, svd_tensors=2,
                  e2e_params=40_000, e2e_T=3, ref_params=20_000, repeat=1,
                  many_tensors=40, many_shape=(16, 8), many_T=3),
}


def table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |\n" for r in rows)


def markdown(res: dict) -> str:
    c = res["card"]
    lines = [f"# GPU benchmark on {c['name']}", "",
             f"torch {c['torch']}, triton {c['triton']}, CUDA {c.get('cuda_runtime')}, "
             f"capability {c.get('capability')}, {c.get('memory_gib')} GiB; run {res['date']} "
             f"({res['seconds']:.0f} s, sizes '{res['sizes']}')", ""]
    if "bounds" in res:
        lines += ["## Bounds measured in this run", "", table([res["bounds"]], list(res["bounds"])), ""]
    for sec, keys in (("gram", ["backend", "T", "precision", "input_GBps", "vs_copy_bw", "TFLOPs_gemm_equiv",
                                "vs_tf32_rate", "vs_bf16_rate", "executed_vs_tf32_rate", "rel_err_vs_fp64",
                                "speedup_vs_torch_naive"]),
                      ("combine", ["backend", "T", "K", "GBps", "vs_copy_bw", "bit_exact_vs_reference"]),
                      ("eig", ["backend", "B", "T", "seconds", "eigh_seconds", "speedup_vs_eigh",
                               "iterative_fraction", "max_vec_err"]),
                      ("svd", ["backend", "T", "n", "tensors", "seconds", "svd_seconds", "speedup_vs_svd"])):
        if isinstance(res.get(sec), list):
            lines += [f"## {sec}", "", table(res[sec], keys), ""]
    if isinstance(res.get("e2e"), dict) and "runs" in res["e2e"]:
        e = res["e2e"]
        lines += ["## end to end (warm page cache)", "",
                  f"trajectory {e['trajectory_bytes'] / 1e9:.2f} GB, generated in {e['generate_seconds']:.0f} s", "",
                  table(e["runs"], ["backend", "upload_ahead", "seconds", "bytes_read", "input_GBps",
                                    "vs_pinned_h2d"]), "",
                  "outputs vs reference backend (rank 2, small run): " + json.dumps(e.get("vs_reference")), "",
                  "outputs vs cpu backend (large run): " + json.dumps(e.get("vs_cpu_backend")), "",
                  "outputs with vs without the upload ahead: " + json.dumps({k: v for k, v in e.items()
                                                                            if k.endswith("_upload_ahead_vs_not")}), ""]
    if isinstance(res.get("many"), dict) and "runs" in res["many"]:
        m = res["many"]
        lines += [f"## many small tensors: {m['tensors']} x {m['shape']} bf16, T = {m['T']}", "",
                  table(m["runs"], ["backend", "mode", "seconds", "input_GBps", "vs_pinned_h2d", "wait_read_s",
                                    "wait_gram_s", "wait_out_s", "wait_write_s"]), "",
                  "grouped outputs vs per tensor, and with vs without the upload ahead: "
                  + json.dumps({k: v for k, v in m.items() if k.endswith(("_vs_per_tensor", "_upload_ahead_vs_not"))}),
                  ""]
    errs = {k: v for k, v in res.items() if isinstance(v, dict) and "error" in v}
    if errs:
        lines += ["## sections that failed", ""] + [f"- {k}: {v['error'].splitlines()[-1]}" for k, v in errs.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: exercise every path (CPU allowed)")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--only", nargs="*", help="sections to run (bounds gram combine eig svd e2e many)")
    ap.add_argument("--work", help="scratch directory for the end-to-end trajectory (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = "smoke" if args.smoke or not CUDA else "full"
    s = SIZES[sizes]
    t0 = time.perf_counter()
    res = {"card": card(), "sizes": sizes, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"card: {res['card']['name']}", flush=True)
    kern = kernel_sets()
    want = set(args.only or ["bounds", "gram", "combine", "eig", "svd", "e2e", "many"])
    work = args.work or tempfile.mkdtemp(prefix="relex_bench_")
    sections = [("bounds", lambda: bounds(s)), ("gram", lambda: bench_gram(s, kern, res["bounds"])),
                ("combine", lambda: bench_combine(s, kern, res["bounds"])), ("eig", lambda: bench_eig(s, kern)),
                ("svd", lambda: bench_svd(s, kern)), ("e2e", lambda: bench_e2e(s, res["bounds"], work)),
                ("many", lambda: bench_many(s, res["bounds"], work))]
    name = None
    try:
        for name, fn in sections:
            if name not in want and not (name == "bounds" and want):
                continue
            t1 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception:
                res[name] = {"error": traceback.format_exc()}
            print(f"{name}: {time.perf_counter() - t1:.1f} s", flush=True)
            if CUDA:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # gpu_check.sh's time limit (timeout -s INT): keep what is measured
        if name is not None:
            res[name] = res.get(name) or {"error": "interrupted (time limit)"}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = f"gpu_{slug(res['card']['name'])}" + ("_smoke" if sizes == "smoke" else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    md = markdown(res)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(md)
    print(md)
    return 1 if any(isinstance(v, dict) and "error" in v for v in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
