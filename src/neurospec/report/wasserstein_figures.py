"""Figures of the Wasserstein-neuron analysis: the W1 distribution of each scored layer, and the per-neuron
sparsification error against W1. PNG + SVG side by side (Agg backend); each function returns the PNG path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from neurospec.report.figures import pyplot, save_figure


def w1_distributions(w1: Mapping[str, np.ndarray], path: Path, *, fraction: float = 0.03, bins: int = 40) -> Path:
    """One small histogram of W1 per module (``{module: W1 per neuron}``), with the top-``fraction`` threshold."""
    plt = pyplot()
    names = list(w1)
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        v = np.asarray(w1[name], dtype=float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, color="#4c72b0")
        if v.size:
            ax.axvline(np.quantile(v, 1 - fraction), color="#c44e52", lw=1, ls="--")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"W1 to N(0,1) per neuron (dashed: top {fraction:.0%})", fontsize=10)
    fig.supxlabel("W1", fontsize=9)
    return save_figure(fig, Path(path))


def error_vs_w1(w1: Mapping[str, np.ndarray], error: Mapping[str, np.ndarray], path: Path, *,
                title: str = "") -> Path:
    """Scatter of the per-neuron relative output error after pruning against W1, one colour per module."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in w1:
        ax.scatter(np.asarray(w1[name], dtype=float), np.asarray(error[name], dtype=float), s=4, alpha=0.5,
                   label=name)
    ax.set_xlabel("W1 to N(0,1)")
    ax.set_ylabel("relative output error")
    if len(w1) <= 8:
        ax.legend(fontsize=6, markerscale=3)
    ax.set_title(title or "per-neuron sparsification error vs W1", fontsize=10)
    return save_figure(fig, Path(path))
