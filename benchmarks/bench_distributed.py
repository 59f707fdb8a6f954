"""Scaling of ``relex extrapolate`` from 1 to N processes (torchrun, gloo) on one machine.

    python benchmarks/bench_distributed.py                   # 220m, T=8, 1 vs 2 processes
    python benchmarks/bench_distributed.py --procs 1 2 4 --size small

Side by side, from a warm page cache, medians of ``--runs``:

* bound     — the trajectory's bytes at the measured read bandwidth of this machine
              (every page touched through a read-only map, as the engine does);
* 1 process — the plain command, every core (OpenMP threads = cores);
* 1 x 1     — one process, one thread: what each rank of a torchrun job gets here;
* torchrun  — ``torchrun --nproc-per-node N -m relex_kernels extrapolate``, one thread
              per rank (torchrun's default); its output is compared byte for byte
              with the single-process one.

``wall`` includes starting Python (and torch, for torchrun) and joining the process
group; ``engine`` is the run itself as its report gives it; ``CPU`` is user + system
time of every process. Contenders run round robin, so background load hits them alike. Results:
``benchmarks/results/distributed_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import ensure_traj, machine, read_bandwidth, traj_files, warm  # noqa: E402
from machine_info import out_stem  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(syn, out: str, procs: int, threads: int | None, target: int) -> dict:
    args = ["extrapolate", "--base", syn.base_dir, "--checkpoints", syn.run_dir, "--target-step", str(target),
            "--out", out, "--overwrite", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["RELEX_NUM_THREADS"] = str(threads)
    if procs == 1:
        cmd = [sys.executable, "-m", "relex_kernels", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(free_port()), "-m", "relex_kernels", *args]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    d = rep.get("distributed", {})
    return {"wall": wall, "cpu": cpu, "engine": rep["seconds"], "bytes_read": rep["bytes_read"],
            "bytes_by_rank": d.get("bytes_read_by_rank", [rep["bytes_read"]]),
            "split": sorted(d.get("split_tensors", {}))}


def same_output(a: str, b: str) -> bool:
    fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
    return fa == fb and all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in fa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="220m")
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--procs", type=int, nargs="+", default=[2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join("/tmp", "relex-bench"))
    ap.add_argument("--out", type=out_stem, default=os.path.join(ROOT, "benchmarks", "results", "distributed_cpu"))
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    syn, label = ensure_traj(a.cache, a.size, a.T)
    files = traj_files(syn)
    warm(files)
    traj_bytes = sum(os.path.getsize(f) for f in files)
    bw = read_bandwidth(files)
    target = 10 * a.T
    outs = os.path.join(a.cache, f"dist-out-{label}-T{a.T}")
    contenders = [("1 process", 1, None), ("1 x 1 thread", 1, 1)] + [(f"torchrun {n} x 1 thread", n, 1)
                                                                       for n in a.procs]
    load_start = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for _ in range(a.runs):  # round robin: every contender sees the same background load
        for name, procs, threads in contenders:
            warm(files)
            results[name].append(run_once(syn, os.path.join(outs, name.replace(" ", "_")), procs, threads, target))
    rows = []
    ref = os.path.join(outs, contenders[0][0].replace(" ", "_"), f"step_{target}")
    for name, procs, threads in contenders:
        runs = results[name]
        step_dir = os.path.join(outs, name.replace(" ", "_"), f"step_{target}")
        row = {"contender": name, "processes": procs, "threads_per_process": threads or os.cpu_count(),
               "wall_s": statistics.median(r["wall"] for r in runs),
               "engine_s": statistics.median(r["engine"] for r in runs),
               "cpu_s": statistics.median(r["cpu"] for r in runs),
               "engine_runs_s": [r["engine"] for r in runs], "wall_runs_s": [r["wall"] for r in runs],
               "bytes_read": runs[-1]["bytes_read"], "bytes_by_rank": runs[-1]["bytes_by_rank"],
               "split_tensors": runs[-1]["split"], "identical_to_1_process": same_output(ref, step_dir)}
        row["engine_GBps"] = row["bytes_read"] / row["engine_s"] / 1e9
        rows.append(row)
        print(f"{name:24s} wall {row['wall_s']:6.2f} s  engine {row['engine_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s  "
              f"{row['engine_GBps']:5.2f} GB/s  identical={row['identical_to_1_process']}", flush=True)
    base = rows[0]["engine_s"]
    for r in rows:
        r["engine_speedup_vs_1_process"] = base / r["engine_s"]
        r["wall_speedup_vs_1_process"] = rows[0]["wall_s"] / r["wall_s"]
    res = {"machine": machine(), "load_average_start": load_start, "load_average": os.getloadavg(), "size": label, "T": a.T,
           "trajectory_bytes": traj_bytes, "read_bandwidth_Bps": bw, "bound_s": traj_bytes / bw,
           "target": target, "runs": a.runs, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    md = to_markdown(res)
    with open(a.out + ".md", "w") as fh:
        fh.write(md)
    print(md)


def to_markdown(res: dict) -> str:
    lines = [f"Scaling on {res['machine']} (1-min load average {res['load_average_start'][0]:.1f} at the start, "
             f"{res['load_average'][0]:.1f} at the end: other jobs shared the cores); "
             f"synthetic {res['size']}, T = {res['T']}, trajectory {res['trajectory_bytes'] / 1e9:.2f} GB, warm "
             f"page cache, medians of {res['runs']}. Bound: {res['bound_s']:.2f} s at the measured "
             f"{res['read_bandwidth_Bps'] / 1e9:.2f} GB/s read bandwidth.", "",
             "| contender | engine s | GB/s | vs 1 process | wall s (incl. startup) | CPU s (all processes) "
             "| bytes read by rank (GB) | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        by = ", ".join(f"{b / 1e9:.2f}" for b in r["bytes_by_rank"])
        lines.append(f"| {r['contender']} | {r['engine_s']:.2f} | {r['engine_GBps']:.2f} | "
                     f"{r['engine_speedup_vs_1_process']:.2f}x | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {by} | "
                     f"{'yes' if r['identical_to_1_process'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
