"""The self-contained HTML report of a run directory.

Reads the result files of the directory's one layout (:func:`neurospec.record.layout.report_inputs`: the main
job's sub-directories, or one command's files at the top, or cluster directories), draws their figures into ``figures/`` (PNG and SVG) and writes
``report.html`` with the PNGs embedded as data URIs, so the file opens offline and can be mailed around.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from neurospec import __version__
from neurospec.errors import RunStoreError
from neurospec.record import layout
from neurospec.report import figures as F
from neurospec.report.ablation import plot_ablation
from neurospec.report.cluster_figures import cluster_sections
from neurospec.report.parts import img, load_json, section, table
from neurospec.report.skills_figures import skills_sections
from neurospec.report.wasserstein_figures import sparsify_sections, wasserstein_sections


def _taskmap_sections(tm: dict, figdir: Path) -> list[str]:
    out = []
    names = tm["tasks"]
    for frac in tm["overlap"]:
        mats = [np.array(tm["overlap"][frac]), np.array(tm["overlap_chance"]["matched"][frac])]
        titles = ["trained model", "chance (layer-matched)"]
        if tm.get("random_init"):
            mats.insert(1, np.array(tm["random_init"]["overlap"][frac]))
            titles.insert(1, "random init")
        png = F.heatmaps(mats, titles, names, figdir / f"overlap_{frac}", mask_diagonal=True,
                         suptitle=f"overlap |A∩B|/|A| of task-specific neurons, top {float(frac):.0%} "
                                  "(diagonal = 1, left blank)")
        out.append(section(
            f"Overlap of task neurons at {float(frac):.0%}",
            "Row task A, column task B: the share of A's specific neurons that B also selected. Compare the trained "
            "model with the random-init copy and with chance (random sets of the same per-layer sizes). Related "
            "tasks should overlap more than unrelated ones and more than chance.",
            img(png, f"overlap heatmap at {frac}"),
        ))
    if tm.get("selectivity") is not None:
        sel = np.array(tm["selectivity"])
        metric = tm.get("metric", "next-token top-1")
        png = F.heatmaps([sel], [f"{metric} drop"], names, figdir / "selectivity", vmin=None,
                         cmap="magma", fmt="{:.3f}",
                         suptitle=f"prune row task's top {tm['config']['select_frac']:.0%} neurons, {metric} drop of "
                                  "column task")
        base = tm["baseline"]
        rows = [[n, base[n]["top1"], base[n]["top10"], base[n]["skip_top1"], base[n]["loss"]] for n in names]
        out.append(section(
            "Selectivity matrix",
            f"Row i: the model with task i's specific neurons pruned; column j: how much task j's {metric} drops. "
            "A dominant diagonal means pruning is selective: each task's neurons serve that task.",
            img(png, "selectivity matrix") + table(["task", "top1", "top10", "skip top1", "loss"], rows),
        ))
    key = f"{tm['config']['select_frac']:g}" if f"{tm['config']['select_frac']:g}" in tm["layer_counts"] else next(iter(tm["layer_counts"]))
    png = F.layer_distribution(tm["layer_counts"][key], figdir / "layer_distribution",
                               title=f"where each task's top {float(key):.0%} neurons are")
    out.append(section("Per-layer distribution", "Number of each task's specific neurons in every layer.",
                        img(png, "per-layer distribution")))
    tables = []
    for t, top in tm["top_neurons"].items():
        tables.append(f"<div><h3>{html.escape(t)}</h3>"
                      + table(["neuron", "score"], [[r["neuron"], r["score"]] for r in top[:10]]) + "</div>")
    out.append(section("Top neurons per task", "The ten highest-scoring neurons of each task (score: "
                        f"{tm['config']['score']}).", '<div class="grid">' + "".join(tables) + "</div>"))
    return out


def _prune_sections(results: dict[str, dict], figdir: Path) -> list[str]:
    png = F.pruning_curves({t: r["steps"] for t, r in results.items()}, figdir / "pruning_curves")
    rows = [[t, r["retain"] if isinstance(r["retain"], str) else "+".join(r["retain"]), r["area"],
             r["steps"][0]["forget"]["top1"], r["steps"][-1]["forget"]["top1"], r["steps"][0]["retain"]["top1"],
             r["steps"][-1]["retain"]["top1"]] for t, r in results.items()]
    return [section(
        "Selective pruning",
        "Left: retain-task vs forget-task top-1 along the pruning steps (each curve starts top right). A curve that "
        "drops left while staying high is selective. Area: under the curve, normalised so that 1 = both tasks fall "
        "together, 2 = only the forget task falls.",
        img(png, "pruning curves") + table(
            ["forget", "retain", "area", "forget top1 start", "forget top1 end", "retain top1 start", "retain top1 end"],
            rows),
    )]


def _ablation_sections(ab: dict, figdir: Path) -> list[str]:
    png = plot_ablation(ab["rows"], figdir / layout.ABLATION_FIGURE)[0]
    return [section(
        "Ablation methods",
        "Loss increase as a growing random fraction of neurons is ablated, one line per method (band: spread over "
        "seeds). Lower is gentler. Published finding: resampling usually degrades most; the best of zero, mean and "
        "peak depends on the model.",
        img(Path(png), "ablation methods"),
    )]


def _model_name(res: dict | None) -> dict | None:
    """The model entry of a result that names its model by the command line's alias or path only."""
    return {"name": res["model"]} if res and isinstance(res.get("model"), str) else None


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.cap{color:#555;font-size:.92em} img.fig{max-width:100%;display:block;margin:.6em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f4f4f4} table.prov td,table.prov th{text-align:left} .grid{display:flex;flex-wrap:wrap;gap:1.5em} pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
"""


def build_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` (and ``figures/``) of a run directory; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunStoreError(f"no run directory {run_dir}")
    figdir = run_dir / layout.FIGURES
    inputs = layout.report_inputs(run_dir)
    sections: list[str] = []
    tm = load_json(inputs["taskmap"]) if inputs["taskmap"] is not None else None
    if tm:
        sections += _taskmap_sections(tm, figdir)
    prune = {}
    for p in inputs["prune"]:
        r = json.loads(p.read_text())
        prune[p.parent.name if inputs["layout"] == layout.MAIN_JOB else r["forget"]] = r
    if prune:
        sections += _prune_sections(prune, figdir)
    ab = load_json(inputs["ablation"]) if inputs["ablation"] is not None else None
    if ab:
        sections += _ablation_sections(ab, figdir)
    sections += cluster_sections(run_dir, figdir, dirs=inputs["clusters"])
    sections += skills_sections(run_dir, figdir)
    ws = load_json(inputs["wasserstein"]) if inputs["wasserstein"] is not None else None
    if ws:
        sections += wasserstein_sections(ws, run_dir, figdir)
    sp = load_json(inputs["sparsify"]) if inputs["sparsify"] is not None else None
    if sp:
        sections += sparsify_sections(sp, figdir)
    if not sections:
        raise RunStoreError(
            f"{run_dir} holds no results to report (looked for {layout.TASKMAP}, {layout.PRUNE_RESULT}, "
            f"{layout.ABLATION}, {layout.CLUSTERS}, {layout.SKILLS_RESULT}, {layout.WASSERSTEIN}, {layout.SPARSIFY}, in "
            f"the layout of `neurospec "
            f"{inputs['layout']}`{'' if inputs['layout'] == layout.MAIN_JOB else ' or another single command'}); "
            "run `neurospec run`, `taskmap`, `prune`, `ablate`, `cluster`, `skills`, `wasserstein` or `sparsify` into it "
            "first"
        )
    main = (load_json(inputs["main"]) if inputs["main"] is not None else None) or {}
    prov = {
        "run": str(run_dir),
        "neurospec": __version__,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": (tm or {}).get("model") or main.get("model") or _model_name(ws or sp),
        "tasks": (tm or {}).get("task_info") or main.get("tasks"),
        "config": main.get("config") or (tm or {}).get("config"),
        "command": main.get("command"),
    }
    model = prov["model"] or {}
    summary_rows = [
        ["model", f"{model.get('name', '?')} ({model.get('family', '?')}, {model.get('n_layers', '?')} layers, "
                  f"fingerprint {model.get('fingerprint', '?')})"],
        ["preprocessing", "; ".join(model.get("preprocessing") or []) or "none"],
        ["tasks", ", ".join(f"{t} ({v.get('collect_tokens', v.get('collect_images', '?'))} + "
                            f"{v.get('eval_tokens', v.get('eval_images', '?'))} {'images' if 'collect_images' in v else 'tokens'})"
                            for t, v in (prov["tasks"] or {}).items())],
        ["command", prov["command"] or "-"],
        ["neurospec", f"{__version__}, built {prov['built']}"],
    ]
    summary = "<table class='prov'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows) + "</table>"
    doc = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>neurospec report</title>"
        f"<style>{CSS}</style></head><body><h1>neurospec report</h1>"
        + section("Provenance", "Everything needed to reproduce these numbers (full record below).",
                   summary + "<details><summary>full provenance (JSON)</summary>"
                   f"<pre>{html.escape(json.dumps(prov, indent=2, default=str))}</pre></details>")
        + "".join(sections) + "</body></html>"
    )
    return layout.write_result_text(run_dir / layout.REPORT, doc)
