"""The verifiable task, its tokenizer and its model: three-digit addition, checked exactly.

A prompt is ``"123+456="``, the answer ``"579"`` followed by the end-of-sequence token.
The reward is verifiable: a completion is right when its text up to the end token is the
sum's digits, nothing else (:func:`reward` adds partial credit for digits right in place). One character is one token, so the tokenizer is a real
``PreTrainedTokenizerFast`` (a word-level ``tokenizers`` model over the 12 characters),
saved with every checkpoint like any Hugging Face model's.

The model is a real transformers architecture (Qwen3, tied embeddings like Qwen3-0.6B),
a few million parameters so that supervised training, GRPO and every evaluation run on
two CPU cores within minutes.
"""

from __future__ import annotations

import random

import torch

CHARS = "0123456789+="
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
#: the widest answer (999 + 999 = 1998) plus the end token
MAX_ANSWER_TOKENS = 5


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=PAD, padding_side="left")


def make_model(tokenizer, size: str = "small", seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, inter = {"small": (256, 4, 768), "mini": (64, 2, 128)}[size]
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=32, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def problems(n: int, seed: int, exclude: set | None = None) -> list[tuple[int, int]]:
    """``n`` distinct pairs (a, b), 0 <= a, b <= 999, none in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p = (rng.randrange(1000), rng.randrange(1000))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer(a: int, b: int) -> str:
    return str(a + b)


def is_correct(completion: str, truth: str) -> bool:
    """Exact: the completion's text (decoded without special tokens, cut at the end token) is the sum."""
    return completion.strip() == truth


def reward(completion: str, truth: str) -> float:
    """1 for the exact answer; else a partial credit of 0.5 x the share of the answer's digits
    right in place (aligned on the units digit), so a group of completions that are all wrong
    still tells GRPO which are closer. Accuracy is always scored exactly (:func:`is_correct`)."""
    c = completion.strip()
    if c == truth:
        return 1.0
    right = sum(a == b for a, b in zip(reversed(c), reversed(truth)))
    return 0.5 * right / max(len(truth), len(c), 1)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs: list[tuple[int, int]], batch: int = 512) -> float:
    """Share of ``pairs`` answered exactly with greedy decoding."""
    model.eval()
    right = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        enc = tokenizer([prompt(a, b) for a, b in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(is_correct(t, answer(a, b)) for t, (a, b) in zip(texts, chunk))
    return right / len(pairs)
