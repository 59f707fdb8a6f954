"""A state dict in memory -> a predicted state dict -> ``model.load_state_dict``.

    python examples/state_dict_in_memory.py

A tiny Qwen2 model (transformers) stands in for your policy; its "checkpoints" are made
here by moving every weight along a straight line with a little noise, as RLVR does. In
your training code, ``history`` is the state dicts you kept (or lazy
``safetensors.safe_open`` handles of saved checkpoints: only one tensor's versions are
held in memory at a time).
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import relex_kernels as rk


def main(steps=(10, 20, 30, 40), target: int = 160, seed: int = 0) -> float:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    base = model.state_dict()  # the tied head shares the embedding's storage: predicted as one tensor
    # the tied head moves with the embedding: no drift of its own
    drift = {k: 1e-3 * torch.randn(v.shape) for k, v in base.items() if v.is_floating_point() and k != "lm_head.weight"}

    def checkpoint(step: int) -> dict[str, torch.Tensor]:
        sd = {}
        for k, v in base.items():
            if k == "lm_head.weight":
                continue
            if k in drift:
                noise = 2e-4 * torch.randn(v.shape)
                sd[k] = (v.float() + step * drift[k] + noise).to(v.dtype)
            else:
                sd[k] = v
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    history = {s: checkpoint(s) for s in steps}
    predicted = rk.extrapolate_state_dict(base, history, [target])[target]
    # how far the prediction is from where the straight line lands at the target
    err = max(float((predicted[k].float() - (base[k].float() + target * drift[k])).abs().max()
                    / (target * drift[k]).abs().max()) for k in drift)
    if predicted["lm_head.weight"] is not predicted["model.embed_tokens.weight"]:
        raise RuntimeError("the tied head was not written as the embedding")
    model.load_state_dict(predicted)  # (base holds views of the model's parameters: they change now)
    print(f"predicted step {target} from steps {list(steps)}: {len(predicted)} tensors loaded into the model; "
          f"largest error {err:.2%} of the distance moved")
    return err


if __name__ == "__main__":
    main()
