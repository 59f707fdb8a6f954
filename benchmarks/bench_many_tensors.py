"""Per-tensor overhead: a trajectory of many small tensors against a dense one of the same bytes.

Run: ``python benchmarks/bench_many_tensors.py`` (``--help`` for options). Writes
``benchmarks/results/many_tensors_cpu.json`` and ``.md``.

An MoE model stores thousands of small expert tensors (Qwen3-30B-A3B: ~18,000); the
engine's cost per tensor beyond its bytes (opening views, the T x T solve, journal and
report records) decides whether such a run is bound by its bytes. Both trajectories are
written by safetensors' own writer (bf16, base + T checkpoints, sharded like a hub
export) and extrapolated by the ``relex`` command in a fresh process, interleaved run by
run from a warm page cache; the figure is the median wall time and the ratio
many/dense, with the per-tensor overhead (many − dense) / tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine_info import cpu_model, out_stem, user_env, write_results_md  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def write_run(root: Path, shapes: dict[str, tuple[int, int]], T: int, shard_tensors: int, seed: int = 0) -> None:
    """base/ and checkpoint-1..T/ with the given tensors (bf16), a linear drift plus noise."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    drift = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    names = list(shapes)
    for step in range(T + 1):
        d = root / ("base" if step == 0 else f"checkpoint-{step}")
        d.mkdir(parents=True)
        chunks = [names[i:i + shard_tensors] for i in range(0, len(names), shard_tensors)]
        wmap = {}
        for k, chunk in enumerate(chunks):
            fname = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
            noise = {n: torch.randn(shapes[n], generator=g) * 2e-4 for n in chunk}
            save_file({n: (base[n] + step * drift[n] + noise[n]).to(torch.bfloat16) for n in chunk},
                      str(d / fname), metadata={"format": "pt"})
            wmap.update({n: fname for n in chunk})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "tie_word_embeddings": False}))


def run_once(root: Path, T: int, out: Path, tree: Path = ROOT) -> float:
    """One timed ``relex extrapolate`` of the code in ``tree`` (a checkout with its extension built)."""
    cmd = [sys.executable, "-m", "relex_kernels", "extrapolate", "--base", str(root / "base"),
           "--checkpoints", str(root), "--history-steps", str(T), "--target-step", str(10 * T),
           "--out", str(out), "-q"]
    # a fresh output directory and a synced disk, untimed (as bench_e2e): no run pays for deleting
    # or flushing the previous run's output
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t = time.perf_counter()
    # (run from the trajectory's folder: ``-m`` puts the working directory first on the path,
    # where a checkout would shadow ``tree``)
    subprocess.run(cmd, check=True, env=user_env(PYTHONPATH=str(tree)), cwd=root)
    return time.perf_counter() - t


