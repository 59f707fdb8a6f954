"""A predicted checkpoint is a ready-to-load Hugging Face directory."""

from __future__ import annotations

import os

import pytest

from relex_kernels.engine import extrapolate
from relex_kernels.synth import synthesize


@pytest.mark.parametrize("arch,tie", [("qwen3", None), ("qwen2", False)])
def test_output_loads_in_transformers_and_runs_forward(tmp, arch, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    syn = synthesize(os.path.join(tmp, "syn"), arch=arch, size="tiny", steps=range(1, 7), seed=3, tie=tie,
                     shard_bytes=300_000)
    res = extrapolate(syn.base_dir, syn.checkpoints, [60], os.path.join(tmp, "out"), shard_bytes=300_000)
    out = res.outputs[0]
    base_names = set(os.listdir(syn.base_dir))
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert "model.safetensors.index.json" in os.listdir(out) and "model.safetensors.index.json" in base_names

    from safetensors.torch import load_file
    got = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            got.update(load_file(os.path.join(out, f)))
    ref = {}
    for f in os.listdir(syn.base_dir):
        if f.endswith(".safetensors"):
            ref.update(load_file(os.path.join(syn.base_dir, f)))
    assert set(got) == set(ref)
    assert all(got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype for k in ref)
    assert any(not torch.equal(got[k], ref[k]) for k in ref)

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = model.state_dict()
    for k, v in got.items():
        assert torch.equal(sd[k], v), k
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits.float()).all()
