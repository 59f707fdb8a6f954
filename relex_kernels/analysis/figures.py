"""PNG figures of the diagnostics (matplotlib, Agg backend: no display needed).

matplotlib is imported only when a figure is drawn, so the rest of the package
works without it (it is not a dependency of ``pip install -e .``): ``analyze`` and
``backtest`` skip their figures with a warning when it is missing, or fail before
reading anything when figures were explicitly required (``figures=True``).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np

from .. import threads
from ..errors import UsageError
from .aggregate import MODULE_TYPES, layer_index, layer_module_grid, module_type

_COLORS = dict(zip(MODULE_TYPES, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                                  "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#c7c7c7"]))


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("figures need matplotlib (pip install matplotlib), or pass --no-figures") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def require() -> None:
    """Fail now, before any pass or output directory, when figures are required and matplotlib is missing."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # (a module entry of None: import blocked)
        found = False
    if not found:
        raise UsageError("figures need matplotlib (pip install matplotlib), or pass --no-figures")


def preload() -> threading.Thread:
    """Import matplotlib in a thread while the Gram pass runs (the kernels release the GIL): a
    second or so that would otherwise come after the pass. A failure shows when a figure is drawn."""

    def work():
        try:
            _plt()
        except Exception:  # reported when a figure is drawn
            pass
    return threads.start(work, name="relex-matplotlib-import")  # (Ctrl-C stays the main thread's)


def _short(name: str) -> str:
    for p in ("model.layers.", "model.", "transformer.h.", "transformer."):
        if name.startswith(p):
            name = name[len(p):]
            break
    return name.removesuffix(".weight").replace("self_attn.", "").replace("mlp.", "")


def representative(entries: list[dict]) -> list[dict]:
    """First, middle and last layer's q_proj, gate_proj and down_proj, and the embedding (and an
    untied head); the largest tensors when the names follow no known convention."""
    layers = sorted({li for e in entries if (li := layer_index(e["name"])) is not None})
    picks = []
    if layers:
        chosen_layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
        for mod in ("q", "gate", "down"):
            for li in chosen_layers:
                hit = next((e for e in entries if module_type(e["name"]) == mod and layer_index(e["name"]) == li), None)
                if hit is not None:
                    picks.append(hit)
    for mod in ("embedding", "head"):
        hit = next((e for e in entries if module_type(e["name"]) == mod), None)
        if hit is not None:
            picks.append(hit)
    if len(picks) < 4:
        big = sorted(entries, key=lambda e: -e["numel"])
        picks += [e for e in big if e not in picks][:6 - len(picks)]
    return picks


