"""CPU kernel benchmark: native ``gram`` / ``combine`` against the machine's bounds.

Run: ``python benchmarks/bench_kernels.py`` (``--help`` for options). Writes
``benchmarks/results/kernels_cpu.json`` and ``kernels_cpu.md``.

Every figure is given next to a bound measured in the same run, on the same
buffers and with the same threads:

* read bandwidth: ``_C.read_probe`` streams the very bytes the kernel reads;
* fp32 GEMM rate: ``torch.mm`` (numpy ``matmul`` without torch) of 2048 x 2048.

Bounds and kernels are timed interleaved, repeat by repeat, and medians are
reported, so that load from other processes hits both alike (the load average
is recorded). Gram FLOPs count the upper triangle the kernel computes,
T(T+1) per element; a GEMM of the full T x T Gram would do 2T² (reported as
"gemm-equivalent"). The reference (numpy) and a naive torch Gram (materialised
fp32 deltas, one mm) run on a slice of the data; their throughput is size
independent at these sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relex_kernels.io import dtypes  # noqa: E402
from relex_kernels.ops import native, reference  # noqa: E402
from machine_info import cpu_model, out_stem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads)."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def gemm_rate(threads: int) -> tuple[callable, float, str]:
    """A callable running one fp32 GEMM, its FLOPs and what it is."""
    m = 2048
    try:
        import torch

        torch.set_num_threads(threads)
        a, b = torch.randn(m, m), torch.randn(m, m)
        return (lambda: torch.mm(a, b)), 2.0 * m**3, f"torch {torch.__version__} mm fp32 {m}^3, {threads} threads"
    except ImportError:
        a = np.random.default_rng(0).standard_normal((m, m), dtype=np.float32)
        return (lambda: a @ a), 2.0 * m**3, f"numpy matmul fp32 {m}^3 (BLAS threads: its own)"


def torch_naive_gram(base: np.ndarray, hist: list[np.ndarray]):
    """The naive PyTorch way: fp32 deltas materialised, one matmul (None without torch)."""
    try:
        import torch
    except ImportError:
        return None

    def run():
        b = torch.from_numpy(base.view(np.int16)).view(torch.bfloat16).float()
        d = torch.stack([torch.from_numpy(h.view(np.int16)).view(torch.bfloat16).float() - b for h in hist])
        return (d @ d.T).double()

    return run


def make_inputs(n: int, T: int, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """bf16 weights ~ N(0, 0.02) and checkpoints drifting along one direction (like RLVR)."""
    b32 = (0.02 * rng.standard_normal(n, dtype=np.float32))
    direction = rng.standard_normal(n, dtype=np.float32)
    base = dtypes.from_float32(b32, "BF16")
    hist = []
    for i in range(T):
        h = b32 + np.float32(2e-4 * (i + 1)) * direction
        hist.append(dtypes.from_float32(h, "BF16"))
    return base, hist


def stats(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}


def bench_T(T: int, total: int, repeats: int, threads: int, gemm, slice_frac: float, rng) -> dict:
    n = total // (T + 1)
    base, hist = make_inputs(n, T, rng)
    read_bytes = (T + 1) * n * 2
    K = 1
    alphas = rng.standard_normal((K, T)).astype(np.float32)
    outs = [np.empty_like(base) for _ in range(K)]
    acc = np.zeros((T, T))
    gemm_fn, gemm_flops, _ = gemm

    for fn in (lambda: native.read_bandwidth_probe([base] + hist), lambda: native.gram(base, hist, "BF16", acc),
               lambda: native.combine(base, hist, alphas, "BF16", outs), gemm_fn):
        fn()  # warm: page faults, thread pools
    runs = {"read": [], "gram": [], "comb": [], "gemm": []}
    for _ in range(repeats):
        runs["read"].append(timed2(lambda: native.read_bandwidth_probe([base] + hist)))
        runs["gram"].append(timed2(lambda: native.gram(base, hist, "BF16", acc)))
        runs["comb"].append(timed2(lambda: native.combine(base, hist, alphas, "BF16", outs)))
        runs["gemm"].append(timed2(gemm_fn))
        time.sleep(0.05)  # let the GEMM library's spinning threads go to sleep
    t_read, t_gram, t_comb, t_gemm = ([w for w, _ in runs[k]] for k in ("read", "gram", "comb", "gemm"))
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}

    # baselines on a slice (their speed does not depend on the size at these sizes)
    m = max(reference.GRAM_CHUNK, int(n * slice_frac) // reference.GRAM_CHUNK * reference.GRAM_CHUNK)
    m = min(m, n)
    sb, sh = base[:m], [h[:m] for h in hist]
    sacc = np.zeros((T, T))
    souts = [np.empty_like(sb) for _ in range(K)]
    nb = max(3, repeats // 2)

    def baseline(fn):
        if fn is None:
            return None
        fn()  # warm, then let other libraries' spinning threads settle
        time.sleep(0.1)
        return [timed(fn) for _ in range(nb)]

    t_ref_gram = baseline(lambda: reference.gram(sb, sh, "BF16", sacc))
    t_ref_comb = baseline(lambda: reference.combine(sb, sh, alphas, "BF16", souts))
    t_naive = baseline(torch_naive_gram(sb, sh))

    med = statistics.median
    read_gbs = read_bytes / med(t_read) / 1e9
    gemm_gfs = gemm_flops / med(t_gemm) / 1e9
    gram_gbs = read_bytes / med(t_gram) / 1e9
    gram_gfs = T * (T + 1) * n / med(t_gram) / 1e9
    comb_bytes = read_bytes + K * n * 2
    comb_gbs = comb_bytes / med(t_comb) / 1e9
    m_bytes = (T + 1) * m * 2
    return {
        "T": T, "n": n, "K": K, "dtype": "BF16", "input_bytes": read_bytes,
        "read_probe": {**stats(t_read), "GB/s": read_gbs},
        "gemm": {**stats(t_gemm), "GFLOP/s": gemm_gfs},
        "gram_native": {**stats(t_gram), "GB/s": gram_gbs, "GFLOP/s": gram_gfs,
                        "GFLOP/s_gemm_equivalent": 2 * T * T * n / med(t_gram) / 1e9,
                        "pct_of_read_bw": 100 * gram_gbs / read_gbs, "pct_of_gemm": 100 * gram_gfs / gemm_gfs},
        "combine_native": {**stats(t_comb), "GB/s": comb_gbs, "pct_of_read_bw": 100 * comb_gbs / read_gbs},
        # per CPU-second of this process's threads: insensitive to time slices lost to other processes
        "per_cpu_second": {
            "read_GB": read_bytes / cpu["read"] / 1e9, "gram_GB": read_bytes / cpu["gram"] / 1e9,
            "gram_GFLOP": T * (T + 1) * n / cpu["gram"] / 1e9, "gemm_GFLOP": gemm_flops / cpu["gemm"] / 1e9,
            "combine_GB": comb_bytes / cpu["comb"] / 1e9,
            "gram_pct_of_read": 100 * cpu["read"] / cpu["gram"],
            "gram_pct_of_gemm": 100 * (T * (T + 1) * n / cpu["gram"]) / (gemm_flops / cpu["gemm"]),
            "combine_pct_of_read": 100 * (comb_bytes / cpu["comb"]) / (read_bytes / cpu["read"]),
        },
        "baselines_on_slice": {
            "elements": m,
            "gram_reference_GB/s": m_bytes / med(t_ref_gram) / 1e9,
            "combine_reference_GB/s": (m_bytes + K * m * 2) / med(t_ref_comb) / 1e9,
            "gram_torch_naive_GB/s": (m_bytes / med(t_naive) / 1e9) if t_naive else None,
        },
    }


def markdown(res: dict) -> str:
    mc, cfg = res["machine"], res["config"]
    lines = [
        "# CPU kernels: native vs bounds",
        "",
        f"Machine: **{mc['cpu']}**, {mc['logical_cpus']} logical CPUs; SIMD path `{cfg['simd']}`, "
        f"{cfg['threads']} threads; load average {cfg['loadavg_start']} -> {cfg['loadavg_end']} "
        "(other processes shared the machine when this is above 0).",
        f"bf16 inputs, ~{cfg['elements_per_call'] / 1e6:.0f}M elements per call (base + T history), "
        f"medians of {cfg['repeats']} interleaved runs. GEMM bound: {cfg['gemm']}.",
        "Command: `" + cfg["command"] + "`",
        "",
        "| T | read bound GB/s | gram GB/s | % read | gram GFLOP/s | GEMM GFLOP/s | % GEMM | combine GB/s | % read "
        "| reference gram GB/s | torch naive gram GB/s | reference combine GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        g, c, b = r["gram_native"], r["combine_native"], r["baselines_on_slice"]
        naive = f"{b['gram_torch_naive_GB/s']:.2f}" if b["gram_torch_naive_GB/s"] else "-"
        lines.append(
            f"| {r['T']} | {r['read_probe']['GB/s']:.1f} | {g['GB/s']:.1f} | {g['pct_of_read_bw']:.0f}% "
            f"| {g['GFLOP/s']:.1f} | {r['gemm']['GFLOP/s']:.1f} | {g['pct_of_gemm']:.0f}% "
            f"| {c['GB/s']:.1f} | {c['pct_of_read_bw']:.0f}% "
            f"| {b['gram_reference_GB/s']:.2f} | {naive} | {b['combine_reference_GB/s']:.2f} |")
    lines += [
        "",
        "Per CPU-second of the process's threads (the same runs; what a core achieves while it runs, "
        "whatever share of the machine other processes took):",
        "",
        "| T | read GB/cpu-s | gram GB/cpu-s | % read | gram GFLOP/cpu-s | GEMM GFLOP/cpu-s | % GEMM "
        "| combine GB/cpu-s | % read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        p = r["per_cpu_second"]
        lines.append(f"| {r['T']} | {p['read_GB']:.1f} | {p['gram_GB']:.1f} | {p['gram_pct_of_read']:.0f}% "
                     f"| {p['gram_GFLOP']:.1f} | {p['gemm_GFLOP']:.1f} | {p['gram_pct_of_gemm']:.0f}% "
                     f"| {p['combine_GB']:.1f} | {p['combine_pct_of_read']:.0f}% |")
    lines += [
        "",
        "gram GFLOP/s counts T(T+1) flops per element (the upper triangle the kernel computes); "
        "combine GB/s counts bytes read plus bytes written. Targets: gram >= 70% of read bandwidth "
        "while memory-bound, >= 60% of GEMM when compute-bound (T = 64); combine >= 70% of read bandwidth.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="4,16,64", help="history lengths (comma separated)")
    ap.add_argument("--elements", type=float, default=150e6, help="elements read per call, base + history")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per kernel (median reported; >= 5)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: the backend's default)")
    ap.add_argument("--slice", type=float, default=0.25, help="fraction of the data the slow baselines run on")
    ap.add_argument("--out", type=out_stem, default=str(RESULTS / "kernels_cpu"), help="output path without extension")
    args = ap.parse_args(argv)

    ok, why = native.available()
    if not ok:
        print(f"native kernels unavailable: {why}", file=sys.stderr)
        return 1
    if args.threads:
        native.set_num_threads(args.threads)
    threads = native.get_num_threads()
    gemm = gemm_rate(threads)
    rng = np.random.default_rng(0)
    res = {
        "machine": machine(),
        "config": {"simd": native.info()["simd"], "threads": threads, "repeats": args.repeats,
                   "elements_per_call": args.elements, "gemm": gemm[2], "loadavg_start": loadavg(),
                   "command": "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "native_info": native.info()},
        "results": [],
    }
    for T in (int(t) for t in args.T.split(",")):
        r = bench_T(T, int(args.elements), args.repeats, threads, gemm, args.slice, rng)
        res["results"].append(r)
        g, c = r["gram_native"], r["combine_native"]
        print(f"T={T:3d}: read {r['read_probe']['GB/s']:6.1f} GB/s | gram {g['GB/s']:6.1f} GB/s "
              f"({g['pct_of_read_bw']:3.0f}%), {g['GFLOP/s']:6.1f} GFLOP/s ({g['pct_of_gemm']:3.0f}% of GEMM "
              f"{r['gemm']['GFLOP/s']:.1f}) | combine {c['GB/s']:6.1f} GB/s ({c['pct_of_read_bw']:3.0f}%) | "
              f"reference gram {r['baselines_on_slice']['gram_reference_GB/s']:.2f} GB/s", flush=True)
    res["config"]["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
