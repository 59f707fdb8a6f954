"""How an output's bytes get to the disk: three ways side by side, CPU seconds and wall time.

    python benchmarks/bench_write.py                  # 0.44 GB (the 220m end-to-end output), 7 rounds
    python benchmarks/bench_write.py --gb 4 --rounds 3 --dir /mnt/nvme/tmp

* ``map``     — the engine's way before the direct writer: the file preallocated, written
                through a shared memory map in 8 MiB pieces, each piece's pages released and its
                write-back started (``MADV_DONTNEED`` + ``POSIX_FADV_DONTNEED``), then ``fdatasync``;
* ``pwrite``  — the same file written with ``pwrite`` from one reused 8 MiB buffer (the page
                cache path, what ``RELEX_DIRECT_WRITE=0`` gives), then ``fdatasync``;
* ``direct``  — :class:`relex_kernels.io.direct.WriteQueue`, as the engine writes now: staged
                8 MiB chunks, ``O_DIRECT`` writes on the writer thread, then ``fdatasync``.

Each way fills its buffer with the same values (the kernel's stores), so the ways differ only in
how the bytes reach the file. The ways are interleaved round by round, each round into a fresh
file, with ``--pause`` seconds before each (a VM that hands idle guest memory back to its host
makes the next fresh pages cost a host fault each: the pause lets that happen, as it does between
a run's tensors). CPU seconds are this process's (user + system, all threads). Results:
``benchmarks/results/write_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_model, out_stem, write_results_md  # noqa: E402
from relex_kernels.io import direct  # noqa: E402

PIECE = 8 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fill(arr: np.ndarray, o: int) -> None:
    arr[...] = o >> 20 & 255  # the kernel's stores into the output (a value per piece)


def way_map(path: str, n: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, n)
        mm = mmap.mmap(fd, n, access=mmap.ACCESS_WRITE)
        a = np.frombuffer(mm, dtype=np.uint8)
        for o in range(0, n, PIECE):
            m = min(PIECE, n - o)
            _fill(a[o:o + m], o)
            mm.madvise(mmap.MADV_DONTNEED, o, m)
            os.posix_fadvise(fd, o, m, os.POSIX_FADV_DONTNEED)
        del a
        mm.flush()
        mm.close()
        os.fdatasync(fd)
    finally:
        os.close(fd)


def way_pwrite(path: str, n: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, n)
        buf = np.empty(PIECE, dtype=np.uint8)
        for o in range(0, n, PIECE):
            m = min(PIECE, n - o)
            _fill(buf[:m], o)
            os.pwrite(fd, buf[:m], o)
            os.posix_fadvise(fd, o, m, os.POSIX_FADV_DONTNEED)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def way_direct(path: str, n: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    target, q = direct.Target(path, fd), direct.WriteQueue(chunk_bytes=PIECE)
    try:
        if target.dfd is None:
            raise SystemExit(f"{path}: this file system refuses O_DIRECT; choose another --dir")
        os.posix_fallocate(fd, 0, n)
        for s, e in direct.chunk_cuts(0, n, q.chunk_bytes):
            arr = q.stage(s, e - s, np.uint8)
            _fill(arr, s)
            q.commit(target, s, arr)
        q.drain()
        os.fdatasync(fd)
    finally:
        q.close()
        target.close()
        os.close(fd)


WAYS = {"map": way_map, "pwrite": way_pwrite, "direct": way_direct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=0.4428, help="bytes written per way and round, in GB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds idle before each write")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (the output's disk)")
    ap.add_argument("--out", type=out_stem, default=os.path.join(ROOT, "benchmarks", "results", "write_cpu"))
    a = ap.parse_args()
    n = int(a.gb * 1e9)
    work = tempfile.mkdtemp(prefix="relex-bench-write-", dir=a.dir)
    res: dict[str, list] = {w: [] for w in WAYS}
    try:
        for r in range(a.rounds):
            for w, fn in WAYS.items():
                path = os.path.join(work, w)
                if os.path.exists(path):
                    os.unlink(path)
                time.sleep(a.pause)
                c0, t0 = _cpu(), time.perf_counter()
                fn(path, n)
                res[w].append((_cpu() - c0, time.perf_counter() - t0))
                print(f"round {r + 1} {w:7s} cpu {res[w][-1][0]:.3f} s  wall {res[w][-1][1]:.3f} s", flush=True)
    finally:
        for f in os.listdir(work):
            os.unlink(os.path.join(work, f))
        os.rmdir(work)
    doc = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "bytes": n, "rounds": a.rounds, "pause_s": a.pause, "dir": a.dir, "runs": res}
    with open(a.out + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    lines = [f"Machine: {doc['machine']}; {n / 1e9:.2f} GB per write, into `{a.dir}`; {a.rounds} rounds, "
             f"ways interleaved, {a.pause:g} s idle before each; {doc['date']}.", "",
             f"`python benchmarks/bench_write.py --gb {a.gb:g} --rounds {a.rounds} --pause {a.pause:g}`", "",
             "| way | CPU s, median (min-max) | wall s incl. fdatasync, median (min-max) | GB/s (wall) |",
             "|---|---|---|---|"]
    for w, runs in res.items():
        c, t = [x[0] for x in runs], [x[1] for x in runs]
        lines.append(f"| {w} | {statistics.median(c):.3f} ({min(c):.3f}-{max(c):.3f}) | "
                     f"{statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) | {n / statistics.median(t) / 1e9:.2f} |")
    write_results_md(a.out + ".md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
