"""Predictions and their scores: RELEX through the ``relex`` command, baselines from an independent reference.

The baselines (and a second RELEX, to check the engine) are computed here in torch, in
fp64, from the checkpoints' values with a plain SVD of the time x parameters delta matrix
— no code shared with the engine:

* ``rank-r`` (r = 1 is RELEX; at most the number of history steps): per tensor, the top-r right singular vectors of the deltas
  ``D = [θ_t − θ₀]``, each coordinate ``c_k(t) = (U S)_tk`` fitted by a least-squares line
  against the step and evaluated at the target;
* ``secant``: the line from θ₀ through the last history checkpoint, ``θ₀ + S/x_last (θ_last − θ₀)``;
* ``keep-last``: the last history checkpoint.

Every prediction is rounded to the dtype of the run's base, as the engine writes it, and
scored by greedy accuracy on the held-out problems and by its parameter-space error
against the real checkpoint of the target step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import task

BASELINES = ("keep-last", "secant", "rank2", "rank5")


def load_state(path: str) -> dict[str, torch.Tensor]:
    """An HF safetensors directory's tensors (one file or an index of shards)."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {path}")
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def reference_predictions(base: dict, history: dict[int, dict], targets: list[int], methods) -> dict:
    """{method: {target: state dict}} in the base's dtypes, from fp64 SVDs of the deltas."""
    steps = sorted(history)
    x = torch.tensor(steps, dtype=torch.float64)
    xc = x - x.mean()
    preds = {m: {s: {} for s in targets} for m in methods}
    for name, b in base.items():
        b64 = b.to(torch.float64)
        D = torch.stack([history[s][name].to(torch.float64).reshape(-1) - b64.reshape(-1) for s in steps])
        svd = None
        for m in methods:
            for s in targets:
                if m == "keep-last":
                    d = D[-1]
                elif m == "secant":
                    d = D[-1] * (s / steps[-1])
                else:
                    r = 1 if m == "relex" else int(m[4:])
                    if svd is None:
                        svd = torch.linalg.svd(D, full_matrices=False)
                    U, S, Vh = svd
                    C = U[:, :r] * S[:r]  # (T, r): position along each direction at each step
                    slope = (xc @ (C - C.mean(0))) / (xc @ xc)
                    c_hat = C.mean(0) + slope * (s - x.mean())
                    d = c_hat @ Vh[:r]
                preds[m][s][name] = (b64.reshape(-1) + d).reshape(b.shape).to(b.dtype)
    return preds


def parameter_error(pred: dict, truth: dict, base: dict) -> dict:
    """Over the whole model: ‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖ and the cosine between the predicted and the true delta."""
    num = den = dot = pp = 0.0
    for name, b in base.items():
        b64 = b.to(torch.float64)
        dp = pred[name].to(torch.float64) - b64
        dt = truth[name].to(torch.float64) - b64
        num += float(((dp - dt) ** 2).sum())
        den += float((dt ** 2).sum())
        dot += float((dp * dt).sum())
        pp += float((dp ** 2).sum())
    return {"rel_error": (num / den) ** 0.5 if den else float("nan"),
            "cosine": dot / (pp * den) ** 0.5 if pp and den else float("nan")}


def _distance(a: dict, b: dict) -> float:
    return sum(float(((a[k].to(torch.float64) - b[k].to(torch.float64)) ** 2).sum()) for k in b) ** 0.5


def motion(base: dict, load, steps: list[int], hist: int, last: int) -> dict:
    """How the run moves: ‖θ_s − θ₀‖ and the step length ‖θ_s − θ_{s−1}‖ at ``steps``, and the
    exponent p of ‖θ_s − θ₀‖ ∝ s^p between ``hist`` and ``last`` (1: a straight line at constant
    speed, what extrapolating a line assumes; 0.5: a random walk)."""
    import math
    disp, step_len = {}, {}
    for s in sorted(set(steps) | {hist, last}):
        cur = load(s)
        disp[s] = _distance(cur, base)
        step_len[s] = _distance(cur, base if s == 1 else load(s - 1))
    p = math.log(disp[last] / disp[hist]) / math.log(last / hist) if disp[hist] > 0 and last > hist else None
    return {"displacement": {str(k): v for k, v in disp.items()}, "step_length": {str(k): v for k, v in step_len.items()},
            "growth_exponent": p, "between": [hist, last]}


class Evaluator:
    """Greedy held-out accuracy of any state dict, in one model of the base's architecture."""

    def __init__(self, base_dir: str, held: list):
        from transformers import AutoTokenizer, Qwen3ForCausalLM
        self.tok = AutoTokenizer.from_pretrained(base_dir)
        self.model = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.held = held

    @torch.no_grad()
    def accuracy(self, state: dict) -> float:
        params = dict(self.model.named_parameters())  # a tied head is the embedding: one parameter
        missing = set(params) - set(state)
        if missing:  # never score a prediction partly on the previous model's weights
            raise ValueError(f"the state to score lacks {sorted(missing)[:3]} ({len(missing)} parameters)")
        for name, p in params.items():
            p.copy_(state[name].to(torch.float32))
        return task.greedy_accuracy(self.model, self.tok, self.held)


def relex(*args: str, log=print) -> None:
    """Run the ``relex`` command (``python -m relex_kernels``) as a user would."""
    cmd = [sys.executable, "-m", "relex_kernels", *args]
    log("  $ relex " + " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"relex {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
