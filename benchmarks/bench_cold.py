"""Cold page cache: the engine against the rate at which the machine reads the same files.

    sudo python benchmarks/bench_cold.py [--size 220m] [--steps 16] [--runs 3]

Needs root (it drops the page cache through /proc/sys/vm/drop_caches before every timed
read). In one run, interleaved, medians of ``--runs``:

* ``cat``      — the input files read one after another with 8 MiB ``read`` calls (what
                 ``cat`` does): one sequential stream;
* ``parallel`` — the same files read by one thread per file, all at once: as many
                 concurrent sequential streams as the engine has (T+1 checkpoints);
* ``engine``   — ``relex_kernels.engine.extrapolate`` (default budget, one target) in a
                 process of its own (bench_e2e's child: its time excludes the interpreter's
                 start), which also reports its peak RSS and the bytes it had fetched from
                 storage (``/proc/self/io`` read_bytes): read once, they equal the input's size.

Reports each as input GB/s and the engine's rate as a fraction of each reader's. With
``--size 0.6b --steps 25`` (31 GB) the input is larger than this machine's RAM (24 GB):
the case of a real run, where pass 2 of a tensor read twice may find its pages evicted.
Results: ``benchmarks/results/cold_cpu.json`` and ``.md`` (``--out``); the notes below the
marker line of the ``.md`` survive a rerun.
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

from machine_info import cpu_model, out_stem, ram_bytes, write_results_md  # noqa: E402


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
    ap.add_argument("--out", type=out_stem, default=os.path.join(ROOT, "benchmarks", "results", "cold_cpu"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cold.py drops the page cache: run it as root (no figure is measured otherwise)")
    from bench_e2e import ENGINE, child, ensure_traj, traj_files  # the same trajectories and engine child

    from relex_kernels.ops import get_backend
    syn, _ = ensure_traj(a.cache, a.size, a.steps)
    files = traj_files(syn)
    total = sum(os.path.getsize(f) for f in files)
    out = tempfile.mkdtemp(prefix="relex-cold-")
    ram = ram_bytes()

    def cat():
        for f in files:
            read_file(f)

    def parallel():
        with ThreadPoolExecutor(len(files)) as ex:
            list(ex.map(read_file, files))

    engine_runs: list[dict] = []

    def engine():
        drop_caches()
        r = child(ENGINE, {"base": syn.base_dir, "ck": {str(k): v for k, v in syn.checkpoints.items()},
                           "target": 4 * a.steps, "out": os.path.join(out, "o"), "backend": "cpu"})
        engine_runs.append(r)
        return r["seconds"]

    times: dict[str, list[float]] = {"cat": [], "parallel": [], "engine": []}
    try:
        for _ in range(a.runs):
            for name, fn in (("cat", lambda: timed(cat)), ("parallel", lambda: timed(parallel)), ("engine", engine)):
                times[name].append(fn())
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
            r = engine_runs[-1]
            print(f"  engine: peak RSS {r['peak_rss'] / 2**20:.0f} MiB, fetched from storage "
                  f"{r['storage_read_bytes'] / total:.2f}x the input", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: total / v / 1e9 for k, v in med.items()}
    res = {"machine": cpu_model(), "cores": os.cpu_count(), "kernel": get_backend("cpu").identity,
           "size": a.size, "steps": a.steps, "input_bytes": total, "files": len(files), "runs": a.runs,
           "seconds": times, "median_seconds": med, "gb_per_s": rate,
           "engine_vs_cat": rate["engine"] / rate["cat"], "engine_vs_parallel": rate["engine"] / rate["parallel"],
           "ram_bytes": ram, "engine_peak_rss": [r["peak_rss"] for r in engine_runs],
           "engine_storage_read_bytes": [r["storage_read_bytes"] for r in engine_runs]}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"Machine: {res['machine']}, {res['cores']} cores, {ram / 2**30:.0f} GiB RAM, kernel {res['kernel']}; "
             f"cold page cache (dropped before every read); {time.strftime('%Y-%m-%d')}.", "",
             f"{a.size}, T = {a.steps}, {total / 1e9:.2f} GB in {len(files)} files; medians of {a.runs} runs, "
             "interleaved. Command: `sudo python benchmarks/bench_cold.py " + " ".join(sys.argv[1:]) + "`", "",
             "| reader | seconds | GB/s | engine rate / reader rate |", "|---|---|---|---|"]
    for k in ("cat", "parallel", "engine"):
        lines.append(f"| {k} | {med[k]:.2f} | {rate[k]:.2f} | {rate['engine'] / rate[k]:.2f} |")
    lines += ["", "Engine, per run: peak RSS " + ", ".join(f"{x / 2**20:.0f}" for x in res["engine_peak_rss"])
              + " MiB; fetched from storage " + ", ".join(f"{x / total:.2f}" for x in res["engine_storage_read_bytes"])
              + "x the input's bytes (/proc/self/io read_bytes)."]
    write_results_md(a.out + ".md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
