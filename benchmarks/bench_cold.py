"""Cold page cache: the engine against the rate at which the machine reads the same files.

    sudo python benchmarks/bench_cold.py [--size 220m] [--steps 16] [--runs 3]

Needs root (it drops the page cache through /proc/sys/vm/drop_caches before every timed
read). In one run, interleaved, medians of ``--runs``:

* ``cat``      — the input files read one after another with 8 MiB ``read`` calls (what
                 ``cat`` does): one sequential stream;
* ``parallel`` — the same files read by one thread per file, all at once: as many
                 concurrent sequential streams as the engine has (T+1 checkpoints);
* ``engine``   — ``relex_kernels.engine.extrapolate`` (default budget, one target).

Reports each as input GB/s and the engine's rate as a fraction of each reader's.
Results: ``benchmarks/results/cold_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_model  # noqa: E402


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def read_file(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        while True:
            k = fh.readinto(buf)
            if not k:
                return n
            n += k


def timed(fn) -> float:
    drop_caches()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="220m")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "relex-bench"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cold_cpu"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cold.py drops the page cache: run it as root (no figure is measured otherwise)")
    from bench_e2e import ensure_traj, traj_files  # the same synthetic trajectories as bench_e2e

    from relex_kernels.engine import extrapolate
    from relex_kernels.ops import get_backend
    syn, _ = ensure_traj(a.cache, a.size, a.steps)
    files = traj_files(syn)
    total = sum(os.path.getsize(f) for f in files)
    out = tempfile.mkdtemp(prefix="relex-cold-")

    def cat():
        for f in files:
            read_file(f)

    def parallel():
        with ThreadPoolExecutor(len(files)) as ex:
            list(ex.map(read_file, files))

    def engine():
        extrapolate(syn.base_dir, dict(syn.checkpoints), [4 * a.steps], os.path.join(out, "o"), overwrite=True)

    times: dict[str, list[float]] = {"cat": [], "parallel": [], "engine": []}
    try:
        for _ in range(a.runs):
            for name, fn in (("cat", cat), ("parallel", parallel), ("engine", engine)):
                times[name].append(timed(fn))
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: total / v / 1e9 for k, v in med.items()}
    res = {"machine": cpu_model(), "cores": os.cpu_count(), "kernel": get_backend("cpu").identity,
           "size": a.size, "steps": a.steps, "input_bytes": total, "files": len(files), "runs": a.runs,
           "seconds": times, "median_seconds": med, "gb_per_s": rate,
           "engine_vs_cat": rate["engine"] / rate["cat"], "engine_vs_parallel": rate["engine"] / rate["parallel"]}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"Machine: {res['machine']}, {res['cores']} cores, kernel {res['kernel']}; cold page cache "
             f"(dropped before every read); {time.strftime('%Y-%m-%d')}.", "",
             f"{a.size}, T = {a.steps}, {total / 1e9:.2f} GB in {len(files)} files; medians of {a.runs} runs, "
             "interleaved.", "",
             "| reader | seconds | GB/s | engine rate / reader rate |", "|---|---|---|---|"]
    for k in ("cat", "parallel", "engine"):
        lines.append(f"| {k} | {med[k]:.2f} | {rate[k]:.2f} | {rate['engine'] / rate[k]:.2f} |")
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
