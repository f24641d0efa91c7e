"""Matplotlib figures of the task map, selective pruning and ablation studies. Each function saves PNG and SVG
next to each other and returns the PNG path. The Agg backend is used, so no display is needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neurospec.record.layout import write_result_figure


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as ``path``.png and .svg (atomically), close it, and return the PNG path."""
    write_result_figure(fig, path.with_suffix(".png"), dpi=110, bbox_inches="tight")
    write_result_figure(fig, path.with_suffix(".svg"), bbox_inches="tight")
    pyplot().close(fig)
    return path.with_suffix(".png")


def heatmaps(mats: Sequence[np.ndarray], titles: Sequence[str], labels: Sequence[str], path: Path,
             suptitle: str = "", vmin: float | None = 0.0, vmax: float | None = None, cmap: str = "viridis",
             fmt: str = "{:.2f}", mask_diagonal: bool = False) -> Path:
    """Side-by-side annotated heatmaps sharing one colour scale (rows: the set A, columns: B).

    ``vmax=None`` scales colours to the largest shown value; ``mask_diagonal`` leaves the diagonal blank (for
    overlaps, where it is 1 by definition and would flatten the colour scale).
    """
    plt = pyplot()
    shown = []
    for m in mats:
        m = np.array(m, dtype=float)
        if mask_diagonal:
            np.fill_diagonal(m, np.nan)
        shown.append(m)
    finite = np.concatenate([m[np.isfinite(m)] for m in shown]) if shown else np.array([0.0])
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-9
    n = len(shown)
    size = 1.2 + 0.5 * len(labels)
    fig, axes = plt.subplots(1, n, figsize=(size * n + 1.5, size + 0.6), squeeze=False,
                             gridspec_kw={"wspace": 0.08})
    im = None
    for k, (ax, m, title) in enumerate(zip(axes[0], shown, titles, strict=True)):
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if k == 0 else [], fontsize=8)
        ax.set_title(title, fontsize=10)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    dark = (m[i, j] - lo) / (hi - lo) < 0.5
                    ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return save_figure(fig, path)


def layer_distribution(counts: Mapping[str, Mapping[str, int]], path: Path, title: str = "") -> Path:
    """Per-layer number of each task's selected neurons (one line per task)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for task, per_site in counts.items():
        layers = sorted((int(s.split(".")[1]), c) for s, c in per_site.items())
        ax.plot([layer for layer, _ in layers], [c for _, c in layers], marker="o", ms=3, label=task)
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def pruning_curves(curves: Mapping[str, Sequence[dict]], path: Path, metric: str = "top1") -> Path:
    """Selective pruning: forget-task vs retain-task accuracy along the pruning steps, one curve per forget task."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for task, rows in curves.items():
        f = [r["forget"][metric] for r in rows]
        r = [r["retain"][metric] for r in rows]
        fr = [r_["fraction"] for r_ in rows]
        axes[0].plot(f, r, marker="o", ms=3, label=task)
        line = axes[1].plot(fr, f, marker="o", ms=3, label=f"{task} (forget)")[0]
        axes[1].plot(fr, r, marker="x", ms=3, ls="--", color=line.get_color(), label=f"{task}: retain")
    axes[0].set_xlabel(f"forget-task {metric}")
    axes[0].set_ylabel(f"retain-task {metric}")
    axes[0].set_title("retain vs forget accuracy (top right = start)", fontsize=10)
    axes[1].set_xlabel("fraction of MLP neurons pruned")
    axes[1].set_ylabel(metric)
    axes[1].set_title("accuracy along the pruning steps", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
