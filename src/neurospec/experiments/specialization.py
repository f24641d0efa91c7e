"""Importance and coherence of neuron clusters (Hod et al., METHODS.md section 3), from a cluster directory.

Units: each cluster intersected with one layer (site), of at least ``min_size`` neurons. By default only the
``per_layer`` largest of each layer are tested (ablations are the cost); ``per_layer=None`` tests all of them.

* **Importance** per task: the damage when the unit is ablated (zero or mean) - next-token loss increase on the
  task's held-out evaluation blocks for language models, top-1 accuracy drop for the zoo models (task ``all``: the
  whole test split; ``digit-C``: the images of class C) - against ``n_random`` random same-size sets of the same
  layer's clustered neurons; ``p = (r + 1) / (n + 1)``; Fisher's combination over the units.
* **Correlation coherence**: the unit's mean within-unit ``|rho|`` (Pearson) against random same-size sets of the
  layer. ``rho`` comes from a reference run's co-moments (the cluster directory's own reference, or ``reference``);
  for the zoo models from the training images. Without co-moments it is skipped, and the result says so.
* **Task coherence**: with a selectivity table ``sel[i, t]`` (the ``score`` of neuron ``i`` with task ``t`` as the
  forget task and the other tasks together as retain, METHODS.md section 1; zoo models: each digit class against the
  nine others, on the training images), the top task's share of the unit's summed selectivity, ``max_t S_t / sum_t
  S_t``, against random same-size sets. Needs at least two tasks (zoo models: always the ten classes).

Random sets are drawn from the whole layer's clustered neurons (not only the tested units), and the same sets
serve every task. Results go to ``specialization.json`` in the cluster directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurospec.analyze.importance import (
    cluster_importance,
    coherence_correlation,
    coherence_task,
    fisher_combine,
)
from neurospec.cluster.result import Clustering, load_clustering
from neurospec.data.build import build_tasks
from neurospec.data.digits import ALL_DIGITS, DIGIT_TASKS, digits_split, parse_digit_tasks
from neurospec.errors import NeurospecError, RunStoreError
from neurospec.evaluate.site_ablation import ABLATIONS, ImageEvaluator, LMEvaluator
from neurospec.models.loading import LoadedModel, load_model
from neurospec.models.sites import parse_site_name
from neurospec.record import layout
from neurospec.record.accumulators import NeuronStats, merge_stats
from neurospec.record.activations import comoments_of, image_activations
from neurospec.record.recorder import RecordConfig, record
from neurospec.record.reference import reference_comoments, reference_run
from neurospec.record.store import atomic_write_json, open_run
from neurospec.runtime import limited_threads
from neurospec.score import score_neurons
from neurospec.score.selective import check_score

SPECIALIZATION_FILE = layout.SPECIALIZATION
CONFIG_VERSION = 1


@dataclass(frozen=True)
class SpecializationConfig:
    """Settings of :func:`specialization`. ``tasks``: task specs (language models; at least one) or digit tasks
    (zoo models; default ``all`` and the ten classes). ``tokens``: tokens recorded per task for selectivity and mean
    offsets; ``eval_tokens``: evaluation tokens per task for the loss."""

    tasks: tuple[str, ...] = ()
    n_random: int = 19
    ablation: str = "zero"
    per_layer: int | None = 2
    layers: tuple[int, ...] | None = None
    min_size: int = 2
    tokens: int = 2048
    eval_tokens: int = 1024
    seq_len: int = 128
    batch_size: int = 8
    score: str = "abs"
    n_random_coherence: int = 999
    reference: str | None = None
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        check_score(self.score)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
        if self.n_random < 1 or self.n_random_coherence < 1:
            raise NeurospecError("n_random and n_random_coherence must be >= 1")
        if self.ablation not in ABLATIONS:
            raise NeurospecError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.per_layer is not None and self.per_layer < 1:
            raise NeurospecError(f"per_layer must be >= 1 or unset (all clusters), got {self.per_layer}")
        if self.min_size < 2:
            raise NeurospecError(f"min_size must be >= 2 (a unit needs pairs for coherence), got {self.min_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["layers"] = None if self.layers is None else list(self.layers)
        return {"type": "SpecializationConfig", "version": CONFIG_VERSION, **d}


def chosen_units(cl: Clustering, cfg: SpecializationConfig) -> dict[str, list[int]]:
    """``{site: [cluster ids]}`` tested: size >= ``min_size``, the ``per_layer`` largest (ties: lower id first)."""
    out = {}
    for site, lab in cl.labels.items():
        if cfg.layers is not None and parse_site_name(site)[0] not in cfg.layers:
            continue
        ids, counts = np.unique(lab[lab >= 0], return_counts=True)
        order = sorted((c for c in zip(ids.tolist(), counts.tolist(), strict=True) if c[1] >= cfg.min_size),
                       key=lambda c: (-c[1], c[0]))
        if cfg.per_layer is not None:
            order = order[: cfg.per_layer]
        if order:
            out[site] = sorted(c for c, _ in order)
    if not out:
        where = "" if cfg.layers is None else f" in layers {list(cfg.layers)}"
        raise NeurospecError(f"no cluster of at least {cfg.min_size} neurons{where}: nothing to test")
    return out


def tested_labels(labels: np.ndarray, keep: list[int]) -> np.ndarray:
    """Labels in which only the clusters ``keep`` are clusters: every other clustered neuron becomes a singleton.

    Singletons are never tested (size < 2) but stay in the pool random sets are drawn from, so the null is the
    whole layer's clustered neurons while only the chosen units are measured.
    """
    lab = np.asarray(labels, dtype=np.int64)
    out = lab.copy()
    others = np.flatnonzero((lab >= 0) & ~np.isin(lab, keep))
    base = int(lab.max()) + 1 if lab.size else 0
    out[others] = base + np.arange(others.size)
    return out


# ------------------------------------------------------------------------------------------------ task data


@dataclass
class _TaskData:
    evaluator: Any
    selectivity: dict[str, np.ndarray] | None  # {site: [width, n_tasks]}
    selectivity_tasks: list[str]
    corr: dict[str, torch.Tensor] | None
    coherence_source: str


def _selectivity(accs: dict[str, dict[str, Any]], names: list[str], score: str, sites: list[str]):
    """``{site: [width, n_tasks]}``: |score| of each task (forget) against the union of the others (retain)."""
    computed = {t: {s: accs[t][s].compute() for s in sites} for t in names}
    cols: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    for t in names:
        others = [u for u in names if u != t]
        retain = computed[others[0]] if len(others) == 1 else merge_stats([accs[u] for u in others])
        sc = score_neurons(score, computed[t], retain, task=t)
        for s in sites:
            cols[s].append(np.abs(sc[s].double().numpy()))
    return {s: np.stack(v, axis=1) for s, v in cols.items()}


def _image_data(target: LoadedModel, cfg: SpecializationConfig, sites: list[str], timing: dict) -> _TaskData:
    try:
        tasks = parse_digit_tasks(cfg.tasks) if cfg.tasks else (ALL_DIGITS, *DIGIT_TASKS)
    except ValueError as e:
        raise NeurospecError(str(e)) from None
    split = digits_split()
    acts = image_activations(target, split.x_train, sites)
    per_image = acts[sites[0]].shape[0] // split.y_train.shape[0]
    row_class = split.y_train.repeat_interleave(per_image)
    offsets = {s: x.double().mean(0) for s, x in acts.items()}
    classes = list(DIGIT_TASKS)
    sel: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    for c in range(len(classes)):
        inside = row_class == c
        for s in sites:
            f, r = NeuronStats(acts[s].shape[1]), NeuronStats(acts[s].shape[1])
            f.update(acts[s][inside])
            r.update(acts[s][~inside])
            sc = score_neurons(cfg.score, {s: f.compute()}, {s: r.compute()}, task=classes[c])[s]
            sel[s].append(np.abs(sc.double().numpy()))
    corr = {s: v["corr"] for s, v in comoments_of(acts).items()}
    t0 = time.perf_counter()
    evaluator = ImageEvaluator(target, tasks, method=cfg.ablation, offsets=offsets)
    timing["baseline"] = time.perf_counter() - t0
    return _TaskData(evaluator, {s: np.stack(v, axis=1) for s, v in sel.items()}, classes, corr,
                     "pearson correlation over the training images")


def _lm_data(target: LoadedModel, cfg: SpecializationConfig, sites: list[str], layers: set[int], cl: Clustering,
             work: Path, progress: Any, timing: dict) -> _TaskData:
    if target.analysis_kind != "causal-lm":
        raise NeurospecError(
            f"specialization measures next-token loss: it needs a causal LM or a zoo model; {target.name} is "
            f"{target.analysis_kind!r}"
        )
    if not cfg.tasks:
        raise NeurospecError("name at least one task (--task python --task prose); see `neurospec tasks`")
    rcfg = RecordConfig(tokens=cfg.tokens, eval_tokens=cfg.eval_tokens, seq_len=cfg.seq_len,
                        batch_size=cfg.batch_size, kinds=("mlp",), reservoir=0, seed=cfg.seed)
    loaded = target
    tasks = build_tasks(loaded, list(cfg.tasks), rcfg)
    names = list(tasks)
    record(loaded, list(tasks.values()), work, rcfg, force=True, progress=progress)
    run = open_run(work)
    accs = {t: {s: a["stats"] for s, a in run.accumulators(t, ("stats",)).items() if s in sites} for t in names}
    merged = merge_stats([accs[t] for t in names])
    offsets = {s: merged[s]["mean"].float() for s in sites}
    sel = None
    if len(names) >= 2:
        sel = _selectivity(accs, names, cfg.score, sites)
    ref = cfg.reference or cl.extra.get("reference")
    corr, source = None, "none: no reference run with MLP co-moments (pass --reference RUN recorded with " \
                         "`neurospec record ... --comoments mlp`)"
    if ref is not None:
        run_ref = reference_run(ref, target)
        if "mlp" in run_ref.config.get("comoments", []):
            com, used = reference_comoments(run_ref, sites)
            corr = {s: v["corr"] for s, v in com.items()}
            source = f"pearson correlation from the co-moments of {ref} (tasks {', '.join(used)})"
        elif cfg.reference is not None:
            reference_comoments(run_ref, sites)  # raises with how to record them
    t0 = time.perf_counter()
    evaluator = LMEvaluator(loaded, {t: d.eval for t, d in tasks.items()}, layers=layers,
                            batch_size=cfg.batch_size, method=cfg.ablation, offsets=offsets)
    timing["baseline"] = time.perf_counter() - t0  # one unablated evaluation (it also fills the prefix cache)
    return _TaskData(evaluator, sel, names, corr, source)


# ------------------------------------------------------------------------------------------------- pipeline


def spread_layers(cluster_dir: str | Path, n: int = 4) -> tuple[int, ...]:
    """``n`` evenly spaced layers of a cluster directory's clustered layers, first and last included (all of them
    when there are at most ``n``): the command line's default, since every tested unit costs ``1 + n_random``
    evaluations."""
    return evenly_spaced(sorted({parse_site_name(s)[0] for s in load_clustering(cluster_dir).labels}), n)


def evenly_spaced(found: list[int], n: int) -> tuple[int, ...]:
    """``n`` evenly spaced items of the sorted list ``found``, first and last included (all when at most ``n``)."""
    if len(found) <= n:
        return tuple(found)
    picks = np.unique(np.round(np.linspace(0, len(found) - 1, n)).astype(int))
    return tuple(found[i] for i in picks)


def ablation_cost(units: dict[str, list[int]], n_random: int, n_layers: int) -> float:
    """The ablations' cost in full evaluations of every task: ``1 + n_random`` per unit, each a forward pass from
    the unit's layer on (the prefix below it is cached), so a unit in layer ``L`` costs ``(n_layers - L) / n_layers``
    of one."""
    n_layers = max(1, n_layers)
    return float(sum((1 + n_random) * len(ids) * max(1, n_layers - parse_site_name(site)[0]) / n_layers
                     for site, ids in units.items()))


def specialization(cluster_dir: str | Path, cfg: SpecializationConfig, *, target: LoadedModel | None = None,
                   progress: Any = None, step: Any = None, estimate: Any = None, threads: int | None = 1) -> dict:
    """Importance and coherence of the clusters in ``cluster_dir`` (see the module docstring).

    ``target``: the clustered model if already loaded (else reloaded from the directory's manifest; its fingerprint
    must match). ``progress(label, done, total)``: recording progress (tokens); ``step(label, done, total)``:
    ablations done. Cost: ``units * (1 + n_random)`` evaluations of every task's evaluation blocks.
    ``estimate(seconds, evaluations)``: called once before the ablations with their expected time, from the time of
    the unablated evaluation and :func:`ablation_cost`, and the number of ablations.
    ``threads``: torch, BLAS and OpenMP threads (see :func:`~neurospec.runtime.limited_threads`).
    Writes ``specialization.json`` in ``cluster_dir`` and returns it.
    """
    with limited_threads(threads):
        return _specialization(Path(cluster_dir), cfg, target, progress, step, estimate)


def _specialization(cluster_dir: Path, cfg: SpecializationConfig, target: LoadedModel | None, progress: Any,
                    step: Any, estimate: Any) -> dict:
    t0 = time.perf_counter()
    cl = load_clustering(cluster_dir)
    target = target or load_model(cl.model_spec)
    if target.fingerprint != cl.fingerprint:
        raise RunStoreError(
            f"{cluster_dir} was clustered on another model (fingerprint {cl.fingerprint}); "
            f"{target.name} has fingerprint {target.fingerprint}"
        )
    units = chosen_units(cl, cfg)
    sites = list(units)
    layers = {parse_site_name(s)[0] for s in sites}
    labels = {s: tested_labels(cl.labels[s], units[s]) for s in sites}
    timing: dict[str, float] = {}
    if target.analysis_kind == "image":
        data = _image_data(target, cfg, sites, timing)
    else:
        data = _lm_data(target, cfg, sites, layers, cl, cluster_dir / "specialization-run", progress, timing)
    ev = data.evaluator
    tasks = list(ev.tasks)

    n_units = sum(len(v) for v in units.values())
    total = n_units * (1 + cfg.n_random)
    if estimate is not None:
        n_layers = len({s.layer for s in target.sites})
        estimate(timing["baseline"] * ablation_cost(units, cfg.n_random, n_layers), total)
    cache: dict[tuple[str, bytes], dict[str, float]] = {}

    def damage(site: str, idx: np.ndarray) -> dict[str, float]:
        key = (site, np.asarray(idx, dtype=np.int64).tobytes())
        if key not in cache:
            cache[key] = ev.damage(ev.ablate(site, idx))
            if step is not None:
                step("ablations", len(cache), total)
        return cache[key]

    importance = {t: cluster_importance(labels, lambda s, i, _t=t: damage(s, i)[_t], n_random=cfg.n_random,
                                        min_size=cfg.min_size, seed=cfg.seed) for t in tasks}
    if step is not None:
        step("ablations", total, total)  # random sets can repeat (a unit that fills its layer): the count ends here
    coh_corr = coh_task = None
    if data.corr is not None:
        coh_corr = [x for s in sites for x in coherence_correlation(
            data.corr[s], labels[s], n_random=cfg.n_random_coherence, min_size=cfg.min_size, site=s,
            seed=cfg.seed).tests]
    if data.selectivity is not None:
        coh_task = [x for s in sites for x in coherence_task(
            data.selectivity[s], labels[s], n_random=cfg.n_random_coherence, min_size=cfg.min_size, site=s,
            seed=cfg.seed).tests]

    def test_dict(x: Any) -> dict:
        d = {k: getattr(x, k) for k in ("effect", "null_mean", "null_std", "pvalue")}
        if getattr(x, "top_task", None) is not None:
            d["top_task"] = data.selectivity_tasks[x.top_task]
        return d

    rows = []
    for i, base in enumerate(importance[tasks[0]].tests):
        row = {"site": base.site, "layer": parse_site_name(base.site)[0], "cluster": base.cluster, "size": base.size,
               "importance": {t: test_dict(importance[t].tests[i]) for t in tasks}}
        row["coherence_correlation"] = None if coh_corr is None else test_dict(coh_corr[i])
        row["coherence_task"] = None if coh_task is None else test_dict(coh_task[i])
        rows.append(row)

    notes = []
    for r in rows:
        pool = int((cl.labels[r["site"]] >= 0).sum())
        if r["size"] > pool // 2:
            notes.append(f"{r['site']} cluster {r['cluster']} holds {r['size']} of the layer's {pool} clustered neurons: "
                         "random same-size sets overlap it heavily, so its importance test has little power (a "
                         "partition that slices the network by depth does this; test per-layer clusters instead)")

    def summary(pvals: list[float]) -> dict:
        comb = fisher_combine(pvals)
        return {"fisher": asdict(comb), "n_units": len(pvals), "n_significant": int(sum(p <= cfg.alpha for p in pvals))}

    result = {
        "cluster_dir": str(cluster_dir),
        "method": cl.method,
        "graph": cl.graph,
        "model": {**target.describe(), "analysis_kind": target.analysis_kind},
        "config": cfg.to_dict(),
        "tasks": tasks,
        "metric": ev.metric,
        "baseline": ev.baseline,
        "units": {s: v for s, v in units.items()},
        "importance": {t: summary([r["importance"][t]["pvalue"] for r in rows]) for t in tasks},
        "coherence_correlation": None if coh_corr is None else summary([x.pvalue for x in coh_corr]),
        "coherence_task": None if coh_task is None else summary([x.pvalue for x in coh_task]),
        "coherence_source": {"correlation": data.coherence_source,
                             "task": None if data.selectivity is None else
                             f"score {cfg.score!r}, each of {data.selectivity_tasks} against the others"},
        "rows": rows,
        "notes": notes,
        "n_evaluations": len(cache) + 1,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(cluster_dir / SPECIALIZATION_FILE, result)
    return result

