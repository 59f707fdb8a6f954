"""verl FSDP rank files read in place vs the same bytes as safetensors vs merge-then-extrapolate.

    python benchmarks/bench_verl_inputs.py [--params 24e6] [--steps 8] [--world 4] [--runs 5]

One synthetic fp32 trajectory (a drifting line plus noise), stored three ways side by side:

* ``safetensors`` — fp32 ``model.safetensors`` per checkpoint (safetensors' own writer);
* ``rank files``  — verl's FSDP actor layout, ``model_world_size_W_rank_R.pt``, written by
                    FSDP2 (``fully_shard``) over a CPU gloo group and ``torch.save``, as verl does
                    (verl's placement: rows where dimension 0 divides by W, else the first
                    dimension that does — ``--rows`` picks shapes sharded one way or the other);
* ``merge first`` — what a verl user does today: per checkpoint, load every rank file
                    (``torch.load``), concatenate the shards, cast to bf16 and write a Hugging
                    Face directory (verl's model merger), then run relex on the merged copies.

The base is the bf16 model (as the run started from one). Reports wall time (medians of
``--runs``, interleaved; each run a fresh process), peak RSS and temporary disk, and the
rate of reading rank files relative to reading the same bytes as safetensors.
Results: ``benchmarks/results/verl_inputs_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from machine_info import cpu_model, out_stem, write_results_md  # noqa: E402

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, %r)
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
tmp = 0
ck = {int(k): v for k, v in a["ck"].items()}
if a.get("merge"):
    import torch
    from safetensors.torch import save_file
    merged = {}
    for s, d in ck.items():
        files = sorted(f for f in os.listdir(d) if f.startswith("model_world_size_"))
        parts = [torch.load(os.path.join(d, f), weights_only=False) for f in files]
        # verl's model merger: concatenate along each tensor's shard dimension, cast to bf16
        sd = {k: torch.cat([p[k]._local_tensor for p in parts], parts[0][k].placements[0].dim)
              .to(torch.bfloat16).contiguous() for k in parts[0]}
        out = os.path.join(a["tmp"], f"step_{s}")
        os.makedirs(out)
        save_file(sd, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as fh:
            fh.write('{"model_type": "test"}')
        tmp += os.path.getsize(os.path.join(out, "model.safetensors"))
        merged[s] = out
        del parts, sd
    ck = merged
from relex_kernels.engine import extrapolate
r = extrapolate(a["base"], ck, [a["target"]], a["out"], overwrite=True)
dt = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": dt, "bytes_read": r.bytes_read, "peak_rss": hwm, "temp_bytes": tmp}))
""" % ROOT


