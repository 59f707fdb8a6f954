"""The synthetic trajectory generator: real Qwen names/shapes, exact modes, RNE, layouts, CLI."""

import hashlib
import json
import os

import numpy as np
import pytest

from relex_kernels.errors import OutputError, UsageError
from relex_kernels.io import Checkpoint
from relex_kernels.io.dtypes import from_float32, to_float32
from relex_kernels.synth import LAYOUTS, SynthRun, parse_steps, synthesize
from relex_kernels.synth import generate as synth_generate
from relex_kernels.engine.plan import parse_positive_size as parse_bytes
from relex_kernels.synth.layouts import every_steps


def _read(ckpt_dir):
    """name -> (dtype, float32 array) through the project's reader."""
    c = Checkpoint(ckpt_dir)
    try:
        return {n: (loc.info.dtype, to_float32(np.array(loc.file.view(n)), loc.info.dtype).reshape(loc.info.shape))
                for n, loc in c.tensors.items()}
    finally:
        c.close()


def _digest(run):
    h = hashlib.sha256()
    for d in [run.base_dir] + [run.checkpoints[s] for s in run.steps]:
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("s") / "tiny"), size="tiny", steps=[1, 2, 3, 4], seed=3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [True, False])
def test_names_and_shapes_match_transformers(tmp, arch, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = synthesize(os.path.join(tmp, "r"), arch=arch, size="tiny", steps=[1], tie=tie)
    cfg = transformers.AutoConfig.from_pretrained(run.base_dir)
    assert cfg.model_type == arch and cfg.tie_word_embeddings is tie
    sd = transformers.AutoModelForCausalLM.from_config(cfg).state_dict()
    ours = _read(run.base_dir)
    expect = set(sd) if not tie else set(sd) - {"lm_head.weight"}
    assert set(ours) == expect
    for n, (dt, a) in ours.items():
        assert dt == "BF16" and tuple(sd[n].shape) == a.shape, n
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    else:
        assert ours["model.layers.1.self_attn.k_norm.weight"][1].shape == (cfg.head_dim,)
    if arch == "qwen3" and tie:  # one full load: no missing / unexpected keys, values as stored
        m, info = transformers.AutoModelForCausalLM.from_pretrained(run.checkpoints[1], output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert m.dtype == torch.bfloat16
        got = m.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy()
        np.testing.assert_array_equal(got, _read(run.checkpoints[1])["model.layers.0.mlp.down_proj.weight"][1])
        assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, cfg.vocab_size)


def test_store_tied_head_equals_embedding(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2], store_tied_head=True)
    t = _read(run.checkpoints[2])
    np.testing.assert_array_equal(t["lm_head.weight"][1], t["model.embed_tokens.weight"][1])
    assert run.config["tie_word_embeddings"] is True


def test_tokenizer_and_side_files_load_offline(tiny, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(tiny.checkpoints[4])
    text = "The answer is 42 and x = 1 + 2."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < tiny.config["vocab_size"]
    assert tok.eos_token_id == tiny.config["eos_token_id"] and tok.pad_token_id == tiny.config["bos_token_id"]
    gen = transformers.GenerationConfig.from_pretrained(tiny.base_dir)
    assert tok.eos_token_id in gen.eos_token_id
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def test_files_read_back_with_safetensors(tmp):
    st = pytest.importorskip("safetensors")
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2], shard_bytes=200_000, dtype="F16")
    d = run.checkpoints[2]
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ours = _read(d)
    seen = set()
    for sh in shards:
        with st.safe_open(os.path.join(d, sh), "np") as f:
            assert f.metadata()["format"] == "pt"
            for k in f.keys():
                seen.add(k)
                np.testing.assert_array_equal(f.get_tensor(k).astype(np.float32), ours[k][1])
    assert seen == set(index["weight_map"]) == set(ours)
    assert index["metadata"]["total_size"] == run.info["bytes_per_checkpoint"]


def test_deterministic_by_seed_and_independent_of_threads(tmp, tiny):
    again = synthesize(os.path.join(tmp, "a"), size="tiny", steps=[1, 2, 3, 4], seed=3, threads=1)
    assert _digest(again) == _digest(tiny)
    other = synthesize(os.path.join(tmp, "b"), size="tiny", steps=[1, 2, 3, 4], seed=4, threads=2)
    assert _digest(other) != _digest(tiny)