def coefficient_figure(path: str, entries: list[dict], steps: list[int], T: int) -> str:
    """Rank-1 coefficient c(step) per representative tensor: history points, later points
    projected on the history direction, the fitted line and the oracle coefficients."""
    plt = _plt()
    picks = representative(entries)
    ncol = min(4, len(picks))
    nrow = -(-len(picks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), squeeze=False)
    x = np.asarray(steps, dtype=np.float64)
    for ax, e in zip(axes.flat, picks):
        c, cf, co = (np.asarray(e[k]) for k in ("coef", "coef_fit", "coef_oracle"))
        ax.plot(x, cf, "-", color="#444444", lw=1.0, label="line fitted on history")
        ax.plot(x, e["coef_oracle_fit"], ":", color="#999999", lw=1.0, label="same, oracle subspace")
        ax.plot(x, co, "x", color="#999999", ms=3.5, label="oracle subspace")
        ax.plot(x[:T], c[:T], "o", color="#1f77b4", ms=3.5, label="history")
        if len(x) > T:
            ax.plot(x[T:], c[T:], "o", mfc="none", color="#d62728", ms=4.5, label="later (history subspace)")
            ax.axvline(x[T - 1], color="#bbbbbb", ls="--", lw=0.8)
        r_in, r_out = e.get("r2_in"), e.get("r2_out")
        sub = f"EV1 {e['ev1']:.3f}"
        sub += f"  R² in {r_in:.3f}" if r_in is not None else ""
        sub += f" out {r_out:.3f}" if r_out is not None else ""
        ax.set_title(f"{_short(e['name'])}\n{sub}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(picks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("rank-1 coefficient c(step) = ⟨θ_step − θ₀, v₁⟩", fontsize=10)
    # fixed margins: tight_layout measures every tick label and costs seconds on big grids
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.75 / h, bottom=0.8 / h, wspace=0.28, hspace=0.62)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap_figure(path: str, entries: list[dict], key: str = "ev1",
                   title: str = "rank-1 explained variance") -> str | None:
    """Layer x module heatmap of ``key``; None when no tensor has a layer index."""
    layers, mods, grid = layer_module_grid(entries, key)
    if not layers or not mods:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(mods), 1.2 + 0.22 * len(layers)))
    finite = grid[np.isfinite(grid)]
    lo = float(finite.min()) if finite.size else 0.0
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(lo, 0.999), vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(mods)), mods, fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(li) for li in layers[::step]], fontsize=7)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax)
    cb.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectra_figure(path: str, entries: list[dict]) -> str:
    """Singular values s_k / s_1 of every tensor's history trajectory, coloured by module type.

    Ratios below the fp32 Gram's resolution (eigenvalues under ~eps·λ₁) are noise and are
    drawn at that floor."""
    from matplotlib.lines import Line2D

    from .metrics import GRAM_REL_EPS

    plt = _plt()
    floor = float(np.sqrt(GRAM_REL_EPS))
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    seen: list[str] = []
    curves = []
    for e in entries:
        sv = np.asarray(e["singular_values"], dtype=np.float64)
        if sv.size == 0 or not sv[0] > 0:
            continue
        r = np.maximum(sv / sv[0], floor)
        curves.append(r)
        mt = module_type(e["name"])
        ax.plot(np.arange(1, r.size + 1), r, "-", color=_COLORS.get(mt, "#333333"), lw=0.6, alpha=0.45)
        if mt not in seen:
            seen.append(mt)
    handles = [Line2D([], [], color=_COLORS.get(mt, "#333333"), lw=1.5, label=mt) for mt in seen]
    if curves:
        med = np.median(np.stack(curves), axis=0)
        handles += ax.plot(np.arange(1, med.size + 1), med, "k-", lw=2.0, label="median")
    handles.append(ax.axhline(floor, color="#bbbbbb", ls="--", lw=0.8, label="fp32 Gram resolution"))
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 1.5)
    ax.set_xlabel("k", fontsize=8)
    ax.set_ylabel("s_k / s_1", fontsize=8)
    ax.set_title("singular values of the history trajectory, per tensor", fontsize=9)
    ax.legend(handles=handles, fontsize=7, ncol=2, frameon=False)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.92, bottom=0.13)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def error_distance_figure(path: str, model_rows: dict[str, list[dict]], last_step: int) -> str:
    """Whole-model relative error vs extrapolation distance, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (method, rows) in enumerate(model_rows.items()):
        pts = [(r["distance"], r["rel_error"]) for r in rows if r["rel_error"] is not None]
        if not pts:
            continue
        d, err = zip(*pts)
        ax.plot(d, np.maximum(err, 1e-12), "o-", ms=4, lw=1.6 if method == "relex" else 1.0,
                color="k" if method == "relex" else f"C{i}", label=method)
    ax.set_yscale("log")
    ax.set_xlabel(f"extrapolation distance (steps after the last history step {last_step})", fontsize=8)
    ax.set_ylabel("‖θ̂ − θ_S‖ / ‖θ_S − θ₀‖  (whole model)", fontsize=8)
    ax.set_title("backtest: error vs distance (pre-rounding, from the Gram)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.92, bottom=0.13)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