def child(arg: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(arg)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def make(work: str, params: float, steps: int, world: int, rows_divisible: bool = True):
    import torch
    from safetensors.torch import save_file

    import fsdpgen
    n_tensors = 12
    rows = max(world + 1, int(params / n_tensors / 1024)) // world * world
    # rows divisible by W: Shard(0) row blocks (real models' usual case); else Shard(1) column slices
    shapes = {f"model.layers.{i}.mlp.weight": (rows + (0 if rows_divisible else 1), 1024) for i in range(n_tensors)}
    g = torch.Generator().manual_seed(0)
    th0 = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    v = {n: torch.randn(s, generator=g) * 1e-5 for n, s in shapes.items()}
    base = os.path.join(work, "base")
    os.makedirs(base)
    save_file({n: t.to(torch.bfloat16) for n, t in th0.items()}, os.path.join(base, "model.safetensors"))
    with open(os.path.join(base, "config.json"), "w") as fh:
        fh.write('{"model_type": "test"}')
    st, rk = {}, {}
    for s in range(1, steps + 1):
        vals = {n: th0[n] + s * v[n] + 1e-6 * torch.randn(shapes[n], generator=g) for n in shapes}
        d = os.path.join(work, "st", f"step_{s}")
        os.makedirs(d)
        save_file(vals, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as fh:
            fh.write('{"model_type": "test"}')
        st[s] = d
        rk[s] = os.path.join(work, "run", f"global_step_{s}", "actor")
    # the rank files of every step from the safetensors copies, in one process group of W ranks
    fsdpgen.save_many([(rk[s], st[s]) for s in st], world)
    return base, st, rk, sum(int(torch.tensor(s).prod()) for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=24e6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rows", choices=("divisible", "odd"), default="divisible",
                    help="dimension 0 of the tensors divisible by W (Shard(0) row blocks, default) or not "
                         "(verl then shards dimension 1)")
    ap.add_argument("--out", type=out_stem, default=os.path.join(ROOT, "benchmarks", "results", "verl_inputs_cpu"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="relex-verl-bench-")
    try:
        base, st, rk, n = make(work, a.params, a.steps, a.world, a.rows == "divisible")
        target = 4 * a.steps
        common = {"base": base, "target": target}
        cases = {
            "safetensors (fp32)": dict(common, ck={str(k): v for k, v in st.items()}, out=os.path.join(work, "o1")),
            f"rank files (fp32, W={a.world}, {'Shard(0)' if a.rows == 'divisible' else 'Shard(1)'})": dict(common, ck={str(k): v for k, v in rk.items()},
                                                    out=os.path.join(work, "o2")),
            "merge to bf16 HF, then relex": dict(common, ck={str(k): v for k, v in rk.items()},
                                                 out=os.path.join(work, "o3"), merge=True),
        }
        res: dict[str, list] = {k: [] for k in cases}
        for _ in range(a.runs):
            for k, arg in cases.items():
                if arg.get("merge"):
                    arg["tmp"] = tempfile.mkdtemp(prefix="merge-", dir=work)
                res[k].append(child(arg))
                if arg.get("merge"):
                    shutil.rmtree(arg["tmp"])
        input_bytes = sum(os.path.getsize(os.path.join(d, "model.safetensors")) for d in st.values())
        rows = {k: {"seconds": statistics.median(r["seconds"] for r in v), "runs": [r["seconds"] for r in v],
                    "peak_rss": max(r["peak_rss"] for r in v), "temp_bytes": v[0]["temp_bytes"]}
                for k, v in res.items()}
        ks = list(rows)
        ratio = rows[ks[0]]["seconds"] / rows[ks[1]]["seconds"]
        from relex_kernels.ops import get_backend
        out = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "kernel": get_backend(None).identity,
               "params": n, "steps": a.steps, "world": a.world, "row_layout": a.rows, "runs": a.runs, "history_input_bytes": input_bytes,
               "rows": rows, "rank_files_rate_vs_safetensors": ratio}
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out + ".json", "w") as fh:
            json.dump(out, fh, indent=1)
        md = [f"Machine: {out['machine']}, kernel {out['kernel']}; {time.strftime('%Y-%m-%d')}.", "",
              f"{n / 1e6:.0f}M fp32 parameters, T = {a.steps} (history {input_bytes / 1e9:.2f} GB as fp32), bf16 base, "
              f"one target; medians of {a.runs} interleaved runs, each a fresh process, warm page cache.", "",
              "| inputs | wall (s) | peak RSS (MiB) | temp disk (GB) |", "|---|---|---|---|"]
        for k, r in rows.items():
            md.append(f"| {k} | {r['seconds']:.2f} | {r['peak_rss'] / 2**20:.0f} | {r['temp_bytes'] / 1e9:.2f} |")
        md += ["", f"Reading rank files runs at **{ratio:.2f}x** the speed of reading the same bytes as safetensors.",
               "", f"Command: `python benchmarks/bench_verl_inputs.py --params {a.params:g} --steps {a.steps} "
               f"--world {a.world} --runs {a.runs} --rows {a.rows}`"]
        write_results_md(a.out + ".md", md)
        print("\n".join(md))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
