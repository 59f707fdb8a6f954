"""Grouping per-tensor figures by module type and by layer.

Module types follow the tensor names of Llama/Qwen-style checkpoints (``q_proj`` …,
``embed_tokens``, ``lm_head``) with GPT-2/NeoX spellings as fallbacks; what no rule
names is ``other``. Biases form their own group: they move unlike the weight
matrices they belong to, and would blur the matrices' figures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from .metrics import SS_SUFFIX, pooled_r2

#: module types in display order (heatmap columns are the per-layer ones)
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "norm", "embedding", "head", "bias", "other")
LAYER_MODULES = ("q", "k", "v", "o", "gate", "up", "down", "norm")

_RULES = [
    ("embedding", re.compile(r"(embed_tokens|\bwte|embed_in|word_embeddings)")),
    ("head", re.compile(r"(lm_head|embed_out)")),
    ("norm", re.compile(r"(norm|ln_\d|ln_f|layernorm)")),
    ("q", re.compile(r"(q_proj|\bwq\b|query)")),
    ("k", re.compile(r"(k_proj|\bwk\b|\bkey\b)")),
    ("v", re.compile(r"(v_proj|\bwv\b|value)")),
    ("o", re.compile(r"(o_proj|out_proj|\bwo\b|attn\.c_proj|attention\.dense)")),
    ("gate", re.compile(r"(gate_proj|\bw1\b)")),
    ("up", re.compile(r"(up_proj|\bw3\b|c_fc|dense_h_to_4h)")),
    ("down", re.compile(r"(down_proj|\bw2\b|mlp\.c_proj|dense_4h_to_h)")),
]
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q``; a bias -> ``bias``."""
    if name.endswith(".bias"):
        return "bias"
    for kind, rx in _RULES:
        if rx.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None (embedding, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _means(entries: list[dict], keys: Iterable[str]) -> dict:
    out = {"tensors": len(entries), "params": int(sum(e["numel"] for e in entries))}
    for k in keys:
        pairs = [(e[k], e["numel"]) for e in entries if e.get(k) is not None]
        if not pairs:
            out[k] = {"mean": None, "weighted_mean": None, "median": None, "min": None, "tensors": 0}
        else:
            x = np.array([p[0] for p in pairs], dtype=np.float64)
            w = np.array([p[1] for p in pairs], dtype=np.float64)
            out[k] = {"mean": float(x.mean()), "weighted_mean": float((x * w).sum() / w.sum()),
                      "median": float(np.median(x)), "min": float(x.min()), "tensors": int(x.size)}
        if any(k + SS_SUFFIX in e for e in entries):  # an R²: the group's own R², not a mean of R²s
            terms = [e[k + SS_SUFFIX] for e in entries if e.get(k + SS_SUFFIX) is not None]
            out[k]["pooled"] = pooled_r2(terms)
            out[k]["pooled_tensors"] = len(terms)
    return out


def by_module_type(entries: list[dict]) -> dict[str, list[dict]]:
    """Entries (with ``name``) grouped by :func:`module_type`, in ``MODULE_TYPES`` order."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(module_type(e["name"]), []).append(e)
    return {t: groups[t] for t in MODULE_TYPES if t in groups}


def aggregate(entries: list[dict], keys: Iterable[str]) -> dict:
    """Unweighted and parameter-weighted means (and median, min) of ``keys`` over all tensors,
    per module type and per layer. ``entries`` need ``name``, ``numel`` and the keys (None = not defined).
    A key whose entries carry ``[SS_res, SS_tot]`` as ``<key>_ss`` (the R² fields) also gets ``pooled``,
    :func:`.metrics.pooled_r2` over the group, and ``pooled_tensors``, how many tensors it sums."""
    keys = list(keys)
    by_layer: dict[int, list[dict]] = {}
    for e in entries:
        li = layer_index(e["name"])
        if li is not None:
            by_layer.setdefault(li, []).append(e)
    return {
        "model": _means(entries, keys),
        "by_module": {t: _means(g, keys) for t, g in by_module_type(entries).items()},
        "by_layer": {str(li): _means(by_layer[li], keys) for li in sorted(by_layer)},
    }


def layer_module_grid(entries: list[dict], key: str) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, modules, grid) with grid[l, m] the unweighted mean of ``key``; NaN where absent."""
    layers = sorted({li for e in entries if (li := layer_index(e["name"])) is not None})
    mods = [m for m in LAYER_MODULES if any(module_type(e["name"]) == m and layer_index(e["name"]) is not None
                                            for e in entries)]
    grid = np.full((len(layers), len(mods)), np.nan)
    acc: dict[tuple[int, str], list[float]] = {}
    for e in entries:
        li, mt = layer_index(e["name"]), module_type(e["name"])
        if li is not None and mt in mods and e.get(key) is not None:
            acc.setdefault((li, mt), []).append(e[key])
    for (li, mt), vals in acc.items():
        grid[layers.index(li), mods.index(mt)] = float(np.mean(vals))
    return layers, mods, grid
