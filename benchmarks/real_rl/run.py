"""RELEX on a real RL run, end to end: train, observe the first steps, predict, score against the real future.

    python benchmarks/real_rl/run.py                 # the full run (~12 min on 2 CPU cores)
    python benchmarks/real_rl/run.py --mini --out /tmp/rl   # seconds: the CI miniature

1. A Qwen3-architecture model of ~3M parameters learns three-digit addition by supervised
   training to a middling accuracy (the RL start, written in bf16 and fp32).
2. TRL's GRPOTrainer improves it with a verifiable reward (exact answer, partial credit per digit); every step is saved by TRL
   (``trl/checkpoint-N``, fp32) and as a bf16 HF export (``bf16/checkpoint-N``); the history
   and target steps are also written as verl's FSDP actor saves them (fp32 masters, rank files
   written by torch's FSDP2 over a gloo group).
3. ``relex extrapolate`` predicts later steps from the first 10/15/20 % of the steps; the
   baselines (keep-last, two-point secant, rank 2 and 5) come from an independent fp64 SVD
   reference. Every prediction is scored by greedy held-out accuracy and parameter error.
4. ``relex backtest`` and ``relex analyze`` run on the same checkpoints.
5. ``real_rl.json``, ``real_rl.md`` and two PNG plots go to ``--results``.

Deterministic given ``--seed`` on one machine and thread count. Needs torch, transformers,
trl, matplotlib (``pip install -e ".[test]" trl``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: machine_info

#: the two presets: the full run (results page) and the CI miniature (seconds)
PRESETS = {
    "full": dict(size="small", sft_steps=1500, sft_target=0.35, rl_steps=300, prompts=16, generations=8,
                 lr=2e-6, held=1000, curve_every=10, fractions=(0.10, 0.15, 0.20)),
    "mini": dict(size="mini", sft_steps=4, sft_target=1.1, rl_steps=10, prompts=2, generations=4,
                 lr=1e-3, held=40, curve_every=5, fractions=(0.3,)),
}


#: what the results keep of backtest.json (its per-tensor lists stay in the working directory)
BACKTEST_KEPT = ("history_steps", "eval_steps", "methods", "model", "by_module", "seconds")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mini", action="store_true", help="the CI miniature: a tiny model, a few steps")
    ap.add_argument("--out", help="working directory for the checkpoints (default: a temporary one, removed)")
    ap.add_argument("--results", help="where real_rl.json/.md and the PNGs go "
                    "(default: benchmarks/results, or --out with --mini)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary working directory (without --out it is removed at the end; "
                         "an --out directory is always kept)")
    ap.add_argument("--rl-steps", type=int, help="GRPO steps (default: the preset's)")
    ap.add_argument("--prompts", type=int, help="prompts per GRPO step (default: the preset's)")
    ap.add_argument("--lr", type=float, help="GRPO learning rate (default: the preset's)")
    ap.add_argument("--name", default="real_rl", help="file name stem of the results (default real_rl)")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS["mini" if args.mini else "full"])
    for key, val in (("rl_steps", args.rl_steps), ("prompts", args.prompts), ("lr", args.lr)):
        if val is not None:
            if val <= 0:
                ap.error(f"--{key.replace('_', '-')} must be positive")
            cfg[key] = val

    import torch

    import score
    import task
    import train
    from report import write_results

    work = args.out or tempfile.mkdtemp(prefix="relex-real-rl-")
    if os.path.exists(os.path.join(work, "trl")):
        raise SystemExit(f"{work} holds a previous run: give an empty --out")
    os.makedirs(work, exist_ok=True)
    # the full run's page goes beside the other results; a miniature's beside its checkpoints, or
    # here when those are temporary (never into a directory removed at the end)
    results = args.results or (os.path.join(HERE, "..", "results") if not args.mini
                               else args.out or os.getcwd())
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)

    try:
        held = task.problems(cfg["held"], args.seed + 1)
        log(f"supervised phase ({cfg['size']} model)")
        sft = train.sft(work, size=cfg["size"], seed=args.seed, held=held, max_steps=cfg["sft_steps"],
                        target_acc=cfg["sft_target"], log=log)
        log(f"GRPO with TRL: {cfg['rl_steps']} steps of {cfg['prompts']} prompts x {cfg['generations']} completions")
        rl = train.grpo(work, steps=cfg["rl_steps"], seed=args.seed, held=held, lr=cfg["lr"],
                        prompts_per_step=cfg["prompts"], generations=cfg["generations"], log=log)
        N = cfg["rl_steps"]
        hists = sorted({max(2, round(f * N)) for f in cfg["fractions"]})
        H = hists[len(hists) // 2]  # the main history: 15 % of the run
        targets = sorted({t for t in (N // 4, N // 2, 3 * N // 4, N) if t > max(hists)})
        if not targets:
            raise SystemExit(f"--rl-steps {N} leaves no target step after the history (steps 1..{max(hists)})")
        log(f"verl fp32 masters (FSDP2, 2 gloo ranks) of steps 1..{H} and {targets}")
        train.write_verl_masters(work, list(range(1, H + 1)) + targets)

        ev = score.Evaluator(os.path.join(work, "base"), held)
        ckpt = lambda run, s: os.path.join(work, run, f"checkpoint-{s}")  # noqa: E731
        base32 = score.load_state(os.path.join(work, "base"))
        base16 = score.load_state(os.path.join(work, "base_bf16"))
        log("held-out accuracy of the real run")
        curve_steps = sorted({0, *range(cfg["curve_every"], N + 1, cfg["curve_every"]), *hists, *targets})
        curve = {s: ev.accuracy(base32 if s == 0 else score.load_state(ckpt("trl", s))) for s in curve_steps}
        motion = score.motion(base32, lambda s: score.load_state(ckpt("trl", s)),
                              sorted({s for s in (1, 2, 5, 10, 20) if s <= N} | {*hists, *targets}), H, N)
        log(f"  ‖θ_s − θ₀‖ grows as s^{motion['growth_exponent']:.2f} between steps {H} and {N}")

        variants = [("trl-fp32", "trl", "base", h) for h in hists] + \
                   [("bf16-export", "bf16", "base_bf16", H), ("verl-fp32-masters", "verl", "base_bf16", H)]
        rows, checks = [], {}
        for label, run, base_name, h in variants:
            log(f"{label}, history steps 1..{h}: relex extrapolate to {targets}")
            pred_dir = os.path.join(work, "pred", f"{label}_h{h}")
            t0 = time.time()
            score.relex("extrapolate", "--base", os.path.join(work, base_name), "--checkpoints",
                        os.path.join(work, run), "--history-steps", str(h),
                        *[a for s in targets for a in ("--target-step", str(s))], "--out", pred_dir, "-q", log=log)
            relex_s = time.time() - t0
            base = base16 if base_name == "base_bf16" else base32
            # the reference reads the same values: the bf16 exports, or the fp32 steps themselves
            # (verl's rank files hold TRL's fp32 parameters of the step)
            src = "bf16" if run == "bf16" else "trl"
            history = {s: score.load_state(ckpt(src, s)) for s in range(1, h + 1)}
            ref = score.reference_predictions(base, history, targets, ("relex", *score.BASELINES))
            for s in targets:
                truth = score.load_state(ckpt("trl", s))
                engine = score.load_state(os.path.join(pred_dir, f"step_{s}"))
                # the engine against the independent reference: same method, same rounding
                checks.setdefault(f"{label}_h{h}", []).append(score.parameter_error(engine, ref["relex"][s], base)["rel_error"])
                row = {"variant": label, "history": h, "target": s, "real_accuracy": curve[s],
                       "relex_seconds": relex_s}
                preds = {"relex": engine, **{m: ref[m][s] for m in score.BASELINES}}
                for m, p in preds.items():
                    row[m] = {"accuracy": ev.accuracy(p), **score.parameter_error(p, truth, base32)}
                rows.append(row)
                log(f"  step {s}: real {curve[s]:.3f}, relex {row['relex']['accuracy']:.3f}, "
                    f"keep-last {row['keep-last']['accuracy']:.3f}")
            del history, ref

        log("relex backtest and relex analyze on TRL's checkpoints")
        bt_dir, an_dir = os.path.join(work, "backtest"), os.path.join(work, "analyze")
        score.relex("backtest", os.path.join(work, "trl"), "--base", os.path.join(work, "base"),
                    "--history-steps", str(H), "--eval-steps", ",".join(map(str, targets)),
                    "--out", bt_dir, "--no-figures", "-q", log=log)
        score.relex("analyze", os.path.join(work, "trl"), "--base", os.path.join(work, "base"),
                    "--history-steps", str(H), "--later-steps", ",".join(map(str, targets)),
                    "--out", an_dir, "--no-figures", "-q", log=log)
        with open(os.path.join(bt_dir, "backtest.json")) as fh:
            backtest = {k: v for k, v in json.load(fh).items() if k in BACKTEST_KEPT}
        with open(os.path.join(an_dir, "report.json")) as fh:
            analysis = json.load(fh)

        import relex_kernels
        from machine_info import cpu_model
        from relex_kernels.ops import native
        rep = {
            "preset": "mini" if args.mini else "full", "config": {**cfg, "fractions": list(cfg["fractions"])},
            "seed": args.seed, "command": "python benchmarks/real_rl/run.py " + " ".join(
                a for a in (argv if argv is not None else sys.argv[1:])),
            "machine": {"cpu": cpu_model(), "simd": native.info()["simd"] if native.available()[0] else "none",
                                          "cores": os.cpu_count(), "python": platform.python_version(),
                                          "torch": torch.__version__, "relex_kernels": relex_kernels.__version__},
            "sft": sft, "grpo": rl, "history_steps": hists, "main_history": H, "targets": targets,
            "curve": {str(k): v for k, v in curve.items()}, "motion": motion, "rows": rows,
            "engine_vs_reference_rel_error": checks,
            "backtest": backtest, "analysis_by_module": analysis.get("aggregates", {}).get("by_module", {}),
            "analysis_overall": analysis.get("aggregates", {}).get("model", {}),
            "summary_ev1": analysis.get("summary_ev1"), "analysis_growth": analysis.get("growth"),
            "seconds": time.time() - t_start,
        }
        paths = write_results(rep, results, args.name)
        log(f"done in {rep['seconds']:.0f} s: {', '.join(paths)}")
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
