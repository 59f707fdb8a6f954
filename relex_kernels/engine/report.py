"""What a run returns and reports: :class:`RunResult`, ``relex_report.json`` (per-tensor explained
variance, singular values) and its printed summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .._version import __version__
from ..fit import Components
from ..ops import native


@dataclass
class RunResult:
    outputs: list[str]
    report: dict
    seconds: float
    bytes_read: int
    backend: str
    fits: dict[str, Components] = field(default_factory=dict, repr=False)

THRESHOLDS = (0.90, 0.95, 0.99)


def tensor_entries(jobs, comps: list[Components]) -> list[dict]:
    """The report's entry of each fitted tensor (``jobs``: with ``name``, ``dtype``, ``shape``). A
    group's arrays are stacked when every tensor has as many singular values: elementwise steps and
    row sums (numpy sums a contiguous row in the order it sums the row alone), so each entry holds
    the values it would hold alone."""
    if len({c.singular_values.shape for c in comps}) > 1:
        return [e for j, c in zip(jobs, comps) for e in tensor_entries([j], [c])]
    sv = np.stack([c.singular_values for c in comps]) if comps else np.empty((0, 0))
    lam = sv ** 2
    total = lam.sum(axis=-1)
    rank1 = np.divide(lam[:, 0], total, out=np.zeros_like(total), where=total > 0) if sv.size else total
    return [{"name": j.name, "dtype": j.dtype, "shape": list(j.shape), "components": int(c.u.shape[1]),
             "explained_variance": c.explained_variance, "explained_variance_rank1": r1,
             "singular_values": values}  # Python floats, like float(x) of each
            for j, c, r1, values in zip(jobs, comps, rank1.tolist(), sv.tolist())]


#: a tensor's report entry, key by key (:func:`tensor_entries`)
ENTRY_KEYS = ("name", "dtype", "shape", "components", "explained_variance", "explained_variance_rank1",
              "singular_values")


def entry_lines(entries: list[dict]) -> list[str] | None:
    """``[json.dumps(e) for e in entries]`` for entries of :func:`tensor_entries`' form, with the
    floats written by the native extension: a MoE model's report holds tens of thousands of
    singular values, whose repr took json's encoder ~45 ms in a 3072-tensor run (the text is the
    same, byte for byte). None without that part of the extension or when an entry has another form
    (its keys, or a value of another type): the caller then encodes them with json."""
    if not entries or not native.float_text_available():
        return None
    if not all(map(ENTRY_KEYS.__eq__, map(tuple, entries))):
        return None
    names, dts, shapes, comps, evs, r1s, svs = (list(map(dict.__getitem__, entries, [k] * len(entries)))
                                                for k in ENTRY_KEYS)
    if (set(map(type, chain(names, dts))) != {str} or not set(map(type, chain(comps, *shapes))) <= {int}
            or set(map(type, chain(shapes, svs))) != {list} or len(set(map(len, svs))) != 1
            or not set(map(type, chain(evs, r1s, *svs))) <= {float}):
        return None
    k, T = len(entries), len(svs[0])
    floats = native.float_rows_text(np.column_stack([np.array(evs, dtype=np.float64),
                                                     np.array(r1s, dtype=np.float64),
                                                     np.array(svs, dtype=np.float64).reshape(k, T)]))
    enc = json.encoder.encode_basestring_ascii  # json.dumps's (ensure_ascii)
    out = []
    for name, dt, shape, c, text in zip(names, dts, shapes, comps, floats):
        ev, r1, sv = (text.split(", ", 2) + ["", ""])[:3]
        out.append(f'{{"name": {enc(name)}, "dtype": {enc(dt)}, "shape": [{", ".join(map(str, shape))}], '
                   f'"components": {c}, "explained_variance": {ev}, "explained_variance_rank1": {r1}, '
                   f'"singular_values": [{sv}]}}')
    return out


def run_report(*, backend: str, kernel: str, options: dict, steps, targets, outputs: dict, seconds: float, bytes_read: int,
               memory_budget: int, entries: list[dict], resumed: int = 0, gram_precision: str = "ieee",
               eigen_solver: str = "lapack", **extra) -> dict:
    """``relex_report.json`` of a whole run (one process or SPMD; ``extra``: more top-level fields).

    ``kernel``: :attr:`~relex_kernels.ops.Backend.identity`, which the output bits depend on;
    ``gram_precision``: the products of the Gram as they ran at this T (``ieee`` fp32, or on a
    device ``tf32x3`` / ``tf32`` when ``auto`` or ``RELEX_GRAM_PRECISION`` chose them);
    ``eigen_solver``: :func:`~relex_kernels.fit.eigen_solver`, what solved the T x T Grams
    (``saved fit``: none did).
    """
    return {
        "relex_kernels": __version__,
        "backend": backend,
        "kernel": kernel,
        "gram_precision": gram_precision,
        "eigen_solver": eigen_solver,
        "options": options,
        "history_steps": list(steps),
        "targets": list(targets),
        "outputs": outputs,
        "seconds": seconds,
        "bytes_read": bytes_read,
        "memory_budget": memory_budget,
        "summary": summary(entries),
        "summary_rank1": summary(entries, "explained_variance_rank1"),
        "tensors": entries,
        "resumed_tensors": resumed,
        **extra,
    }


def moved(entry: dict) -> bool:
    """False for a tensor whose Gram is zero: every update stayed below one step of its dtype (typically
    a norm). It has no direction, so its explained variance (0) says nothing about the fit."""
    sv = entry.get("singular_values")
    return sv is None or (len(sv) > 0 and sv[0] > 0)


def summary(entries: list[dict], key: str = "explained_variance") -> dict:
    """Statistics of ``key`` over the tensors that moved (``tensors`` of them); ``unchanged``: how many did not."""
    ev = np.array([e[key] for e in entries if moved(e)], dtype=np.float64)
    still = len(entries) - int(ev.size)
    if ev.size == 0:
        return {"tensors": 0, "unchanged": still}
    out = {"tensors": int(ev.size), "unchanged": still, "mean": float(ev.mean()), "min": float(ev.min()),
           "median": float(np.median(ev)), "max": float(ev.max())}
    for t in THRESHOLDS:
        out[f"count_ge_{t:.2f}"] = int((ev >= t).sum())
    return out


def format_summary(s: dict, rank: int) -> str:
    still = s.get("unchanged", 0)
    tail = f"{still} tensor{'s' * (still != 1)} did not move (zero Gram: every update below one step of the dtype)"
    if not s.get("tensors"):
        return tail if still else "no fitted tensors"
    head = f"explained variance of rank {rank} over {s['tensors']} tensors: "
    body = (f"mean {s['mean']:.4f}  min {s['min']:.4f}  median {s['median']:.4f}  max {s['max']:.4f}\n"
            + "  ".join(f">= {t:.2f}: {s[f'count_ge_{t:.2f}']}/{s['tensors']}" for t in THRESHOLDS))
    return head + body + (f"\n{tail}" if still else "")
