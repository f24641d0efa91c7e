"""Figures and report sections of neuron clusters: sizes, n-cut against shuffled networks, importance against
coherence, and task-cluster alignment per layer.

:func:`cluster_sections` finds the cluster directories of a run directory (the directory itself, ``DIR/*``
and ``DIR/*``: any directory with ``clusters.json``), draws whatever each holds (``clusters.json``,
``specialization.json``, ``alignment.json``) into ``figdir`` as PNG and SVG, and returns HTML sections built like
the rest of the report. Each figure function can also be called on its own and returns the PNG path.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neurospec.record import layout
from neurospec.report.figures import pyplot, save_figure
from neurospec.report.parts import img, load_json, section, table

ALPHA = 0.05


def _site_layer(site: str) -> int:
    return int(site.split(".")[1])


# --------------------------------------------------------------------------------------------------- figures


def cluster_sizes(manifest: dict, path: Path) -> Path:
    """Left: neurons of each cluster id in each layer (heatmap); right: total size of each cluster id."""
    plt = pyplot()
    sizes = manifest["sizes"]
    sites = list(sizes)
    mat = np.array([sizes[s] for s in sites], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.18 * len(sites) + 2.2), gridspec_kw={"width_ratios": [3, 2]},
                             layout="constrained")
    im = axes[0].imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_yticks(range(len(sites)), [str(_site_layer(s)) for s in sites], fontsize=6)
    axes[0].set_ylabel("layer")
    axes[0].set_xlabel("cluster id" if manifest["scope"] == "global" else "cluster id (local to each layer)")
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="neurons")
    if manifest["scope"] == "global":
        total = np.asarray(manifest["cluster_sizes"], dtype=float)
        axes[1].bar(range(total.size), total, color="#4477aa")
        axes[1].xaxis.get_major_locator().set_params(integer=True)
        axes[1].set_xlabel("cluster id")
        axes[1].set_ylabel("neurons (all layers)")
    else:
        flat = mat[mat > 0].ravel()
        lo, hi = float(flat.min()), float(flat.max())
        bins = np.arange(lo - 0.5, hi + 1.5) if hi - lo < 30 else 30
        axes[1].hist(flat, bins=bins, color="#4477aa")
        axes[1].set_xlabel("cluster size within a layer")
        axes[1].set_ylabel("clusters")
    excl = sum(manifest.get("excluded", {}).values())
    fig.suptitle(f"{manifest['method']} ({manifest['graph']}): {manifest['n_clusters']} clusters, "
                 f"{excl} neurons excluded", fontsize=10)
    return save_figure(fig, path)


def ncut_vs_shuffled(clusterability: dict, path: Path, title: str = "") -> Path:
    """The n-cut of the network (line) against the n-cuts of weight-shuffled copies (histogram)."""
    plt = pyplot()
    null = np.asarray(clusterability["null"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.hist(null, bins=max(5, min(30, null.size)), color="#bbbbbb", label=f"shuffled weights (n={null.size})")
    ax.axvline(clusterability["ncut"], color="#cc3311", lw=2, label="trained network")
    ax.set_xlabel("n-cut (lower = more clusterable)")
    ax.set_ylabel("networks")
    ax.legend(fontsize=8)
    ax.set_title(title or f"z = {clusterability['z']:.2f}, p = {clusterability['pvalue']:.3g}", fontsize=10)
    return save_figure(fig, path)


def importance_vs_coherence(spec: dict, path: Path, tasks: Sequence[str] | None = None) -> Path:
    """One panel per task (the first three): coherence (x, minus its random-set mean) against importance (y, damage minus the random
    sets' mean). Filled red: importance p <= 0.05; black ring: coherence p <= 0.05."""
    plt = pyplot()
    rows = spec["rows"]
    kind = "coherence_correlation" if spec.get("coherence_correlation") else "coherence_task"
    names = list(tasks or spec["tasks"])[:3]
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.8), squeeze=False, layout="constrained")
    for ax, t in zip(axes[0], names, strict=True):
        xs, ys, imp_sig, coh_sig = [], [], [], []
        for r in rows:
            c = r.get(kind)
            i = r["importance"][t]
            xs.append(0.0 if c is None else c["effect"] - c["null_mean"])
            ys.append(i["effect"] - i["null_mean"])
            imp_sig.append(i["pvalue"] <= ALPHA)
            coh_sig.append(c is not None and c["pvalue"] <= ALPHA)
        xs_a, ys_a = np.asarray(xs), np.asarray(ys)
        imp = np.asarray(imp_sig, dtype=bool)
        coh = np.asarray(coh_sig, dtype=bool)
        ax.scatter(xs_a[~imp], ys_a[~imp], s=22, color="#999999", label="importance p > 0.05")
        ax.scatter(xs_a[imp], ys_a[imp], s=26, color="#cc3311", label="importance p <= 0.05")
        ax.scatter(xs_a[coh], ys_a[coh], s=70, facecolors="none", edgecolors="black", label="coherence p <= 0.05")
        ax.axhline(0, color="#dddddd", lw=1, zorder=0)
        ax.axvline(0, color="#dddddd", lw=1, zorder=0)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(f"{kind.replace('_', ' ')} - random mean")
    axes[0][0].set_ylabel(f"{spec['metric']}\n- random-set mean")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def alignment_by_layer(al: dict, path: Path) -> Path:
    """Per task: how much more concentrated its neurons are over clusters than chance (entropy deficit: mean entropy
    of random same-size sets minus the task's, in nats) by layer (filled marker: p <= 0.05), and -log10 p by layer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for t in al["tasks"]:
        rows = [r for r in al["rows"] if r["task"] == t and "pvalue_entropy" in r]
        if not rows:
            continue
        layers = np.array([r["layer"] for r in rows])
        conc = np.array([r["entropy_deficit"] for r in rows])
        p = np.array([r["pvalue_entropy"] for r in rows])
        (line,) = axes[0].plot(layers, conc, marker="o", ms=3, lw=1, label=t)
        sig = p <= al.get("alpha", ALPHA)
        axes[0].scatter(layers[sig], conc[sig], s=40, color=line.get_color(), zorder=3)
        axes[1].plot(layers, -np.log10(p), marker="o", ms=3, lw=1, color=line.get_color(), label=t)
    axes[0].axhline(0, color="#dddddd", lw=1, zorder=0)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("entropy deficit, nats (0 = chance)")
    axes[0].legend(fontsize=8)
    axes[1].axhline(-np.log10(al.get("alpha", ALPHA)), color="#cc3311", lw=1, ls="--", label="p = 0.05")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("-log10 p (entropy, permutation)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"task neurons vs {al['method']} ({al['graph']}) clusters, top {float(al['frac']):.0%} per task",
                 fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- report


def cluster_dirs(run_dir: Path) -> list[Path]:
    """The cluster directories a report of ``run_dir`` shows (:func:`neurospec.record.layout.report_inputs`)."""
    return layout.report_inputs(run_dir)["clusters"]


def cluster_sections(run_dir: Path, figdir: Path, dirs: list[Path] | None = None) -> list[str]:
    """HTML sections (strings) for every cluster directory of ``run_dir``; figures go to ``figdir``."""
    run_dir, figdir = Path(run_dir), Path(figdir)
    out: list[str] = []
    for d in cluster_dirs(run_dir) if dirs is None else dirs:
        tag = "clusters" if d == run_dir else f"clusters_{d.name}"
        label = d.name if d != run_dir else "this directory"
        m = load_json(d / layout.CLUSTERS)
        assert m is not None
        png = cluster_sizes(m, figdir / f"{tag}_sizes")
        facts = [["method", f"{m['method']} ({m['graph']})"], ["clusters", m["n_clusters"]],
                 ["n-cut", "-" if m["ncut"] is None else m["ncut"]],
                 ["excluded neurons", sum(m.get("excluded", {}).values())],
                 ["model", m["model"].get("name")], ["seconds", m.get("extra", {}).get("seconds")]]
        out.append(section(
            f"Clusters: {label}",
            "Neurons of each cluster in each layer and the clusters' sizes. MoE experts and per-layer correlation "
            "clusters are local to a layer; a weight-graph partition spans all layers.",
            img(png, "cluster sizes") + table(["", ""], facts),
        ))
        cb = m.get("extra", {}).get("clusterability")
        if cb:
            png = ncut_vs_shuffled(cb, figdir / f"{tag}_ncut_shuffled")
            out.append(section(
                f"Clusterability: {label}",
                "n-cut of the network's spectral partition against networks whose weight matrices were shuffled "
                "entry-wise (same values, random places). Trained networks are expected to cut better (lower n-cut) "
                f"than shuffled ones: z = {cb['z']:.2f}, one-sided p = {cb['pvalue']:.3g}.",
                img(png, "n-cut vs shuffled"),
            ))
        spec = load_json(d / layout.SPECIALIZATION)
        if spec and spec["rows"]:
            png = importance_vs_coherence(spec, figdir / f"{tag}_importance_coherence")
            rows = [[t, v["n_units"], v["n_significant"], v["fisher"]["pvalue"]] for t, v in spec["importance"].items()]
            for key in ("coherence_correlation", "coherence_task"):
                if spec.get(key):
                    v = spec[key]
                    rows.append([key.replace("_", " "), v["n_units"], v["n_significant"], v["fisher"]["pvalue"]])
            out.append(section(
                f"Importance and coherence: {label}",
                f"Each point is a cluster within one layer. Importance: {spec['metric']} when it is ablated "
                f"({spec['config']['ablation']}), minus the mean over {spec['config']['n_random']} random same-size "
                "sets of the layer. Coherence: "
                f"{html.unescape(spec['coherence_source']['correlation'] or '')}. Fisher's method combines the units.",
                img(png, "importance vs coherence")
                + table(["test", "units", "p <= 0.05", "Fisher p"], rows),
            ))
        al = load_json(d / layout.ALIGNMENT)
        if al:
            png = alignment_by_layer(al, figdir / f"{tag}_alignment")
            rows = [[t, v["n_layers_tested"], ", ".join(map(str, v["layers_significant"])) or "-",
                     "-" if v["fisher"] is None else v["fisher"]["pvalue"]] for t, v in al["per_task"].items()]
            out.append(section(
                f"Task neurons vs clusters: {label}",
                "Are each task's specific neurons (task map) concentrated in fewer clusters than random same-size "
                "sets of the layer? Entropy deficit = chance entropy minus the entropy of their distribution over "
                "clusters (nats). Published (Pochinkov et al. with MoEfication): strongest in early and late layers.",
                img(png, "alignment by layer") + table(["task", "layers tested", "layers p <= 0.05", "Fisher p"],
                                                         rows),
            ))
    return out
