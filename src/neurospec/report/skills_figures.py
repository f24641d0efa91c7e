"""Figures and report sections of a skill-neuron run (``neurospec skills``, its ``skills.json``): predictivity per
layer, perturbation curves of skill against random sets, the similarity of tasks' skill sets, and the pruning
curve, with tables of the agreement and beyond-prompt studies when the run has them.

:func:`skills_sections` reads ``DIR/skills.json`` or ``DIR/skills/skills.json`` when it is a skills result (its
``config`` has type ``SkillsConfig``) and returns the HTML sections; figures go to ``figures/`` as PNG and SVG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neurospec.models.sites import parse_site_name
from neurospec.record.layout import SKILLS_RESULT
from neurospec.report.figures import heatmaps, pyplot, save_figure
from neurospec.report.parts import img, section, table


def load_skills_result(run_dir: Path) -> dict | None:
    """The skills result of ``run_dir`` (or its ``skills/`` subdirectory), or None."""
    for path in (run_dir / SKILLS_RESULT, run_dir / "skills" / SKILLS_RESULT):
        if path.is_file():
            res = json.loads(path.read_text())
            if (res.get("config") or {}).get("type") == "SkillsConfig":
                return res
    return None


def predictivity_series(res: dict) -> dict[tuple[str, str], tuple[list[int], list[float], list[float | None]]]:
    """``{(task, site kind): (layers, mean predictivity, skill-neuron mean)}``, layers in order: one line per site
    kind, so that MLP and attention sites of the same layer are never joined."""
    by_kind: dict[str, list[str]] = {}
    for s in sorted(res["predictivity"], key=lambda s: parse_site_name(s)[0]):
        by_kind.setdefault(parse_site_name(s)[1], []).append(s)
    return {(task, kind): ([parse_site_name(s)[0] for s in sites],
                           [res["predictivity"][s][task]["mean"] for s in sites],
                           [res["predictivity"][s][task]["skill_mean"] for s in sites])
            for task in res["skill_neurons"] for kind, sites in by_kind.items()}


def predictivity_per_layer(res: dict, path: Path) -> Path:
    """Per task (and site kind, when several were scored): the mean predictivity of all neurons of a layer (dashed)
    and of its skill neurons (solid)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    series = predictivity_series(res)
    kinds = list(dict.fromkeys(kind for _, kind in series))
    tasks = list(dict.fromkeys(task for task, _ in series))
    markers = "os^v"
    for (task, kind), (layers, mean, skill) in series.items():
        colour = f"C{tasks.index(task) % 10}"
        what = f"{task}, {kind}" if len(kinds) > 1 else task
        ax.plot(layers, mean, "--", color=colour, label=f"{what}: all neurons")
        ax.plot(layers, [np.nan if v is None else v for v in skill], f"-{markers[kinds.index(kind) % 4]}",
                color=colour, ms=3, label=f"{what}: skill neurons")
    ax.axhline(0.5, color="#bbbbbb", lw=1, zorder=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("predictivity (mean)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _curves(ax, xs, skill, mean, std, base, title, xlabel):
    ax.plot(xs, skill, "-o", color="#cc3311", ms=4, label="skill neurons")
    mean, std = np.asarray(mean), np.asarray(std)
    ax.plot(xs, mean, "-s", color="#555555", ms=3, label="random (mean ± std)")
    ax.fill_between(xs, mean - std, mean + std, color="#999999", alpha=0.3, lw=0)
    if base is not None:
        ax.axhline(base, color="#0077bb", lw=1, ls=":", label="unchanged model")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")


def perturbation_curves(rows_by_task: dict[str, list[dict]], path: Path, xlabel: str = "fraction perturbed per layer"
                        ) -> Path:
    """One panel per (task, method): accuracy with the skill neurons perturbed against random same-count sets."""
    plt = pyplot()
    panels = [(t, m) for t, rows in rows_by_task.items() for m in dict.fromkeys(r["method"] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.4 * max(1, len(panels)), 3.2), squeeze=False)
    for ax, (task, method) in zip(axes[0], panels, strict=False):
        rows = sorted((r for r in rows_by_task[task] if r["method"] == method), key=lambda r: r["p"])
        _curves(ax, [r["p"] for r in rows], [r["skill_acc"] for r in rows], [r["random_acc_mean"] for r in rows],
                [r.get("random_acc_std", 0.0) for r in rows], rows[0].get("base_acc"), f"{task}: {method}", xlabel)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def pruning_curve(rows: list[dict], path: Path) -> Path:
    """One panel per task: accuracy keeping the skill neurons against random kept sets, by kept fraction."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["keep"])
        _curves(ax, [r["keep"] for r in rs], [r["skill_acc"] for r in rs], [r["random_acc_mean"] for r in rs],
                [r.get("random_acc_std", 0.0) for r in rs], rs[0].get("base_acc"), task, "fraction kept per layer")
        ax.set_xscale("log")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def skills_sections(run_dir: Path, figdir: Path) -> list[str]:
    """HTML sections (strings) of the skills result of ``run_dir``, or none when it has no such result."""

    res = load_skills_result(run_dir)
    if res is None:
        return []
    out = []
    p = res["config"]["p"]
    png = predictivity_per_layer(res, figdir / "skills_predictivity")
    out.append(section(
        "Skill neurons: predictivity per layer",
        f"Mean predictivity (max over prompt positions of max(Acc, 1 - Acc); 0.5 = chance) of all neurons of each "
        f"scored site ({', '.join(res['config'].get('kinds', ['mlp']))}) "
        f"(dashed) and of the top {p:g} per layer (solid), per task.", img(png, "predictivity per layer")))
    if res.get("perturbation"):
        png = perturbation_curves(res["perturbation"], figdir / "skills_perturbation")
        out.append(section(
            "Skill neurons: perturbation",
            "Test accuracy when the skill neurons are perturbed (red) against random sets with the same count per "
            "layer (grey band: mean ± std). Skill neurons should hurt much more.", img(png, "perturbation")))
    sim = res.get("similarity")
    if sim and len(sim["tasks"]) > 1:
        png = heatmaps([np.array(sim["overlap"])], ["skill-set overlap"], sim["tasks"], figdir / "skills_similarity",
                       suptitle=f"|A∩B|/|A| of skill sets (chance {sim['chance']:.3f})", mask_diagonal=True)
        out.append(section("Skill neurons: task similarity",
                            "Overlap of the tasks' skill sets; the layer-matched chance level is in the title.",
                            img(png, "similarity")))
    if res.get("pruning"):
        png = pruning_curve(res["pruning"], figdir / "skills_pruning")
        rows = [[r["task"], r["keep"], r["skill_acc"], r["random_acc_mean"], r["pvalue"]] for r in res["pruning"]]
        out.append(section(
            "Skill neurons: pruning",
            "Test accuracy keeping only the top fraction of each layer (the other neurons set to their training "
            "means) against random kept sets of the same per-layer count.",
            img(png, "pruning") + table(["task", "keep", "skill", "random mean", "p-value"], rows)))
    if res.get("agreement"):
        rows = [[t, a["overlap"], a["chance"], a["pvalue"]] for t, a in res["agreement"].items()]
        out.append(section("Skill neurons and selective pruning",
                            "Fraction of skill neurons that are also selective-pruning neurons of the task (same "
                            "count per layer), its layer-matched chance level and hypergeometric p-value.",
                            table(["task", "overlap", "chance", "p-value"], rows)))
    if res.get("beyond"):
        png = perturbation_curves(res["beyond"], figdir / "skills_beyond")
        out.append(section("Skill neurons beyond prompt tuning",
                            "The same skill neurons perturbed in a model that learned the task with its neurons "
                            "frozen (LoRA on attention or attention biases).", img(png, "beyond")))
    return out
