"""Time ``relex analyze`` and ``relex backtest`` against one ``relex extrapolate`` of the same run.

    python benchmarks/bench_diagnostics.py                 # 220m, history 1..16, eval 24,32,48,64
    python benchmarks/bench_diagnostics.py --size small    # a quick check

A synthetic Qwen3 run (``relex_kernels.synth``, bf16, mild curvature so that the
methods differ) is generated once; then each command runs ``--runs`` times in its
own subprocess, round-robin, from a warm page cache, and the median wall time
(process start to exit, imports and figures included) is reported:

* extrapolate      — ``relex extrapolate`` from the history (steps <= H) to one target:
                     what the diagnostics are compared with (the target is 1.3x);
* extrapolate-all  — the same over every checkpoint the diagnostics read (history and
                     eval): equal input bytes, so it separates the cost of reading
                     more checkpoints from the cost of the diagnostics themselves;
* analyze          — ``relex analyze`` with history H and the eval checkpoints as
                     out-of-sample points, figures included (and ``--no-figures``);
* backtest         — ``relex backtest`` of all seven methods on the eval steps.

Results: ``benchmarks/results/diagnostics.json`` and ``diagnostics.md`` (with one
analyze figure and the backtest table of the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)

from machine_info import cpu_model, ram_bytes  # noqa: E402

# one subcommand the way `relex CMD ...` runs it (independent of the other commands' modules)
CHILD = r"""
import argparse, importlib, sys
sys.path.insert(0, %r)
mod = importlib.import_module("relex_kernels.cli." + sys.argv[1])
p = argparse.ArgumentParser(prog="relex " + sys.argv[1])
mod.add_arguments(p)
sys.exit(mod.run(p.parse_args(sys.argv[2:])))
""" % ROOT


def machine() -> str:
    mem = ram_bytes() / 2**30
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def run_cmd(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one command in its own process."""
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"command failed: relex {' '.join(argv)}\n{r.stdout}\n{r.stderr}")
    return dt, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="220m")
    ap.add_argument("--history", type=int, default=16, help="history checkpoints: steps 1..H")
    ap.add_argument("--eval-steps", default="24,32,48,64")
    ap.add_argument("--curvature", type=float, default=0.003)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()

    from relex_kernels.analysis.report import backtest_table
    from relex_kernels.synth import SynthRun, synthesize

    work = a.dir or tempfile.mkdtemp(prefix="relex-bench-diag-")
    os.makedirs(work, exist_ok=True)
    H = a.history
    evals = [int(x) for x in a.eval_steps.split(",")]
    steps = list(range(1, H + 1)) + evals
    synth_dir = os.path.join(work, "synth")
    t0 = time.perf_counter()
    try:
        syn = SynthRun.load(synth_dir)
        if sorted(syn.checkpoints) != steps:
            raise ValueError
    except Exception:
        syn = synthesize(synth_dir, arch="qwen3", size=a.size, steps=steps, seed=0, curvature=a.curvature,
                         overwrite=True, quiet=False)
    gen_s = time.perf_counter() - t0
    base, run = syn.base_dir, syn.run_dir
    res_dir = os.path.join(work, "out")
    be = ["--backend", a.backend]
    cmds = {
        "extrapolate": ["extrapolate", "--base", base, "--checkpoints", run, "--history-steps", str(H),
                        "--target-step", str(10 * H), "--out", os.path.join(res_dir, "x"), "--overwrite", "-q", *be],
        "extrapolate-all": ["extrapolate", "--base", base, "--checkpoints", run, "--target-step", str(10 * H),
                            "--out", os.path.join(res_dir, "xa"), "--overwrite", "-q", *be],
        "analyze": ["analyze", run, "--base", base, "--history-steps", str(H), "--out",
                    os.path.join(res_dir, "analyze"), "--overwrite", "-q", *be],
        "analyze --no-figures": ["analyze", run, "--base", base, "--history-steps", str(H), "--out",
                                 os.path.join(res_dir, "analyze-nofig"), "--overwrite", "--no-figures", "-q", *be],
        "backtest": ["backtest", run, "--base", base, "--history-steps", str(H), "--eval-steps", a.eval_steps,
                     "--out", os.path.join(res_dir, "backtest"), "--overwrite", "-q", *be],
    }
    print(f"warming the page cache ({len(steps) + 1} checkpoints of {a.size})", flush=True)
    run_cmd(cmds["analyze"])
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    load0 = os.getloadavg()[0]
    for i in range(a.runs):
        for k, argv in cmds.items():
            w, c = run_cmd(argv)
            times[k].append(w)
            cpu[k].append(c)
            print(f"run {i + 1}/{a.runs} {k}: {w:.2f} s wall, {c:.2f} s CPU", flush=True)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    # untimed: the RELEX prediction of the last eval step, written and measured after bf16 rounding
    mat_dir = os.path.join(res_dir, "materialize")
    run_cmd(["backtest", run, "--base", base, "--history-steps", str(H), "--eval-steps", a.eval_steps,
             "--methods", "relex", "--materialize", str(evals[-1]), "--out", mat_dir, "--overwrite", "-q", *be])
    mat = json.load(open(os.path.join(mat_dir, "backtest.json")))["materialized"]
    bt = json.load(open(os.path.join(res_dir, "backtest", "backtest.json")))
    an = json.load(open(os.path.join(res_dir, "analyze", "report.json")))
    n_params = sum(e["numel"] for e in an["tensors"])
    os.makedirs(a.results, exist_ok=True)
    figs = {}
    for src, dst in ((os.path.join(res_dir, "analyze", "coefficients.png"), "diagnostics_coefficients.png"),
                     (os.path.join(res_dir, "analyze", "ev_heatmap.png"), "diagnostics_ev_heatmap.png"),
                     (os.path.join(res_dir, "backtest", "error_vs_distance.png"), "diagnostics_error_vs_distance.png")):
        shutil.copyfile(src, os.path.join(a.results, dst))
        figs[os.path.basename(src)] = dst
    ref = med["extrapolate"]
    out = {
        "machine": machine(), "python": platform.python_version(), "size": a.size, "params": n_params,
        "history_steps": list(range(1, H + 1)), "eval_steps": evals, "curvature": a.curvature,
        "backend": bt["backend"], "runs": a.runs, "synth_seconds": gen_s,
        "seconds": times, "cpu_seconds": cpu, "median_seconds": med, "min_seconds": best,
        "median_cpu_seconds": med_cpu, "load_average_1min": [load0, load1],
        "ratio_to_extrapolate": {k: v / ref for k, v in med.items()},
        "ratio_to_extrapolate_min": {k: v / best["extrapolate"] for k, v in best.items()},
        "ratio_to_extrapolate_cpu": {k: v / med_cpu["extrapolate"] for k, v in med_cpu.items()},
        "ratio_to_extrapolate_all": {k: v / med["extrapolate-all"] for k, v in med.items()},
        "gram_pass": {"analyze": an["gram_pass"], "backtest": bt["gram_pass"]},
        "backtest_model": bt["model"], "analyze_model": an["aggregates"]["model"], "materialized": mat,
    }
    with open(os.path.join(a.results, "diagnostics.json"), "w") as fh:
        json.dump(out, fh, indent=1)

    s = an["summary_ev1"]
    agg = an["aggregates"]["model"]
    L = ["# Diagnostics: `relex analyze` and `relex backtest`", "",
         f"Synthetic Qwen3 run (`relex_kernels.synth`, size `{a.size}`, {n_params / 1e6:.0f}M parameters, bf16, "
         f"curvature {a.curvature}, seed 0): history steps 1..{H}, held-out checkpoints at steps "
         f"{', '.join(map(str, evals))}. Machine: {machine()}; backend `{bt['backend']}`. "
         "Generated by `python benchmarks/bench_diagnostics.py"
         + (f" --size {a.size}" if a.size != "220m" else "") + (f" --runs {a.runs}" if a.runs != 3 else "")
         + "`.", "",
         "## Time relative to one `relex extrapolate` of the same run", "",
         f"{a.runs} runs each, interleaved, of the whole command (process start, imports, figures) from a warm "
         "page cache: median and best wall time, and median CPU time (user + system, less sensitive to other "
         f"jobs on the machine: the 1-minute load average was {load0:.1f} at the start and {load1:.1f} at the "
         "end). *extrapolate* predicts one target from the history; *extrapolate-all* fits every checkpoint the "
         "diagnostics read (the same input bytes).", "",
         "| command | reads checkpoints | median wall s | x extrapolate | best wall s | x extrapolate | "
         "median CPU s | x extrapolate |", "|---|---|---|---|---|---|---|---|"]
    nread = {"extrapolate": H + 1}
    for k in med:
        r = nread.get(k, len(steps) + 1)
        L.append(f"| `relex {k}` | {r} | {med[k]:.2f} | {med[k] / ref:.2f} | {best[k]:.2f} | "
                 f"{best[k] / best['extrapolate']:.2f} | {med_cpu[k]:.2f} | "
                 f"{med_cpu[k] / med_cpu['extrapolate']:.2f} |")
    L += ["", "## `relex analyze`: rank-1 coefficients of representative tensors", "",
          f"Rank-1 explained variance over {s['tensors']} tensors: mean {s['mean']:.4f}, min {s['min']:.4f}. "
          f"Pooled R² of the coefficient's line (1 − Σ SS_res / Σ SS_tot over the tensors): in sample "
          f"{agg['r2_in']['pooled']:.4f}, out of sample {agg['r2_out']['pooled']:.4f} (history subspace), "
          f"{agg['r2_out_oracle']['pooled']:.4f} (oracle subspace); the parameter-weighted means of per-tensor "
          f"R²: {agg['r2_in']['weighted_mean']:.4f}, {agg['r2_out']['weighted_mean']:.4f}, "
          f"{agg['r2_out_oracle']['weighted_mean']:.4f}.", "",
          f"![coefficient trajectories]({figs['coefficients.png']})", "",
          f"![rank-1 explained variance, layer x module]({figs['ev_heatmap.png']})", "",
          "## `relex backtest`: relative error ‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖ over the whole model", "",
          "Pre-rounding figures from the Gram (see `backtest.md`); column headers give the step and the distance "
          "after the last history step.", ""]
    L += backtest_table(bt)
    pre, post = mat["pre_rounding"], mat["after_rounding"]
    L += ["", f"`--materialize {mat['step']}` wrote the RELEX prediction of step {mat['step']} with the engine (bf16) "
          f"and measured it: relative error {post['rel_error']:.4f} after rounding vs {pre['rel_error']:.4f} from the "
          f"Gram before rounding; cosine {post['cosine']:.4f} vs {pre['cosine']:.4f}.", "",
          f"![error vs distance]({figs['error_vs_distance.png']})", ""]
    with open(os.path.join(a.results, "diagnostics.md"), "w") as fh:
        fh.write("\n".join(L))
    print("\n".join(L))
    if not a.keep and not a.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