def trajectories(work: Path, n_many: int, shape: tuple[int, int], T: int) -> dict[str, Path]:
    """The many-tensor trajectory (``n_many`` tensors of ``shape``) and a dense one of the same
    bytes (24 tensors) under ``work``, written unless there already (a shared ``--workdir`` must
    have been made with the same sizes); {"many": root, "dense": root}."""
    r, c = shape
    n_dense = 24
    many = {f"model.layers.{i // 128}.mlp.experts.{i % 128}.w.weight": (r, c) for i in range(n_many)}
    dense = {f"model.layers.{i}.mlp.w.weight": (r * n_many // n_dense, c) for i in range(n_dense)}
    for name, shapes, per_shard in (("many", many, 256), ("dense", dense, 2)):
        if not (work / name / "base").exists():
            write_run(work / name, shapes, T, per_shard)
    return {"many": work / "many", "dense": work / "dense"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=3072, help="tensors of the many-tensor trajectory")
    ap.add_argument("--shape", default="64,256", help="shape of each small tensor (rows,cols)")
    ap.add_argument("--T", type=int, default=16, help="history checkpoints")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each (median reported)")
    ap.add_argument("--workdir", default=None, help="where the trajectories go (default: a temp dir)")
    ap.add_argument("--out", type=out_stem, default=str(RESULTS / "many_tensors_cpu"),
                    help="output path without extension")
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout (its extension built: a git worktree of an earlier commit) timed "
                         "in the same rounds as this one, each round's runs in a shuffled order: before/after")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    n_many = args.tensors
    n_dense = 24  # a dense model of the same bytes: few large tensors (trajectories)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="relex_many_")).resolve()
    try:
        trajectories(work, n_many, shape, args.T)
        nbytes = sum(f.stat().st_size for f in (work / "many").rglob("*.safetensors"))
        trees = {"this": ROOT, **({"before": args.before.resolve()} if args.before else {})}
        by_tree = {t: {"many": [], "dense": []} for t in trees}
        for tree in trees.values():
            for name in ("many", "dense"):  # warm the page cache once (and write each tree's byte code)
                run_once(work / name, args.T, work / f"out_{name}", tree)
        rng = random.Random(0)
        for _ in range(args.runs):
            order = [(t, name) for t in trees for name in ("many", "dense")]
            if len(trees) > 1:  # (alone, many and dense alternate as before)
                rng.shuffle(order)
            for t, name in order:
                by_tree[t][name].append(run_once(work / name, args.T, work / f"out_{name}", trees[t]))
        times = by_tree["this"]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    from relex_kernels.ops import native

    info = native.info() if native.available()[0] else {}
    med = {k: statistics.median(v) for k, v in times.items()}
    per_tensor_ms = (med["many"] - med["dense"]) / (n_many - n_dense) * 1e3
    res = {"machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "simd": info.get("simd"),
                       "threads": native.get_num_threads() if info else None},
           "T": args.T, "tensors": {"many": n_many, "dense": n_dense}, "input_bytes": nbytes,
           "runs": times, "median_s": med, "ratio": med["many"] / med["dense"],
           "per_tensor_overhead_ms": per_tensor_ms,
           "command": "python benchmarks/bench_many_tensors.py " + " ".join(sys.argv[1:])}
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# Many tensors vs dense, same bytes ({nbytes / 1e9:.2f} GB of input, T = {args.T})", "",
          f"Machine: {res['machine']['cpu']}, {os.cpu_count()} logical CPUs, SIMD path `{info.get('simd')}`, "
          f"{res['machine']['threads']} threads. Whole `relex extrapolate` command (process start included), warm "
          f"page cache, medians of {args.runs} interleaved runs.", "",
          "| trajectory | tensors | median s | runs |", "|---|---|---|---|",
          f"| many (MoE-like) | {n_many} | {med['many']:.2f} | {', '.join(f'{x:.2f}' for x in times['many'])} |",
          f"| dense | {n_dense} | {med['dense']:.2f} | {', '.join(f'{x:.2f}' for x in times['dense'])} |", "",
          f"Ratio many/dense: **{res['ratio']:.2f}x**; overhead per extra tensor: **{per_tensor_ms:.3f} ms**.",
          ""]
    if args.before:
        bmed = {k: statistics.median(v) for k, v in by_tree["before"].items()}
        b_per = (bmed["many"] - bmed["dense"]) / (n_many - n_dense) * 1e3
        res["before"] = {"tree": str(args.before), "runs": by_tree["before"], "median_s": bmed,
                         "ratio": bmed["many"] / bmed["dense"], "per_tensor_overhead_ms": b_per}
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
        md += [f"In the same rounds, shuffled, the checkout `{args.before}`:", "",
               "| code | many s | dense s | ratio | per extra tensor |", "|---|---|---|---|---|",
               f"| before | {bmed['many']:.3f} | {bmed['dense']:.3f} | {bmed['many'] / bmed['dense']:.2f}x | "
               f"{b_per:.3f} ms |",
               f"| this | {med['many']:.3f} | {med['dense']:.3f} | {res['ratio']:.2f}x | {per_tensor_ms:.3f} ms |", ""]
    md += [f"Command: `{res['command']}`", ""]
    write_results_md(Path(args.out).with_suffix(".md"), md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
