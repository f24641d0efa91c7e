"""Figures of the Wasserstein-neuron analysis: the W1 distribution of each scored layer, the per-neuron
sparsification error against W1, and perplexity per sparsification method and pattern. PNG + SVG side by side (Agg
backend); each function returns the PNG path.

Report sections: :func:`wasserstein_sections` (a `neurospec wasserstein --out` directory: its two figures, the
scores per module, the experiment and the method ordering) and :func:`sparsify_sections` (a `neurospec sparsify
--out` directory: perplexity dense and sparse per task)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from neurospec.record.layout import WASSERSTEIN_ERROR_FIGURE, WASSERSTEIN_W1_FIGURE
from neurospec.report.figures import pyplot, save_figure
from neurospec.report.parts import img, section, table


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


def perplexity_bars(groups: Mapping[str, Mapping[str, float]], path: Path, *, dense: float | None = None,
                    title: str = "") -> Path:
    """Grouped bars of perplexity (log scale): one group per key of ``groups`` (a pattern, or a task), one bar per
    inner key (a method, or dense/sparse); ``dense``: a horizontal line at the dense model's perplexity."""
    plt = pyplot()
    names = list(groups)
    bars = list(dict.fromkeys(b for g in groups.values() for b in g))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) * max(1, len(bars)) / 2 + 2), 3.6))
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(names))
    for k, b in enumerate(bars):
        vals = [groups[n].get(b, np.nan) for n in names]
        vals = [np.nan if v is None else float(v) for v in vals]
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, vals, width, label=b, color=f"C{k % 10}")
    if dense is not None and np.isfinite(dense):
        ax.axhline(dense, color="#333", lw=1, ls="--", label="dense")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7)
    ax.set_title(title or "perplexity per method and sparsity", fontsize=10)
    return save_figure(fig, Path(path))


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def wasserstein_sections(res: dict, run_dir: Path, figdir: Path) -> list[str]:
    """HTML sections of a `neurospec wasserstein` result ``res`` written in ``run_dir``."""
    out = []
    w1_png = run_dir / f"{WASSERSTEIN_W1_FIGURE}.png"
    rows = [[name, s["neurons"], _num(s["mean"]), _num(s["max"]), len(s["top"]),
             "-" if s.get("spearman_w1_difficulty") is None else float(s["spearman_w1_difficulty"])]
            for name, s in res["scores"].items()]
    out.append(section(
        "Wasserstein neurons: W1 per layer",
        f"W1 distance of each output neuron's {'z-scored ' if res.get('normalise') == 'zscore' else ''}outputs to "
        f"N(0,1) on {res['tokens']:,} tokens of {res['task']}; dashed: the top {res['top']:.0%} (the Wasserstein "
        "neurons). rho: Spearman correlation of W1 with the mapping difficulty.",
        (img(w1_png, "W1 distribution per layer") if w1_png.is_file() else "")
        + table(["module", "neurons", "mean W1", "max W1", "top neurons", "rho(W1, difficulty)"], rows)))
    if "experiment_patterns" in res:
        err_png = run_dir / f"{WASSERSTEIN_ERROR_FIGURE}.png"
        corr = res.get("error_correlation") or {}
        body = img(err_png, "error vs W1") if err_png.is_file() else ""
        if corr:
            body += table(["pattern", "pooled Spearman rho(W1, error)"], [[corr["pattern"], _num(corr["pooled"])]])
        pats = res["experiment_patterns"]
        sels = list(dict.fromkeys(k for v in pats.values() for k in v))
        prow = [[sel, *[_num(pats[p][sel]["delta_loss"]) if sel in pats[p] else "-" for p in pats],
                 *["-" if pats[p].get(sel, {}).get("pvalue") is None else float(pats[p][sel]["pvalue"])
                   for p in pats]] for sel in sels]
        measure = ("cosine distance of the final hidden states to the dense model's" if
                   res.get("metric") == "cosine_distance" else f"loss (dense {_num(res.get('dense_loss')):.4g})")
        out.append(section(
            "Wasserstein neurons: sparsifying the selected rows",
            f"SparseGPT on the selected output rows of every scored module only; change of the {measure} on "
            "held-out tokens and the p-value against random selections of the same size. The scatter shows each "
            "neuron's relative output error after pruning against its W1.",
            body + table(["selection", *[f"delta loss {p}" for p in pats], *[f"p {p}" for p in pats]], prow)))
    methods = res.get("methods")
    if methods:
        what = "cosine distance to the dense model" if methods.get("metric") == "cosine_distance" else "perplexity"
        png = perplexity_bars(methods["patterns"], figdir / "wasserstein_methods", dense=_num(methods["dense"]),
                              title=f"{what} per method and sparsity (every linear module of the blocks)")
        mnames = list(dict.fromkeys(m for v in methods["patterns"].values() for m in v))
        rows = [[p, *[_num(v.get(m)) for m in mnames]] for p, v in methods["patterns"].items()]
        out.append(section(
            f"Sparsification methods: {what}",
            f"{what.capitalize()} on {res['task']}'s held-out tokens after each method prunes every linear module "
            f"of the blocks, per pattern (dashed: dense, {_num(methods['dense']):.4g}). Lower is better.",
            img(png, f"{what} per method") + table(["pattern", *mnames], rows)))
    return out


def sparsify_sections(res: dict, figdir: Path) -> list[str]:
    """HTML sections of a `neurospec sparsify` result ``res``."""
    label = f"{res['method']} {res['pattern']} (sparsity {res['sparsity']:g})"
    ppl = res["perplexity"]
    png = perplexity_bars({t: {"dense": v["dense"], label: v["sparse"]} for t, v in ppl.items()},
                          figdir / "sparsify_perplexity", title=f"perplexity dense and after {label}")
    achieved = list(res["layers"].values())
    rows = [[t, v["dense"], v["sparse"], _num(v["sparse"]) / _num(v["dense"])] for t, v in ppl.items()]
    return [section(
        "Sparsification: perplexity",
        f"{label} of {len(achieved)} linear modules (achieved sparsity {min(achieved):.4f}-{max(achieved):.4f}), "
        f"calibrated on {res['calibration']['tokens']:,} tokens of {res['calibration']['task']}; perplexity on each "
        "task's held-out tokens before and after.",
        img(png, "perplexity dense and sparse") + table(["task", "dense", "sparse", "ratio"], rows))]
