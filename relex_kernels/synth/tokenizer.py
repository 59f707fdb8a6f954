"""A tiny byte-level BPE tokenizer in the files a Qwen repository carries.

256 byte tokens (GPT-2's byte-to-unicode map, as Qwen's tokenizer uses), a few dozen
English merges so that text does not come out one byte per token, and Qwen's special
tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``. The files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``vocab.json``, ``merges.txt``) are written by hand; ``AutoTokenizer.from_pretrained``
loads them offline. Its vocabulary (~330 ids) is smaller than any model's
``vocab_size``: the model's extra embedding rows are padding, as in real Qwen models.
"""

from __future__ import annotations

import json
import os

# Pairs in merge order (a later merge may use an earlier result). "Ġ" is the space byte.
_MERGES = [
    "Ġ t", "h e", "i n", "e r", "a n", "r e", "o n", "Ġ a", "e n", "a t", "o u", "e d", "h a",
    "t o", "o r", "i t", "i s", "e s", "Ġ s", "Ġ w", "Ġ o", "Ġ c", "Ġ b", "Ġ f", "Ġ p", "Ġ m",
    "Ġ i", "Ġ d", "n d", "n g", "i ng", "Ġt he", "Ġ an", "Ġan d", "Ġ is", "Ġ in", "Ġt o", "Ġo f",
    "Ġ =", "Ġ +", "Ġ x", "Ġ y", "Ġs o", "Ġso l", "u t", "Ġan s", "Ġans w", "Ġansw er", "i on",
]

# Qwen2's pre-tokenizer: split words, single digits and punctuation runs, then map bytes.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocab_and_merges() -> tuple[dict[str, int], list[list[str]]]:
    """The BPE vocabulary (token -> id, specials excluded) and the merge list."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    nxt = 256
    merges: list[list[str]] = []
    for m in _MERGES:
        a, b = m.split(" ")
        if a not in vocab or b not in vocab or a + b in vocab:
            continue  # "i ng" before "n g" etc.: keep only merges whose parts exist
        merges.append([a, b])
        vocab[a + b] = nxt
        nxt += 1
    return vocab, merges


# Specials follow the regular tokens, as in Qwen's files (transformers' Qwen2Tokenizer
# appends them after vocab.json's ids).
_N_REGULAR = len(vocab_and_merges()[0])
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = _N_REGULAR, _N_REGULAR + 1, _N_REGULAR + 2
SPECIALS = {"<|endoftext|>": ENDOFTEXT_ID, "<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID}


def _added(content: str, i: int) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_files(model_max_length: int) -> dict[str, object]:
    """File name -> JSON object (or text for merges.txt)."""
    vocab, merges = vocab_and_merges()
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(c, i) for c, i in SPECIALS.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {k: v for k, v in _added(c, i).items() if k != "id"}
                                 for c, i in SPECIALS.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
               "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False},
               "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False}}
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {"tokenizer.json": tok, "tokenizer_config.json": cfg, "special_tokens_map.json": special,
            "vocab.json": vocab, "merges.txt": merges_txt}


def write_tokenizer(directory: str, model_max_length: int) -> None:
    for name, obj in tokenizer_files(model_max_length).items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
            if isinstance(obj, str):
                fh.write(obj)
            else:
                json.dump(obj, fh, indent=2, ensure_ascii=False)
                fh.write("\n")
