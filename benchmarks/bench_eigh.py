"""The T x T eigen-solve of a stack of Grams: the extension's solver against numpy's LAPACK.

Run: ``python benchmarks/bench_eigh.py`` (``--help`` for options). Writes
``benchmarks/results/eigh_cpu.json`` and ``.md``.

A run solves one T x T Gram per fitted tensor; a MoE model has thousands of tensors, and the
engine solves a group's Grams as one stack (``fit._eigh_stack``). Per T, the same stack of
run-like Grams (a dominant straight drift, weaker directions, noise; float32 products summed
in float64, like the kernels') is solved by numpy's ``eigh`` on one thread, by the engine's
former path (numpy on a Python thread pool over the cores), and by the extension's
``eigh_small`` on one thread and on every kernel thread; the calls alternate, medians of
``--repeats``. Also reported: the largest eigenvalue difference to LAPACK's, relative to the
largest eigenvalue.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine_info import cpu_model, out_stem, write_results_md  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run_like_grams(k: int, T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = 256
    t = np.arange(1, T + 1, dtype=np.float64)
    d = (t[None, :, None] * rng.standard_normal((k, 1, m))
         + 0.2 * np.sqrt(t)[None, :, None] * rng.standard_normal((k, 1, m))
         + 0.05 * rng.standard_normal((k, T, m))).astype(np.float32)
    return np.matmul(d, d.swapaxes(-1, -2)).astype(np.float64)


def numpy_pool(Gs: np.ndarray, threads: int):
    """The engine's path before the extension's solver: numpy's eigh in slices on a thread pool."""
    if threads < 2:
        return np.linalg.eigh(Gs)
    cuts = np.linspace(0, len(Gs), threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda ab: np.linalg.eigh(Gs[ab[0]:ab[1]]), zip(cuts[:-1], cuts[1:])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="4,8,16,32,48", help="Gram sizes (comma-separated, each <= the solver's max)")
    ap.add_argument("--matrices", type=int, default=3072, help="Grams per stack at T = 16 (scaled by (16/T)^2)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of each (median reported)")
    ap.add_argument("--out", type=out_stem, default=str(RESULTS / "eigh_cpu"), help="output path without extension")
    args = ap.parse_args()
    from relex_kernels.ops import native
    if not native.available()[0]:
        sys.exit("the extension is not built: pip install -e .")
    threads = native.get_num_threads()
    rows = []
    for T in (int(x) for x in args.T.split(",")):
        k = max(32, args.matrices * 256 // (T * T))
        Gs = run_like_grams(k, T, seed=T)
        calls = {
            "numpy, 1 thread": lambda: np.linalg.eigh(Gs),
            f"numpy, pool of {threads}": lambda: numpy_pool(Gs, threads),
            "native, 1 thread": lambda: (native.set_num_threads(1), native.eigh_small(Gs)),
            f"native, {threads} threads": lambda: (native.set_num_threads(threads), native.eigh_small(Gs)),
        }
        times = {name: [] for name in calls}
        try:
            for _ in range(args.repeats):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
        finally:
            native.set_num_threads(None)
        lw = np.linalg.eigvalsh(Gs)
        nw, _, ok = native.eigh_small(Gs)
        err = float(np.max(np.abs(nw - lw) / np.abs(lw).max(axis=1, keepdims=True)))
        us = {name: statistics.median(ts) / k * 1e6 for name, ts in times.items()}
        rows.append({"T": T, "matrices": k, "us_per_matrix": us, "all_solved": bool(ok.all()),
                     "max_rel_eigenvalue_diff": err})
    res = {"machine": {"cpu": cpu_model(), "simd": native._lib().simd_level(), "threads": threads},
           "command": "python benchmarks/bench_eigh.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    names = list(rows[0]["us_per_matrix"]) if rows else []
    lines = ["# T x T eigen-solves: the extension's solver vs numpy's LAPACK", "",
             f"Machine: {res['machine']['cpu']}, {threads} kernel threads (the kernels' SIMD path: "
             f"`{res['machine']['simd']}`; the solver is plain C++, the same code on every path). Run-like Grams "
             f"(float64), one stack per T; µs per matrix, medians of {args.repeats} alternating calls.", "",
             "| T | matrices | " + " | ".join(names) + " | native 1 thread vs numpy 1 thread | max eigenvalue diff |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        u = r["us_per_matrix"]
        lines.append(f"| {r['T']} | {r['matrices']} | " + " | ".join(f"{u[n]:.1f}" for n in names)
                     + f" | {u[names[0]] / u[names[2]]:.2f}x | {r['max_rel_eigenvalue_diff']:.1e} |")
    lines += ["", f"Command: `{res['command']}`"]
    write_results_md(args.out + ".md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