def _deltas(run, name):
    base = _read(run.base_dir)[name][1].astype(np.float64).ravel()
    return np.stack([_read(run.checkpoints[s])[name][1].astype(np.float64).ravel() - base for s in run.steps])


def test_exact_mode_is_exactly_rank1_and_linear(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2, 3, 5, 8], noise=0, dtype="F32")
    assert run.info["exact"]
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        M = _deltas(run, name)
        assert np.mean(M[0] != 0) > 0.9
        for k, s in enumerate(run.steps):  # θ(t) − θ₀ == t·(θ(1) − θ₀), bit for bit in fp32
            np.testing.assert_array_equal(M[k].astype(np.float32), np.float32(s) * M[0].astype(np.float32))
        sv = np.linalg.svd(M, compute_uv=False)
        assert sv[1] <= 1e-12 * sv[0], (name, sv)
        # the truth at any far step is on the same line, exactly
        base = _read(run.base_dir)[name][1]
        far = run.info["exact_up_to_step"]
        assert far == 160
        np.testing.assert_array_equal(run.mean(name, far) - base, np.float32(far) * M[0].reshape(base.shape))


def test_exact_orthogonal_curvature_is_exactly_rank2(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2, 3, 4, 6], noise=0, curvature=0.05,
                     dtype="F32")
    M = _deltas(run, "model.layers.0.self_attn.q_proj.weight")
    sv = np.linalg.svd(M, compute_uv=False)
    assert sv[1] > 1e-3 * sv[0] and sv[2] <= 1e-12 * sv[0], sv


def test_bf16_is_round_to_nearest_even_of_the_master(tiny):
    torch = pytest.importorskip("torch")
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.input_layernorm.weight"):
        for step in (0, 3):
            master = tiny.master(name, step)
            stored = _read(tiny.base_dir if step == 0 else tiny.checkpoints[step])[name][1]
            np.testing.assert_array_equal(stored, to_float32(from_float32(master, "BF16"), "BF16"))
            np.testing.assert_array_equal(stored, torch.from_numpy(master).bfloat16().float().numpy())
    # exact ties go to even, as the project's rounding says
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    assert np.array_equal(to_float32(from_float32(ties, "BF16"), "BF16"), np.array([1, 1 + 2**-6], np.float32))


def test_realistic_magnitudes(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 8], seed=1)
    w = "model.layers.1.mlp.gate_proj.weight"
    base, s1, s8 = (_read(d)[w][1] for d in (run.base_dir, run.checkpoints[1], run.checkpoints[8]))
    assert 0.015 < base.std() < 0.025
    assert 0.9 < _read(run.base_dir)["model.norm.weight"][1].mean() < 1.1
    rel = np.linalg.norm(run.master(w, 1) - run.master(w, 0)) / np.linalg.norm(run.master(w, 0))
    assert 3e-5 < rel < 3e-3
    # bf16 hides most per-step moves: few values change at step 1, many by step 8
    frac1, frac8 = np.mean(s1 != base), np.mean(s8 != base)
    assert 0.01 < frac1 < 0.5 and frac8 > 2 * frac1
    drifts = [t["drift_per_step"] / t["init_std"] for t in run.info["tensors"].values() if t["kind"] == "linear"]
    assert 1e-5 < min(drifts) < max(drifts) < 3e-3 and max(drifts) > 2 * min(drifts)  # varies by tensor


def test_random_walk_has_independent_increments(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2, 4, 16], drift=0, noise=1e-3, dtype="F32")
    name = "model.embed_tokens.weight"
    w = {s: run.master(name, s).astype(np.float64) - run.master(name, 0) for s in run.steps}
    v = {s: w[s].var() for s in w}
    assert abs(v[4] / v[1] - 4) < 0.3 and abs(v[16] / v[4] - 4) < 0.3
    assert abs(np.corrcoef((w[16] - w[4]).ravel(), w[4].ravel())[0, 1]) < 0.02
    np.testing.assert_array_equal(run.mean(name, 16), run.master(name, 0))  # no drift: the mean stays


