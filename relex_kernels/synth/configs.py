"""Model shapes of the synthetic checkpoints: Qwen2 / Qwen3 names, shapes and config files.

Tensor names and shapes are exactly those ``transformers`` gives ``Qwen2ForCausalLM``
and ``Qwen3ForCausalLM`` (checked by ``tests/test_synth.py``), in the model's module
order (the order ``state_dict()`` and ``save_pretrained`` use). ``config.json`` is
written the way the hub's Qwen files are (``rope_theta``, ``torch_dtype``), which
``transformers`` 4.x and 5.x both read. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

from ..errors import UsageError
from .tokenizer import ENDOFTEXT_ID, IM_END_ID

ARCHS = ("qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of one model size. ``head_dim`` is ignored by qwen2 (hidden / heads there)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie: bool = True
    max_position: int = 40960
    rope_theta: float = 1000000.0
    rms_eps: float = 1e-6


#: Sizes. ``220m`` is the benchmark shape; ``0.6b`` is Qwen3-0.6B's exact shape and
#: ``1.5b`` Qwen2.5-Math-1.5B's (use it with ``arch="qwen2"``).
SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256,
                       vocab=512, max_position=2048),
    "small": ModelShape(hidden=384, layers=6, heads=6, kv_heads=2, head_dim=64, intermediate=1024,
                        vocab=16384, max_position=4096),
    "220m": ModelShape(hidden=1024, layers=12, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       vocab=32000),
    "0.6b": ModelShape(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       vocab=151936),
    "1.5b": ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960,
                       vocab=151936, max_position=4096, rope_theta=10000.0),
}

#: Storage dtype -> the ``torch_dtype`` string of config.json.
TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class TensorDef:
    """One stored tensor. ``kind`` picks its init and drift scales (see trajectory.KINDS);
    ``source`` is the tensor whose values it carries (itself, or the embedding for a
    stored tied head)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    source: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


def resolve_shape(arch: str, size: str, tie: bool | None = None) -> ModelShape:
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    if arch == "qwen2":
        # Qwen2 has no head_dim in its config: q_proj is hidden x hidden.
        s = replace(s, head_dim=s.hidden // s.heads)
    if tie is not None:
        s = replace(s, tie=bool(tie))
    return s


def tensor_defs(arch: str, s: ModelShape, store_tied_head: bool = False) -> list[TensorDef]:
    """Every stored tensor of the model, in module order."""
    h, hd = s.hidden, s.head_dim
    q, kv = s.heads * hd, s.kv_heads * hd
    out = [TensorDef("model.embed_tokens.weight", (s.vocab, h), "embed", "model.embed_tokens.weight")]

    def add(name: str, shape: tuple[int, ...], kind: str) -> None:
        out.append(TensorDef(name, shape, kind, name))

    for i in range(s.layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            add(f"{p}self_attn.{proj}.weight", (rows, h), "linear")
            if arch == "qwen2":
                add(f"{p}self_attn.{proj}.bias", (rows,), "bias")
        add(f"{p}self_attn.o_proj.weight", (h, q), "linear")
        if arch == "qwen3":
            add(f"{p}self_attn.q_norm.weight", (hd,), "norm")
            add(f"{p}self_attn.k_norm.weight", (hd,), "norm")
        add(f"{p}mlp.gate_proj.weight", (s.intermediate, h), "linear")
        add(f"{p}mlp.up_proj.weight", (s.intermediate, h), "linear")
        add(f"{p}mlp.down_proj.weight", (h, s.intermediate), "linear")
        add(f"{p}input_layernorm.weight", (h,), "norm")
        add(f"{p}post_attention_layernorm.weight", (h,), "norm")
    add("model.norm.weight", (h,), "norm")
    if not s.tie:
        add("lm_head.weight", (s.vocab, h), "head")
    elif store_tied_head:
        out.append(TensorDef("lm_head.weight", (s.vocab, h), "embed", "model.embed_tokens.weight"))
    return out


def config_json(arch: str, s: ModelShape, dtype: str = "BF16") -> dict:
    """config.json as the hub's Qwen2.5 / Qwen3 repositories write it."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID if arch == "qwen3" else ENDOFTEXT_ID,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": s.max_position,
        "max_window_layers": s.layers,
        "model_type": arch,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": s.rms_eps,
        "rope_scaling": None,
        "rope_theta": s.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": s.tie,
        "torch_dtype": TORCH_DTYPE[dtype],
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s.vocab,
    }
    if arch == "qwen3":
        cfg["attention_bias"] = False
        cfg["head_dim"] = s.head_dim
    return dict(sorted(cfg.items()))


def generation_config_json(arch: str) -> dict:
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "do_sample": True,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
        "temperature": 0.6 if arch == "qwen3" else 0.7,
        "top_k": 20,
        "top_p": 0.95 if arch == "qwen3" else 0.8,
        "transformers_version": "4.51.0",
    }


def param_count(defs: list[TensorDef]) -> int:
    """Unique parameters (a stored tied head is not counted twice)."""
    return sum(d.numel for d in defs if d.source == d.name)
