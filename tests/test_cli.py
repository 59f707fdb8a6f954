"""The ``relex`` command as users run it: options, messages, exit codes, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from trajgen import make_trajectory

from relex_kernels.io import dtypes, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relex(*args, check=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *map(str, args)], capture_output=True, text=True,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def run(tmp):
    base, ck = make_trajectory(tmp, {"a.weight": (16, 8), "b": (5,)}, range(1, 7), layout="verl")
    return tmp, base, os.path.join(tmp, "run")


def assert_clean_failure(r, out, *words):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    if os.path.isdir(out):  # at most the lock of a directory that existed before
        assert set(os.listdir(out)) <= {".relex.lock"}, os.listdir(out)


def test_help_explains_every_command():
    r = relex("--help", check=True)
    for cmd in ("extrapolate", "predict", "synth", "demo", "backends"):
        assert cmd in r.stdout
    r = relex("extrapolate", "--help", check=True)
    for opt in ("--history-steps", "--target-step", "--rank", "--window", "--time-axis", "--fp16-deltas",
                "--memory-budget", "--save-fit", "--overwrite", "--mode", "--step-scale"):
        assert opt in r.stdout


def test_backends_report():
    r = relex(check=True)
    assert "reference" in r.stdout and "auto picks:" in r.stdout


def test_extrapolate_cli_writes_output_and_report(run):
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--history-steps", 4, "--target-step", 40,
              "--target-step", 60, "--out", out, "--save-fit", os.path.join(tmp, "f.fit"), check=True)
    assert "explained variance of rank 1 over 2 tensors" in r.stdout
    assert os.path.isfile(os.path.join(out, "step_40", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "step_60", "config.json"))
    assert os.path.isfile(os.path.join(out, "relex_report.json"))
    # history-steps 4 keeps 4 of the 6 checkpoints
    import json
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    assert rep["history_steps"] == [1, 2, 3, 4]
    r = relex("predict", "--fit", os.path.join(tmp, "f.fit"), "--target-step", 80, "--out", out, check=True)
    assert os.path.isdir(os.path.join(out, "step_80"))
    # refuses to overwrite, then replaces with --overwrite
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--out", out,
          "--overwrite", check=True)


def _ck(d, tensors):
    os.makedirs(d)
    write_checkpoint(d, tensors)


def test_input_errors_name_tensor_step_and_file(run):
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    ok = lambda s: os.path.join(rundir, f"global_step_{s}", "actor", "huggingface")  # noqa: E731
    a = np.zeros((16, 8), np.float32)
    bad = os.path.join(tmp, "bad")
    # a checkpoint lacking a tensor
    _ck(os.path.join(bad, "missing"), {"a.weight": ("BF16", dtypes.from_float32(a, "BF16"))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"2={os.path.join(bad, 'missing')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 2", "lacks tensor b", "missing")
    # a float tensor turned integer (another float dtype is read: fp32 masters beside a bf16 base)
    _ck(os.path.join(bad, "dtype"), {"a.weight": ("I32", a.astype(np.int32)), "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"3={os.path.join(bad, 'dtype')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 3", "a.weight", "I32", "BF16")
    # a shape that changes
    _ck(os.path.join(bad, "shape"), {"a.weight": ("BF16", np.zeros((8, 16), np.uint16)),
                                     "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"3={os.path.join(bad, 'shape')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 3", "a.weight", "[8, 16]")
    # NaN in a checkpoint
    nan = dtypes.from_float32(np.full((16, 8), np.nan, np.float32), "BF16")
    _ck(os.path.join(bad, "nan"), {"a.weight": ("BF16", nan), "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"4={os.path.join(bad, 'nan')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 4", "a.weight", "NaN/Inf")
    # duplicate steps
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint", f"1={ok(2)}",
              "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "duplicate step 1")
    # fewer than two history checkpoints
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--history-steps", 1, "--target-step", 9,
              "--out", out)
    assert_clean_failure(r, out, "at least 2 history checkpoints")
    # a target that makes no sense for the mode
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 3, "--out", out)
    assert_clean_failure(r, out, "not after the last history step")
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--mode", "reconstruct", "--target-step", 99,
              "--out", out)
    assert_clean_failure(r, out, "not one of the history steps")
    # rank beyond the history
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--rank", 9, "--target-step", 90, "--out", out)
    assert_clean_failure(r, out, "--rank")
    # an output inside an input
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90, "--out",
              os.path.join(rundir, "pred"))
    assert_clean_failure(r, os.path.join(rundir, "pred"), "inside input")
    assert not os.path.exists(os.path.join(rundir, "pred"))
    # an empty run directory
    os.makedirs(os.path.join(tmp, "empty"))
    r = relex("extrapolate", "--base", base, "--checkpoints", os.path.join(tmp, "empty"), "--target-step", 9,
              "--out", out)
    assert_clean_failure(r, out, "no checkpoints found")
    # a bad memory budget
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90, "--out", out,
              "--memory-budget", "lots")
    assert r.returncode == 2 and "cannot read size" in r.stderr
