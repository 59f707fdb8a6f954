"""Output heads (tied or not), the public API's argument checks, and options the authors refuse.

Fixtures come from the formats' own writers (transformers ``save_pretrained``, safetensors
``save_file``); predictions are judged against an explicit numpy SVD + polyfit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import relex_kernels
from relex_kernels.cli import main
from relex_kernels.errors import ArgumentError, RelexError, RelexWarning, UsageError
from relex_kernels.fit import FitOptions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
STEPS = [2, 4, 6, 8]
TARGET = 20


def tiny_llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def llama_run(root, tie: bool, steps=STEPS):
    """A base and history checkpoints by ``save_pretrained``: θ_s = θ₀ + s·v + noise, per parameter."""
    model = tiny_llama(tie)
    base = os.path.join(root, "base")
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())  # a tied head is one parameter with the embedding
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    direction = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in params.items()}
    ckpts = {}
    for s in steps:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n] + s * direction[n] + 1e-3 * torch.randn(p.shape, generator=gen))
        ckpts[s] = os.path.join(root, "run", f"checkpoint-{s}")
        model.save_pretrained(ckpts[s])
    return base, ckpts


def tensors(d) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def reference(base, ckpts, name, target):
    """RELEX by hand: rank-1 SVD of the stacked fp64 deltas, a straight line through the coefficients."""
    steps = sorted(ckpts)
    th0 = tensors(base)[name].astype(np.float64)
    M = np.stack([(tensors(ckpts[s])[name].astype(np.float64) - th0).ravel() for s in steps])
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    c = U[:, 0] * S[0]
    return th0 + np.polyval(np.polyfit(np.array(steps, float), c, 1), target) * Vh[0].reshape(th0.shape)


def assert_close(got, want, th0):
    tol = 1e-5 * np.abs(want - th0).max() + 2e-7 * np.abs(want).max()
    assert np.abs(got.astype(np.float64) - want).max() <= tol, np.abs(got - want).max()


def edit_config(d, fn):
    p = os.path.join(d, "config.json")
    with open(p) as fh:
        cfg = json.load(fh)
    fn(cfg)
    with open(p, "w") as fh:
        json.dump(cfg, fh)


# -- 1. a distinct lm_head is never written over ----------------------------------------------
def test_untied_llama_without_tie_key_fits_its_own_head(tmp):
    base, ck = llama_run(tmp, tie=False)
    edit_config(base, lambda c: c.pop("tie_word_embeddings"))
    res = relex_kernels.extrapolate(base, ck, [TARGET], os.path.join(tmp, "out"))
    out = tensors(res.outputs[0])
    assert "lm_head.weight" in {r["name"] for r in res.report["tensors"]}
    assert not np.array_equal(out[HEAD], out[EMB])
    th0 = tensors(base)
    for name in (HEAD, EMB):
        assert_close(out[name], reference(base, ck, name, TARGET), th0[name])
    # and transformers reads the same head back: logits are the reference head's
    model = transformers.AutoModelForCausalLM.from_pretrained(res.outputs[0])
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), out[HEAD])


def test_no_config_and_distinct_head_is_not_tied(tmp):
    base, ck = llama_run(tmp, tie=False)
    os.unlink(os.path.join(base, "config.json"))
    res = relex_kernels.extrapolate(base, ck, [TARGET], os.path.join(tmp, "out"))
    out = tensors(res.outputs[0])
    assert not np.array_equal(out[HEAD], out[EMB])
    assert_close(out[HEAD], reference(base, ck, HEAD, TARGET), tensors(base)[HEAD])


def test_no_config_and_head_equal_to_embedding_is_tied(tmp):
    base, ck = llama_run(tmp, tie=True)
    os.unlink(os.path.join(base, "config.json"))
    t = tensors(base)
    save_file({k: torch.from_numpy(v) for k, v in {**t, HEAD: t[EMB].copy()}.items()},
              os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    res = relex_kernels.extrapolate(base, ck, [TARGET], os.path.join(tmp, "out"))
    out = tensors(res.outputs[0])
    np.testing.assert_array_equal(out[HEAD], out[EMB])
    assert_close(out[EMB], reference(base, ck, EMB, TARGET), t[EMB])


def test_tied_base_with_checkpoints_storing_the_head_is_accepted(tmp):
    base, ck = llama_run(tmp, tie=True)
    assert HEAD not in tensors(base)  # transformers stores a tied model without its head
    for d in ck.values():  # an export that stores the tied head all the same
        t = tensors(d)
        save_file({k: torch.from_numpy(v) for k, v in {**t, HEAD: t[EMB].copy()}.items()},
                  os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    res = relex_kernels.extrapolate(base, ck, [TARGET], os.path.join(tmp, "out"))
    out = tensors(res.outputs[0])
    assert set(out) == set(tensors(base))
    assert_close(out[EMB], reference(base, ck, EMB, TARGET), tensors(base)[EMB])
    model = transformers.AutoModelForCausalLM.from_pretrained(res.outputs[0])
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), out[EMB])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "gpt_neox", "olmo2",
                                        "gpt2", "gemma2", "opt", "bloom"])
def test_tie_defaults_agree_with_transformers(model_type):
    from relex_kernels.engine.heads import default_tie
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = transformers.CONFIG_MAPPING[model_type]().tie_word_embeddings
    assert default_tie({"model_type": model_type}) is want


# -- 3. fit-reconstruct with a step scale: refused like the authors' script ---------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny safetensors trajectory (steps 2, 4, ..., 12), shared by the argument tests."""
    root = str(tmp_path_factory.mktemp("small"))
    rng = np.random.default_rng(0)
    th0, v = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    dirs = {}
    for s in [0, 2, 4, 6, 8, 10, 12]:
        d = os.path.join(root, "base" if s == 0 else f"run/step_{s}")
        os.makedirs(d)
        x = th0 + 1e-2 * s * v + 1e-3 * rng.normal(size=th0.shape).astype(np.float32)
        save_file({"w": torch.from_numpy(x)}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        dirs[s] = d
    base = dirs.pop(0)
    return root, base, dirs


@pytest.mark.parametrize("mode", ["fit-reconstruct", "reconstruct"])
def test_step_scale_outside_extrapolate_is_refused_by_the_api(small, tmp, mode):
    root, base, ck = small
    opts = FitOptions(mode=mode, time_axis="index", step_scale=2.0)
    with pytest.raises(UsageError, match="--step-scale"):
        relex_kernels.extrapolate(base, ck, [12], os.path.join(tmp, "out"), opts)
    assert not os.path.exists(os.path.join(tmp, "out"))


@pytest.mark.parametrize("name, opts", [("rank", dict(rank=9)), ("window", dict(window=1)),
                                         ("degree", dict(fit="poly", degree=9)), ("step_scale", dict(step_scale=-1.0))])
def test_a_bad_option_is_named_as_the_api_spells_it_and_as_the_cli_does(small, tmp, name, opts):
    """An embedding tool reads the FitOptions field it passed; a command-line user the flag."""
    root, base, ck = small
    with pytest.raises(UsageError) as ei:
        relex_kernels.extrapolate(base, ck, [30], os.path.join(tmp, "out"), FitOptions(**opts))
    flag = "--" + name.replace("_", "-")
    assert str(ei.value).startswith(f"{name} ({flag})"), str(ei.value)


def test_step_scale_outside_extrapolate_is_refused_by_the_cli(small, tmp, capsys):
    root, base, ck = small
    out = os.path.join(tmp, "out")
    rc = main(["extrapolate", "--base", base, "--checkpoints", os.path.join(root, "run"), "--target-step", "12",
               "--mode", "fit-reconstruct", "--time-axis", "index", "--step-scale", "2", "--out", out, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--step-scale" in err and "Traceback" not in err, err
    assert not os.path.exists(out)


def test_fit_reconstruct_on_the_index_axis_fits_at_the_steps_index(small, tmp):
    root, base, ck = small
    res = relex_kernels.extrapolate(base, ck, [12], os.path.join(tmp, "out"),
                                    FitOptions(mode="fit-reconstruct", time_axis="index"))
    th0 = tensors(base)["w"].astype(np.float64)
    M = np.stack([tensors(ck[s])["w"].astype(np.float64).ravel() - th0.ravel() for s in sorted(ck)])
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    chat = np.polyval(np.polyfit(np.arange(6.0), U[:, 0] * S[0], 1), 5.0)  # step 12 is index 5
    assert_close(tensors(res.outputs[0])["w"], th0 + chat * Vh[0].reshape(th0.shape), th0)


# -- 9. the public API names a bad argument, before touching any file ---------------------------
def _extrapolate_cases(base, ck, out):
    good = dict(base=base, checkpoints=ck, targets=[30], out_dir=out)
    return [
        ("base", dict(good, base={"dir": base})),
        ("base", dict(good, base=None)),
        ("checkpoints", dict(good, checkpoints={str(s): d for s, d in ck.items()})),
        ("checkpoints", dict(good, checkpoints=list(ck.values()))),
        ("checkpoints[2]", dict(good, checkpoints={**ck, 2: 7})),
        ("targets", dict(good, targets=30)),
        ("targets", dict(good, targets=["30"])),
        ("targets", dict(good, targets=[30.0])),
        ("out_dir", dict(good, out_dir=5)),
        ("opts", dict(good, opts={"rank": 1})),
        ("opts: FitOptions.rank", dict(good, opts=FitOptions(rank="1"))),
        ("opts: FitOptions.step_scale", dict(good, opts=FitOptions(step_scale="2"))),
        ("opts: FitOptions.window", dict(good, opts=FitOptions(window=3.5))),
        ("memory_budget", dict(good, memory_budget="4G")),
        ("memory_budget", dict(good, memory_budget=0)),  # (not the default: the command refuses 0 too)
        ("device_memory_budget", dict(good, device_memory_budget=-1)),
        ("shard_bytes", dict(good, shard_bytes=None)),
        ("backend", dict(good, backend=1)),
        ("overwrite", dict(good, overwrite="yes")),
        ("progress", dict(good, progress=None)),
        ("resume", dict(good, resume=1)),
        ("save_fit", dict(good, save_fit=3)),
        ("run_dir", dict(good, run_dir=["run"])),
    ]


def test_extrapolate_names_each_bad_argument(small, tmp):
    root, base, ck = small
    out = os.path.join(tmp, "out")
    for name, kw in _extrapolate_cases(base, ck, out):
        with pytest.raises(ArgumentError) as ei:
            relex_kernels.extrapolate(**kw)
        assert isinstance(ei.value, UsageError) and isinstance(ei.value, RelexError)
        assert str(ei.value).startswith(name), (name, str(ei.value))
        assert len(str(ei.value).splitlines()) == 1
        assert not os.path.exists(out), name


def test_predict_names_each_bad_argument(small, tmp):
    root, base, ck = small
    fit = os.path.join(tmp, "run.fit")
    relex_kernels.extrapolate(base, ck, [30], os.path.join(tmp, "first"), save_fit=fit)
    out = os.path.join(tmp, "out")
    good = dict(fit_path=fit, targets=[40], out_dir=out)
    for name, kw in [("fit_path", dict(good, fit_path=None)), ("targets", dict(good, targets=40)),
                     ("targets", dict(good, targets={40: 1})), ("out_dir", dict(good, out_dir=3)),
                     ("memory_budget", dict(good, memory_budget=1.5)), ("overwrite", dict(good, overwrite=None)),
                     ("backend", dict(good, backend=["reference"])), ("shard_bytes", dict(good, shard_bytes="5GB"))]:
        with pytest.raises(ArgumentError) as ei:
            relex_kernels.predict(**kw)
        assert str(ei.value).startswith(name), (name, str(ei.value))
        assert not os.path.exists(out), name
    # the ordinary spellings still work: numpy ints, tuples, os.PathLike
    import pathlib
    res = relex_kernels.predict(pathlib.Path(fit), (np.int64(40),), pathlib.Path(out))
    assert res.outputs and os.path.isdir(res.outputs[0])


# -- 11. the base is also a history checkpoint ------------------------------------------------
def test_base_that_is_a_history_checkpoint_warns_and_runs(small, tmp):
    root, base, ck = small
    with pytest.warns(RelexWarning, match="step 4"):
        res = relex_kernels.extrapolate(ck[4], ck, [30], os.path.join(tmp, "out"))
    assert os.path.isdir(res.outputs[0])
    link = os.path.join(tmp, "link")  # the same directory through a symlink
    os.symlink(ck[6], link)
    with pytest.warns(RelexWarning, match="step 6"):
        relex_kernels.extrapolate(link, ck, [30], os.path.join(tmp, "out2"))


def test_base_that_is_a_history_checkpoint_warns_on_the_cli(small, tmp):
    root, base, ck = small
    out = os.path.join(tmp, "out")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", ck[4], "--checkpoints",
                        os.path.join(root, "run"), "--target-step", "30", "--out", out, "-q"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relex extrapolate: warning: ") and "step 4" in err[0], r.stderr
    assert os.path.isdir(os.path.join(out, "step_30"))


def test_distinct_base_does_not_warn(small, tmp):
    root, base, ck = small
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RelexWarning)
        res = relex_kernels.extrapolate(base, ck, [30], os.path.join(tmp, "out"))
    assert [w for w in caught if issubclass(w.category, RelexWarning)] == []
    assert os.path.isdir(res.outputs[0])
