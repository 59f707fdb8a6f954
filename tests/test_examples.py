"""The scripts in examples/ run as a user runs them, and do what they say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_state_dict_in_memory():
    out = run("state_dict_in_memory.py")
    assert "27 tensors loaded into the model" in out
    err = float(out.rsplit("largest error ", 1)[1].split("%")[0])
    assert err < 20.0  # a 4x extrapolation of a noisy straight path lands near the line


def test_kernel_loop_equals_relex_extrapolate(tmp):
    out = run("kernel_loop.py", tmp)
    assert "identical to relex extrapolate: True" in out


def test_trainer_callback_writes_loadable_predictions(tmp):
    import torch
    from transformers import AutoModelForCausalLM
    pytest.importorskip("accelerate")
    out = run("trainer_callback.py", tmp)
    assert "3 predictions written" in out
    pred = os.path.join(tmp, "run", "relex", "step_24")
    model = AutoModelForCausalLM.from_pretrained(pred)
    assert model.config.tie_word_embeddings
    logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
