"""The native Gram kernel of two commits side by side: speed, and whether the bits are the same.

    python benchmarks/bench_gram_ab.py --before 673aa76            # that commit vs the working tree
    python benchmarks/bench_gram_ab.py --before 673aa76 --simd avx2 --T 8,16,32,64,128

Builds ``benchmarks/gram_ab/harness.cpp`` twice, against ``csrc/cpu`` of ``--before`` (from git)
and of the working tree (``--after``: a commit too, if given), with the extension's compiler
flags; runs ``relex::gram`` on one thread (8M bf16 elements by default), the two builds
alternating round by round, and reports the median GFLOP/s of each (T(T+1) flops per element, over
the thread's CPU time, as ``bench_gram_core.py`` times the extension: steal time on a shared VM is
not the kernel's).
Every round also hashes the fp64 Grams: a kernel change that keeps the summation order prints
"same bits" for every T, dtype and fp16-delta mode checked (``--check`` lists them).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine_info import cpu_model  # noqa: E402
from relex_kernels.io.dtypes import DTYPE_CODES  # noqa: E402
HARNESS = Path(__file__).resolve().parent / "gram_ab" / "harness.cpp"


def extension_flags() -> list[str]:
    """The compiler flags of the extension's build: Python's (CFLAGS, CCSHARED), then setup.py's
    ``_CPU_COMPILE_ARGS`` (read from setup.py, not copied: a copy had already drifted)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    ours = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "_CPU_COMPILE_ARGS" for t in node.targets))
    python = [f for var in ("CFLAGS", "CCSHARED") for f in shlex.split(sysconfig.get_config_var(var) or "")]
    return python + ours


def sources(rev: str | None, into: Path) -> Path:
    """csrc/cpu of commit ``rev`` (None: the working tree) under ``into``."""
    if rev is None:
        return ROOT / "csrc" / "cpu"
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc/cpu"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "csrc" / "cpu"


def build(src: Path, out: Path) -> Path:
    cpp = sorted(str(p) for p in src.glob("*.cpp"))
    subprocess.run(["g++", *extension_flags(), f"-I{src}", *cpp, str(HARNESS), "-o", str(out)], check=True)
    return out


def run(exe: Path, simd: str, n: int, repeats: int, dtype: str, Ts: str, f16: bool) -> dict[int, tuple[float, str]]:
    out = subprocess.run([str(exe), simd, str(n), str(repeats), str(DTYPE_CODES[dtype]), Ts, str(int(f16))],
                         check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        _, T, _, rate, _, h = line.split()
        res[int(T)] = (float(rate), h)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="commit of the 'before' kernel")
    ap.add_argument("--after", default=None, help="commit of the 'after' kernel (default: the working tree)")
    ap.add_argument("--simd", default="avx512", help="SIMD path: avx512, avx2, scalar")
    ap.add_argument("--T", default="8,16,32,64,128", help="history lengths (comma separated)")
    ap.add_argument("--elements", type=int, default=8_000_000)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--check", default="BF16:0,F16:1,F32:0,F64:0",
                    help="dtype:fp16_deltas pairs whose bits are compared (T = 1..100, odd sizes)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="relex-gram-ab-") as tmp:
        tmp = Path(tmp)
        exe = {"before": build(sources(a.before, tmp / "b"), tmp / "before"),
               "after": build(sources(a.after, tmp / "a"), tmp / "after")}
        # bits: odd sizes (partial groups, partial and narrow panels), many T, every dtype asked for
        check_T = "1,2,5,6,7,9,16,17,33,100"
        same = True
        for pair in a.check.split(","):
            dt, f16 = pair.split(":")
            for n in (70001, 1000, 37):
                hb, ha = (run(exe[k], a.simd, n, 1, dt, check_T, f16 == "1") for k in ("before", "after"))
                ok = all(hb[T][1] == ha[T][1] for T in hb)
                same &= ok
                print(f"{a.simd} {dt} fp16_deltas={f16} n={n}: {'same bits' if ok else 'BITS DIFFER'} (T = {check_T})")
        rates = {k: {} for k in exe}
        for _ in range(a.rounds):
            for k, e in exe.items():
                for T, (r, _) in run(e, a.simd, a.elements, 3, "BF16", a.T, False).items():
                    rates[k].setdefault(T, []).append(r)
        print(f"{a.simd}, one thread, bf16, {a.elements} elements, GFLOP/s, medians of {a.rounds} alternating rounds "
              f"({cpu_model()}, {os.cpu_count()} logical CPUs)")
        print("| kernel | " + " | ".join(f"T = {T}" for T in rates["before"]) + " |")
        print("|---|" + "---|" * len(rates["before"]))
        for k in exe:
            label = a.before if k == "before" else (a.after or "working tree")
            print(f"| {label} | " + " | ".join(f"{statistics.median(v):.1f}" for v in rates[k].values()) + " |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