def test_truth_steps_continue_the_same_trajectory(tmp):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1, 2], truth_steps=[50])
    name = "model.layers.0.mlp.up_proj.weight"
    assert os.path.isdir(run.truth[50]) and run.truth[50].endswith(os.path.join("truth", "step_50"))
    stored = _read(run.truth[50])[name][1]
    np.testing.assert_array_equal(stored, to_float32(from_float32(run.master(name, 50), "BF16"), "BF16"))
    assert 50 not in run.checkpoints


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_are_discovered(tmp, layout):
    run = synthesize(os.path.join(tmp, "r"), size="tiny", steps=[2, 10], layout=layout)
    from relex_kernels.io.checkpoint import holds_weights
    from relex_kernels.synth.layouts import TORCH_LAYOUTS
    for s, d in run.checkpoints.items():
        if layout in TORCH_LAYOUTS:  # rank files / DCP chunks, written by torch (tests/test_fsdp_inputs.py)
            assert holds_weights(d) and not os.path.isfile(os.path.join(d, "model.safetensors"))
        else:
            assert os.path.isfile(os.path.join(d, "model.safetensors")) and os.path.isfile(os.path.join(d, "config.json"))
        assert os.path.relpath(d, run.run_dir) == LAYOUTS[layout].format(step=s)
    try:
        from relex_kernels.io.layout import discover
    except ImportError:
        return
    assert {s: os.path.abspath(p) for s, p in discover(run.run_dir).items()} == run.checkpoints
    assert SynthRun.load(run.out_dir).checkpoints == run.checkpoints


def test_step_and_size_parsing():
    assert parse_steps("1-4,8,10-30:10") == [1, 2, 3, 4, 8, 10, 20, 30]
    assert parse_steps("16,5,5") == [5, 16]
    assert every_steps(5, 3) == [5, 10, 15]
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("64M") == 64 << 20
    for bad in ("0-3", "4-2", "a", ""):
        with pytest.raises(UsageError):
            parse_steps(bad)


def _cli(*argv):
    from relex_kernels.cli import main
    return main(["synth", *argv])


def test_cli_refuses_existing_output_and_leaves_nothing(tmp, capsys):
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").close()
    assert _cli(out, "-q") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(out, "-q", "--overwrite") == 2  # not a synth output: never deleted
    assert os.listdir(out) == ["keep.txt"]
    fresh = os.path.join(tmp, "fresh")
    assert _cli(fresh, "--every", "2", "--num", "3", "--layout", "hf", "--truth", "40") == 0
    assert "base:" in capsys.readouterr().out
    r = SynthRun.load(fresh)
    assert r.steps == [2, 4, 6] and sorted(r.truth) == [40]
    assert _cli(fresh, "-q", "--overwrite", "--steps", "1-2") == 0
    assert SynthRun.load(fresh).steps == [1, 2]
    assert _cli(os.path.join(tmp, "x"), "--steps", "3", "--every", "2", "--num", "2") == 2
    assert sorted(os.listdir(tmp)) == ["fresh", "out"]  # no temporary directories left


def test_failure_midway_leaves_nothing(tmp, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk on fire")
    monkeypatch.setattr(synth_generate, "round_into", boom)
    with pytest.raises(OSError):
        synthesize(os.path.join(tmp, "r"), size="tiny", steps=[1])
    assert os.listdir(tmp) == []
    with pytest.raises(OSError):  # the parents made for it go too
        synthesize(os.path.join(tmp, "a", "b", "r"), size="tiny", steps=[1])
    assert os.listdir(tmp) == []
    # parents are made as by mkdir -p ('relex synth runs/tiny' in a fresh directory); one that cannot
    # be (a file in the way) is an OutputError, and nothing is left
    open(os.path.join(tmp, "file"), "w").close()
    with pytest.raises(OutputError, match="cannot create the parent directory"):
        synthesize(os.path.join(tmp, "file", "parent", "r"), size="tiny", steps=[1])
    assert os.listdir(tmp) == ["file"]
    monkeypatch.undo()
    syn = synthesize(os.path.join(tmp, "no", "parent", "r"), size="tiny", steps=[1])
    assert os.path.isdir(syn.base_dir)


def test_relex_synth_rank_writers_end_without_noise(tmp_path):
    """`relex synth --layout verl-fsdp1` with its progress bars: exit 0, every rank file there, and
    stderr free of warnings (the rank processes end with os._exit; tqdm's default multiprocessing lock
    would leave a semaphore for the resource tracker to warn about)."""
    pytest.importorskip("torch")
    import subprocess
    import sys
    out = str(tmp_path / "r")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "synth", out, "--size", "tiny", "--layout",
                        "verl-fsdp1", "--world-size", "2", "--steps", "1-2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    for s in (1, 2):
        actor = os.path.join(out, "run", f"global_step_{s}", "actor")
        assert {f"model_world_size_2_rank_{k}.pt" for k in (0, 1)} <= set(os.listdir(actor))
