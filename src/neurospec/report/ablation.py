"""Summary and figure of an ablation study (:func:`neurospec.experiments.ablation.ablation_study`'s rows)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from neurospec.errors import NeurospecError
from neurospec.record.layout import write_result_figure

FIELDS = ("loss", "top1", "loss_increase", "top1_drop")
"""The per-row metrics that are summarised over seeds and can be plotted."""


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed) over seeds, per ``(method, fraction, task)``:
    rows ``{method, fraction, task, step, n_seeds, n_ablated, loss_mean, loss_std, top1_mean, ..., top1_drop_std}``,
    ordered by task, method and fraction. Metrics that are ``None`` (``top1`` of head-less encoders) stay ``None``."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["fraction"]), []).append(r)
    out = []
    for (task, method, fraction), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        d: dict = {
            "method": method,
            "fraction": fraction,
            "task": task,
            "step": rs[0]["step"],
            "n_seeds": len({r["seed"] for r in rs}),
            "n_ablated": sum(r["n_ablated"] for r in rs) / len(rs),
            "loss_metric": rs[0].get("loss_metric"),
        }
        for f in FIELDS:
            d[f"{f}_mean"], d[f"{f}_std"] = _mean_std([r[f] for r in rs])
        out.append(d)
    return out


def plot_ablation(rows: Sequence[Mapping], path: str | Path, *, y: str = "loss_increase") -> list[Path]:
    """Plot ``y`` (default loss increase) against the ablated fraction: one panel per task, one line per method
    (mean over seeds) with a band of +- one standard deviation. Writes ``<path>.png`` and ``<path>.svg`` (a ``.png``
    or ``.svg`` suffix on ``path`` is replaced) and returns both paths. Uses matplotlib's Agg canvas directly, so it
    never touches pyplot's global state."""
    if y not in FIELDS:
        raise NeurospecError(f"y must be one of {FIELDS}, got {y!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure

    summary = summarise(rows)
    if not summary:
        raise NeurospecError("no rows to plot")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for method in methods:
            pts = [s for s in summary if s["task"] == task and s["method"] == method and s[f"{y}_mean"] is not None]
            if not pts:
                continue
            x = [p["fraction"] for p in pts]
            mean = [p[f"{y}_mean"] for p in pts]
            std = [p[f"{y}_std"] for p in pts]
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=method)
            ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel("fraction of neurons ablated")
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(title="method", fontsize="small")
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".png", ".svg") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    for p in out:
        write_result_figure(fig, p, dpi=150)
    return out
