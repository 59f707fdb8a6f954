"""The host side of the device pipeline, per tensor: small tensors alone against in groups.

Run: ``python benchmarks/bench_device_host.py --workdir /tmp/mt`` (``--help`` for options).
Writes ``benchmarks/results/device_host_cpu.json`` and ``.md``.

On a GPU the engine's thread issues reads, copies and kernels and waits for the device; what
it costs per tensor beyond the bytes decides whether a MoE checkpoint (thousands of small
experts) keeps the device busy. This measures that cost without a GPU: the device pipeline
(engine/gpu.py, the ``triton`` backend) runs on the CPU with kernels that do nothing (each
Gram a fixed non-zero matrix, no combine), so what is timed is the pipeline itself — the
reader's ``preadv`` into host buffers, the copies standing in for H2D/D2H, the waits, the
host solves and the writer threads. The trajectories are ``bench_many_tensors``'
(3072 tensors of 64 x 256 against 24 dense tensors of the same bytes, bf16, T = 16), run
in-process from a warm page cache, each tensor alone (``plan.GROUP_MAX = 1``) and in groups,
interleaved; medians of ``--runs``. Not a GPU figure: kernel time, real H2D bandwidth and
the device's own waits are not in it (``benchmarks/bench_gpu.py``'s ``many`` section
measures those on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench_many_tensors import trajectories  # noqa: E402
from machine_info import cpu_model, out_stem, write_results_md  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def install_null_kernels() -> None:
    """``--backend triton`` runs the device pipeline on the CPU with kernels that do nothing."""
    import devicedouble

    class NullKernels(devicedouble.RefKernels):
        name = "null"

        def gram(self, x, n, T, dtype, acc, part, fp16_deltas=False, precision=None):
            acc += 1.0  # a tensor that moved: a non-zero Gram with a clear top direction
            acc.diagonal().add_(1.0)

        def combine(self, x, n, T, dtype, alphas, out, fp16_deltas=False):
            pass

    devicedouble.install(kernels=NullKernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    ap.add_argument("--workdir", default=None, help="where the trajectories are or go (bench_many_tensors' --workdir)")
    ap.add_argument("--out", type=out_stem, default=str(RESULTS / "device_host_cpu"),
                    help="output path without extension")
    args = ap.parse_args()
    T, n_many, n_dense = 16, 3072, 24
    work = Path(args.workdir or tempfile.mkdtemp(prefix="relex_devhost_"))
    install_null_kernels()
    from relex_kernels.engine import extrapolate, plan
    from relex_kernels.io.layout import discover
    runs: dict[str, list] = {}
    kept = plan.GROUP_MAX
    try:
        roots = trajectories(work, n_many, (64, 256), T)
        ck = {traj: discover(str(root)) for traj, root in roots.items()}
        cases = [("many", 1), ("many", kept), ("dense", 1)]
        for rep in range(args.runs + 1):  # the first round warms the page cache, untimed
            for traj, gmax in cases:
                plan.GROUP_MAX = gmax
                root, out = roots[traj], work / f"out_devhost_{traj}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                t = time.perf_counter()
                r = extrapolate(str(root / "base"), ck[traj], [10 * T], str(out), backend="triton", resume=False)
                dt = time.perf_counter() - t
                if rep:
                    runs.setdefault(f"{traj}, {'alone' if gmax == 1 else 'groups'}", []).append(
                        {"seconds": dt, "stages": r.report["device_stages"]})
    finally:
        plan.GROUP_MAX = kept
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for case, rs in runs.items():
        mid = sorted(rs, key=lambda x: x["seconds"])[(len(rs) - 1) // 2]  # the median run (the lower of two)
        rows[case] = {"median_s": mid["seconds"], "runs": [x["seconds"] for x in rs],
                      "stages_of_median_run": mid["stages"]}
    dense_s = rows["dense, alone"]["median_s"]
    for case in rows:
        rows[case]["x_dense"] = rows[case]["median_s"] / dense_s
        if case.startswith("many"):
            rows[case]["ms_per_extra_tensor"] = (rows[case]["median_s"] - dense_s) / (n_many - n_dense) * 1e3
    res = {"machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count()}, "T": T,
           "tensors": {"many": n_many, "dense": n_dense}, "cases": rows,
           "command": "python benchmarks/bench_device_host.py " + " ".join(sys.argv[1:])}
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = ["# The device pipeline's host side: small tensors alone vs in groups", "",
          f"Machine: {res['machine']['cpu']}, {os.cpu_count()} logical CPUs, no GPU: the device pipeline on the "
          f"CPU with kernels that do nothing (module docstring). {n_many} tensors of 64 x 256 against {n_dense} "
          f"dense tensors of the same bytes, bf16, T = {T}; in-process, warm page cache, medians of {args.runs}.", "",
          "| case | median s | x dense | ms per extra tensor | reader busy s | write s | runs |",
          "|---|---|---|---|---|---|---|"]
    for case, r in rows.items():
        st = r["stages_of_median_run"]
        per = f"{r['ms_per_extra_tensor']:.3f}" if "ms_per_extra_tensor" in r else ""
        md.append(f"| {case} | {r['median_s']:.2f} | {r['x_dense']:.2f} | {per} | {st['read']:.2f} | "
                  f"{st['write']:.2f} | {', '.join(f'{x:.2f}' for x in r['runs'])} |")
    md += ["", f"Command: `{res['command']}`", ""]
    write_results_md(Path(args.out).with_suffix(".md"), md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
