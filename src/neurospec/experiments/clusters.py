"""Pipelines of neuron clustering (METHODS.md sections 3 and 6): cluster a model, test clusterability, align task
neurons with clusters. Importance and coherence are in :mod:`neurospec.experiments.specialization`, MoE routing in
:mod:`neurospec.experiments.routing`.

Methods and graphs (the registry :data:`neurospec.cluster.METHODS`):

* ``moefication`` / ``params``: per MLP layer, balanced k-means of the L2-normalised input-projection rows into
  ``experts`` experts (:func:`neurospec.cluster.moefication.moefy`). When ``experts`` does not divide the layer's
  width ``d``, ``d mod E`` experts get one neuron more than the others (sizes ``d // E`` and ``d // E + 1``);
  ``experts > d`` is an error. No graph, so no n-cut.
* ``moefication`` / ``coactivation``: per layer, a balanced partition of the co-activation graph. ``coactivation``
  ``"relu"`` (default, METHODS.md section 6): edge weights ``E[relu(x_i) relu(x_j)]`` (the published sum over tokens,
  divided by the token count), from a reference run recorded with ``--relu-comoments mlp``; ``"raw"``: the raw
  second moments ``E[x_i x_j]`` with negative entries dropped, from a run recorded with ``--comoments mlp``. Zoo
  models: the training images. Edges below ``threshold`` (same units, default 0: none dropped; METHODS.md gives no
  value) are removed (:func:`neurospec.cluster.moefication.coactivation_graph`); ``extra["edges_kept"]`` reports the
  fraction of off-diagonal pairs left per layer, to calibrate the threshold.
* ``spectral`` / ``weights``: one normalised spectral clustering of all chosen MLP layers' neurons joined through the
  residual stream (:func:`neurospec.cluster.spectral.weight_graph`; plain MLPs: ``|W|`` between hidden layers). Dead
  neurons (constant on the reference run's tokens, or on the training images for zoo models) are excluded when that
  data is available. ``top_k``: each neuron keeps its ``top_k`` strongest edges per neighbouring layer; unset, every
  edge is kept while the dense graph holds at most :data:`DENSE_EDGE_LIMIT` edges (one or two pairs of 1536-wide
  layers, every plain MLP of the zoo) and :data:`DEFAULT_TOP_K` beyond (all 30 layers of SmolLM2: 3.7 s instead of
  81 s on 2 cores; on six layers of SmolLM2 the sparse graph's partition has the dense partition's n-cut on the
  dense graph within 0.6%, although the two partitions differ: the modular structure is weak); ``0`` keeps every
  edge. ``shuffles`` adds the clusterability baseline: the same clustering of ``shuffles`` networks
  whose weight matrices are permuted entry-wise (seeded), with z-score and one-sided p-value.
* ``spectral`` / ``correlation``: spectral clustering of ``rho^2`` (Pearson) activation correlations. Language models:
  per layer, from a reference run's co-moments (co-moments are recorded per site, so correlations *between* layers
  are not available); reported n-cut = the mean over layers. Zoo models: one graph over all chosen layers, from the
  training images.

Everything is seeded. The result is a :class:`~neurospec.cluster.result.Clustering` saved in the output directory.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurospec.analyze.clusterability import Clusterability
from neurospec.analyze.importance import alignment, fisher_combine, permutation_pvalue
from neurospec.cluster import METHODS, Clusterer, get_clusterer, register_clusterer
from neurospec.cluster.baselines import shuffle_seeds
from neurospec.cluster.moefication import (
    COACTIVATIONS,
    MOE_PROJECTIONS,
    coactivation_experts,
    coactivation_graph,
    moefy,
)
from neurospec.cluster.result import Clustering, load_clustering
from neurospec.cluster.spectral import (
    GRAPH_PROJECTIONS,
    WeightChain,
    correlation_graph,
    ncut,
    spectral_clustering,
)
from neurospec.data.digits import digits_split
from neurospec.errors import NeurospecError, RunStoreError
from neurospec.experiments._settings import UNSET, config_from
from neurospec.experiments.taskmap import task_masks
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import parse_site_name
from neurospec.record import layout
from neurospec.record.activations import comoments_of, dead_mask, image_activations
from neurospec.record.reference import reference_comoments, reference_dead, reference_run
from neurospec.record.store import atomic_write_json
from neurospec.runtime import limited_threads

StepFn = Callable[[str, int, int], None]
CONFIG_VERSION = 1
DENSE_EDGE_LIMIT = 5_000_000  # weight graph: above this many edges, --top-k defaults to DEFAULT_TOP_K
DEFAULT_TOP_K = 32


def weight_graph_top_k(top_k: int | None, widths: Sequence[int]) -> int | None:
    """The edges kept per neuron and neighbouring layer of a weight graph over layers of ``widths``: ``top_k`` when
    given (``0``: every edge, returned as ``None``); unset: ``None`` (every edge) while the dense graph holds at most
    :data:`DENSE_EDGE_LIMIT` edges, else :data:`DEFAULT_TOP_K`."""
    if top_k is not None:
        return None if top_k == 0 else int(top_k)
    dense = sum(a * b for a, b in zip(widths, widths[1:], strict=False))
    return None if dense <= DENSE_EDGE_LIMIT else DEFAULT_TOP_K


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"0-29"``, ``"0,3,5-7"`` -> sorted layer indices; ``None``/empty -> ``None`` (all layers)."""
    if text is None or not str(text).strip():
        return None
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise NeurospecError(f"layers must look like '0-29' or '0,3,5-7', got {text!r}") from None
    if any(x < 0 for x in out):
        raise NeurospecError(f"layers must be >= 0, got {text!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of one clustering (see the module docstring). ``None`` means unset (the method's default)."""

    method: str = "moefication"
    graph: str | None = None
    experts: int = 96
    projection: str | None = None
    k: int = 16
    layers: tuple[int, ...] | None = None
    top_k: int | None = None
    reference: str | None = None
    tasks: tuple[str, ...] = ()
    shuffles: int = 0
    n_init: int = 10
    seed: int = 0
    coactivation: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NeurospecError(f"unknown clustering method {self.method!r}; choose one of {', '.join(METHODS)}")
        m = METHODS[self.method]
        graph = self.graph or m.default_graph
        if graph not in m.graphs:
            raise NeurospecError(f"method {self.method!r} reads the graphs {', '.join(m.graphs)}, not {graph!r}")
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
        allowed = {("moefication", "params"): MOE_PROJECTIONS, ("spectral", "weights"): GRAPH_PROJECTIONS}
        choices = allowed.get((self.method, graph))
        if choices is None and self.projection is not None:
            raise NeurospecError(f"--projection applies to moefication by params and to the weight graph, not to "
                                 f"{self.method} by {graph}")
        if choices is not None:
            proj = self.projection or "up"
            if proj not in choices:
                raise NeurospecError(f"projection for {self.method} by {graph} must be one of {choices}, got {proj!r}")
            object.__setattr__(self, "projection", proj)
        if self.experts < 1:
            raise NeurospecError(f"experts must be >= 1, got {self.experts}")
        if self.k < 2:
            raise NeurospecError(f"k must be >= 2 clusters, got {self.k}")
        if self.top_k is not None and (graph != "weights" or self.top_k < 0):
            raise NeurospecError("--top-k (>= 1, or 0 for every edge) applies to the weight graph only")
        if self.shuffles < 0 or (self.shuffles and graph != "weights"):
            raise NeurospecError("--shuffles (the clusterability baseline) applies to --graph weights only")
        if self.n_init < 1:
            raise NeurospecError(f"n_init must be >= 1, got {self.n_init}")
        if (self.method, graph) == ("moefication", "coactivation"):
            variant = self.coactivation or "relu"
            if variant not in COACTIVATIONS:
                raise NeurospecError(f"--coactivation must be one of {', '.join(COACTIVATIONS)}, got {variant!r}")
            thr = 0.0 if self.threshold is None else float(self.threshold)
            if not np.isfinite(thr) or thr < 0:
                raise NeurospecError(f"--threshold must be a finite number >= 0, got {self.threshold}")
            object.__setattr__(self, "coactivation", variant)
            object.__setattr__(self, "threshold", thr)
        elif self.coactivation is not None or self.threshold is not None:
            raise NeurospecError(f"--coactivation and --threshold apply to moefication by coactivation, not to "
                                 f"{self.method} by {graph}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["tasks"] = list(self.tasks)
        return {"type": "ClusterConfig", "version": CONFIG_VERSION, **d}


# ------------------------------------------------------------------------------------------------ reference data


def _image_train_activations(target: LoadedModel, sites: Sequence[Any]) -> dict[str, torch.Tensor]:
    return image_activations(target, digits_split().x_train, sites)


# ---------------------------------------------------------------------------------------------------- cluster


def cluster(target: LoadedModel, cfg: ClusterConfig, *, step: StepFn | None = None, threads: int | None = 1) -> Clustering:
    """Cluster ``target``'s MLP neurons as ``cfg`` says (see the module docstring).

    ``threads``: torch, BLAS and OpenMP threads while clustering (see :func:`~neurospec.runtime.limited_threads`).
    """

    with limited_threads(threads):
        return _cluster(target, cfg, step)


def _cluster(target: LoadedModel, cfg: ClusterConfig, step: StepFn | None) -> Clustering:
    t0 = time.perf_counter()
    sites = target.mlp_sites(cfg.layers)
    labels, ncut_value, scope, extra = get_clusterer(cfg.method, str(cfg.graph)).run(target, sites, cfg, step)
    extra["seconds"] = round(time.perf_counter() - t0, 3)
    model = {**target.describe(), "analysis_kind": target.analysis_kind}
    return Clustering(labels, cfg.method, str(cfg.graph), scope, model, target.spec, cfg.to_dict(),
                      ncut_value, extra)


def cluster_to_dir(target: LoadedModel, cfg: ClusterConfig, out: str | Path, *, step: StepFn | None = None,
                   threads: int | None = 1) -> dict:
    """:func:`cluster` and save it in ``out``; returns the JSON summary the command line prints."""
    res = cluster(target, cfg, step=step, threads=threads)
    labels_file = res.save(out)
    cb = res.extra.get("clusterability")
    coact = {k: res.extra[k] for k in ("coactivation", "threshold", "edges_kept") if k in res.extra}
    top_k = {"top_k": res.extra["top_k"]} if "top_k" in res.extra else {}
    return {
        **coact,
        **top_k,
        "method": res.method,
        "graph": res.graph,
        "labels_file": str(labels_file),
        "n_clusters": res.n_clusters,
        "ncut": res.ncut,
        "seconds": res.extra["seconds"],
        "scope": res.scope,
        "n_sites": len(res.labels),
        "n_neurons": int(sum(v.size for v in res.labels.values())),
        "n_excluded": int(sum(res.excluded().values())),
        "clusterability": None if cb is None else {k: cb[k] for k in ("mean", "std", "z", "pvalue", "ncut")},
        "model": res.model.get("name"),
        "fingerprint": res.fingerprint,
        "out": str(out),
    }


def _moe_params(target: LoadedModel, sites, cfg: ClusterConfig):

    e = cfg.experts
    for s in sites:
        if e > s.width:
            raise NeurospecError(
                f"--experts {e} does not fit site {s.name}: its MLP has {s.width} neurons, so at most {s.width} "
                f"experts (experts that divide {s.width} give equal sizes, e.g. {_divisors(s.width)})"
            )
    labels = moefy(target, [s.name for s in sites], n_experts=e, projection=cfg.projection, n_init=1,
                   seed=cfg.seed)
    extra = {"expert_sizes": {s.name: sorted(set(np.bincount(labels[s.name]).tolist())) for s in sites}}
    uneven = [s.name for s in sites if s.width % e]
    if uneven:
        extra["note"] = (f"{e} experts do not divide the width of {len(uneven)} site(s): there, width mod {e} experts "
                         "have one neuron more than the others")
    return labels, None, "per_layer", extra


def _divisors(n: int) -> list[int]:
    return [d for d in (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if d <= n and n % d == 0][:6]


def _reference_or_images(target: LoadedModel, sites, cfg: ClusterConfig, what: str, kind: str = "comoments"):
    """Co-moments (``kind``) of ``sites`` from the reference run (language models), or ``None`` for the training
    images (zoo models)."""
    if cfg.reference is not None:
        run = reference_run(cfg.reference, target)
        com, tasks = reference_comoments(run, [s.name for s in sites], cfg.tasks, kind=kind)
        return com, {"reference": str(Path(cfg.reference).resolve()), "reference_tasks": tasks}
    if target.analysis_kind == "image":
        return None, {"reference": None, "reference_tasks": ["train images"]}
    raise NeurospecError(
        f"{what} needs recorded co-moments: pass --reference RUN, a run recorded on this model with "
        f"`neurospec record --model MODEL --task T ... --{kind.replace('_', '-')} mlp --out RUN`"
    )


def _moe_coactivation(target: LoadedModel, sites, cfg: ClusterConfig):

    for s in sites:
        if cfg.experts > s.width:
            raise NeurospecError(f"--experts {cfg.experts} does not fit site {s.name}: its MLP has {s.width} neurons")
    kind = "relu_comoments" if cfg.coactivation == "relu" else "comoments"
    com, extra = _reference_or_images(target, sites, cfg, "moefication by co-activation", kind)
    if com is None:
        acts = _image_train_activations(target, sites)
        if cfg.coactivation == "relu":
            acts = {n: x.clamp(min=0) for n, x in acts.items()}
        com = comoments_of(acts)
    labels, kept = {}, {}
    for s in sites:
        c = com[s.name]
        second = c["cov"] + torch.outer(c["mean"], c["mean"])  # E[r_i r_j], r = relu(x) or x
        graph = coactivation_graph(second, threshold=float(cfg.threshold or 0.0))
        w = graph.shape[0]
        kept[s.name] = float(np.count_nonzero(graph) / max(1, w * (w - 1)))
        labels[s.name] = coactivation_experts(graph, cfg.experts, seed=cfg.seed)
    extra.update(coactivation=cfg.coactivation, threshold=cfg.threshold, edges_kept=kept)
    return labels, None, "per_layer", extra


def _live_count(adjacency: Any, mask: np.ndarray | None) -> int:
    deg = np.asarray(adjacency.sum(axis=1)).ravel()
    live = deg > 0
    if mask is not None:
        live &= mask
    return int(live.sum())


def _check_k(k: int, n_live: int, n: int, where: str) -> None:
    if k >= n_live:
        raise NeurospecError(
            f"k={k} clusters is larger than the number of live neurons of {where}: {n_live} of {n} are live (have "
            f"edges and are not dead); choose --k below {n_live}"
        )


def _spectral(adjacency: Any, cfg: ClusterConfig, mask: Any = None) -> np.ndarray:

    try:
        return spectral_clustering(adjacency, cfg.k, mask=mask, n_init=cfg.n_init, seed=cfg.seed)
    except ValueError as e:  # e.g. excluding dead neurons isolated others and left too few nodes for k
        raise NeurospecError(f"spectral clustering with k={cfg.k} failed: {e}") from None


def _spectral_weights(target: LoadedModel, sites, cfg: ClusterConfig, step: StepFn | None):
    if len(sites) < 2:
        raise NeurospecError(f"a weight graph joins consecutive MLP layers: choose at least two layers, got "
                             f"{[s.name for s in sites]}")
    try:
        if target.is_plain:
            chain = WeightChain.from_model(target.model, layers=[s.layer for s in sites], projection=cfg.projection)
        else:
            chain = WeightChain.from_model(target, sites=[s.name for s in sites], projection=cfg.projection)
    except ValueError as e:
        raise NeurospecError(str(e)) from None
    if step:
        step("weight graph", 0, 1 + cfg.shuffles)
    top_k = weight_graph_top_k(cfg.top_k, chain.widths)
    graph = chain.graph(top_k)
    dead = None
    extra: dict[str, Any] = {"dead_from": None, "top_k": top_k}
    if cfg.reference is not None:
        dead = reference_dead(reference_run(cfg.reference, target), list(graph.sites))
        extra["dead_from"] = str(Path(cfg.reference).resolve())
    elif target.analysis_kind == "image":

        dead = dead_mask(_image_train_activations(target, sites))
        extra["dead_from"] = "train images"
    mask = None if dead is None else ~np.concatenate([dead[s].numpy() for s in graph.sites])
    _check_k(cfg.k, _live_count(graph.adjacency, mask), graph.n_nodes, f"the weight graph of {len(sites)} layers")
    labels = _spectral(graph.adjacency, cfg, mask)
    value = ncut(graph.adjacency, labels)
    extra.update(n_edges=int(graph.adjacency.nnz // 2), n_live=int((labels >= 0).sum()))
    if cfg.shuffles:
        null = []
        for i, s in enumerate(shuffle_seeds(cfg.seed, cfg.shuffles)):
            if step:
                step("shuffled weights", 1 + i, 1 + cfg.shuffles)
            g = chain.shuffled(s).graph(top_k)
            lab = _spectral(g.adjacency, cfg, mask)
            null.append(ncut(g.adjacency, lab))
        arr = np.asarray(null)
        mean = float(arr.mean())
        std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
        z = (value - mean) / std if std > 0 else float("nan")
        cb = Clusterability(value, arr, mean, std, float(z), permutation_pvalue(value, arr, "less"), cfg.k)
        extra["clusterability"] = cb.to_dict()
    if step:
        step("done", 1 + cfg.shuffles, 1 + cfg.shuffles)
    return graph.split(labels), value, "global", extra


def _spectral_correlation(target: LoadedModel, sites, cfg: ClusterConfig):

    com, extra = _reference_or_images(target, sites, cfg, "a correlation graph")
    if com is None:  # zoo model: one graph over all chosen layers, from the training images
        acts = _image_train_activations(target, sites)
        names = [s.name for s in sites]
        joint = comoments_of({"all": torch.cat([acts[n] for n in names], dim=1)})["all"]
        adj = correlation_graph(joint["corr"])
        _check_k(cfg.k, _live_count(adj, None), adj.shape[0], f"the correlation graph of {len(sites)} layers")
        lab = _spectral(adj, cfg)
        widths = np.cumsum([0] + [acts[n].shape[1] for n in names])
        labels = {n: lab[widths[i]:widths[i + 1]] for i, n in enumerate(names)}
        extra["correlation"] = "pearson, all chosen layers together, training images"
        return labels, ncut(adj, lab), "global", extra
    labels, per_site = {}, {}
    for s in sites:
        adj = correlation_graph(com[s.name]["corr"])
        _check_k(cfg.k, _live_count(adj, None), adj.shape[0], f"site {s.name}")
        labels[s.name] = _spectral(adj, cfg)
        per_site[s.name] = ncut(adj, labels[s.name])
    extra["ncut_per_site"] = per_site
    extra["correlation"] = "pearson, per layer (co-moments are recorded per site), reported n-cut = mean over layers"
    return labels, float(np.mean(list(per_site.values()))), "per_layer", extra


# ------------------------------------------------------------------------------------------------- alignment


ALIGNMENT_FILE = layout.ALIGNMENT


@dataclass(frozen=True)
class AlignConfig:
    """Settings of :func:`align`: ``n_perm`` random same-size sets per task and layer; ``frac``: fraction of
    neurons per task (``None``: the task map's selection fraction); ``alpha``: the level a layer's p-value is
    called significant at; ``seed`` of the random sets."""

    n_perm: int = 1000
    frac: float | None = None
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("n_perm", 1), ("seed", 0)):
            v = getattr(self, name)
            try:
                iv = None if isinstance(v, bool) else operator.index(v)
            except TypeError:
                iv = None
            if iv is None or iv < minimum:
                raise NeurospecError(f"{name} must be an integer >= {minimum}, got {v!r}")
            object.__setattr__(self, name, iv)
        for name, high_open in (("frac", False), ("alpha", True)):
            v = getattr(self, name)
            if v is None and name == "frac":
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1
            if not ok or (high_open and v == 1):
                interval = "(0, 1)" if high_open else "(0, 1]"
                hint = " (or None: the task map's selection fraction)" if name == "frac" else ""
                raise NeurospecError(f"{name} must be a number in {interval}{hint}, got {v!r}")
            object.__setattr__(self, name, float(v))

    def to_dict(self) -> dict:
        return {"type": "AlignConfig", "version": 1, **asdict(self)}


def align(cluster_dir: str | Path, taskmap_dir: str | Path, cfg: AlignConfig | None = None, *, n_perm: int = UNSET,
          frac: float | None = UNSET, alpha: float = UNSET, seed: int = UNSET) -> dict:
    """Are each task's specific neurons concentrated in fewer clusters than chance, layer by layer?

    ``cfg``: the settings (:class:`AlignConfig`); or give them as keywords (``n_perm``, ``frac``, ``alpha``,
    ``seed``), which make the config, not both.
    Task neurons: the task map's selection (:func:`neurospec.experiments.taskmap.task_masks`; ``frac`` overrides
    its fraction). Per task and site with at least two clustered task neurons: the number of clusters hit and the
    entropy of the hit distribution against ``n_perm`` random same-size sets of the site's clustered neurons
    (:func:`neurospec.analyze.importance.alignment`); one-sided p-values; Fisher's combination over layers (of the
    entropy p-values). Writes ``alignment.json`` (with the config) in ``cluster_dir`` and returns it.
    """
    cfg = config_from(AlignConfig, cfg, {"n_perm": n_perm, "frac": frac, "alpha": alpha, "seed": seed}, "align")
    n_perm, frac, alpha, seed = cfg.n_perm, cfg.frac, cfg.alpha, cfg.seed
    cl = load_clustering(cluster_dir)
    masks, tm = task_masks(taskmap_dir, frac)
    if tm["model"]["fingerprint"] != cl.fingerprint:
        raise RunStoreError(
            f"{cluster_dir} and {taskmap_dir} were made from different models (fingerprints {cl.fingerprint} and "
            f"{tm['model']['fingerprint']}): cluster the task map's model, or make the task map on the clustered one"
        )
    rows, per_task = [], {}
    for task, by_site in masks.items():
        pvals, significant = [], []
        for site, lab in cl.labels.items():
            if site not in by_site:
                continue
            mask = by_site[site].numpy().astype(bool)
            n_task = int((mask & (lab >= 0)).sum())
            row: dict[str, Any] = {"task": task, "site": site, "layer": parse_site_name(site)[0],
                                   "n_task": n_task, "n_selected": int(mask.sum())}
            if n_task >= 2:
                a = alignment(mask, lab, n_perm=n_perm, seed=seed).to_dict()
                row.update(a)
                row["entropy_deficit"] = a["null_entropy_mean"] - a["entropy"]
                pvals.append(a["pvalue_entropy"])
                if a["pvalue_entropy"] <= alpha:
                    significant.append(row["layer"])
            rows.append(row)
        comb = fisher_combine(pvals) if pvals else None
        per_task[task] = {
            "n_layers_tested": len(pvals),
            "layers_significant": significant,
            "fisher": None if comb is None else asdict(comb),
        }
    result = {
        "cluster_dir": str(cluster_dir),
        "taskmap": str(taskmap_dir),
        "method": cl.method,
        "graph": cl.graph,
        "tasks": list(masks),
        "frac": frac if frac is not None else tm["config"]["select_frac"],
        "n_perm": n_perm,
        "alpha": alpha,
        "statistic": "entropy of the task neurons' distribution over clusters (lower = more concentrated); "
                     "entropy_deficit = null mean entropy - entropy (nats; > 0 = more concentrated than chance)",
        "per_task": per_task,
        "rows": rows,
        "config": cfg.to_dict(),
    }
    atomic_write_json(Path(cluster_dir) / ALIGNMENT_FILE, result)
    return result
# the implementations of the clusterers of neurospec.cluster.METHODS (every one also reads layers and seed)
register_clusterer(Clusterer("moefication", "params", lambda t, s, c, step: _moe_params(t, s, c),
                             ("experts", "projection")))
register_clusterer(Clusterer("moefication", "coactivation", lambda t, s, c, step: _moe_coactivation(t, s, c),
                             ("experts", "coactivation", "threshold", "reference", "tasks")))
register_clusterer(Clusterer("spectral", "weights", _spectral_weights,
                             ("k", "projection", "top_k", "shuffles", "n_init", "reference", "tasks")))
register_clusterer(Clusterer("spectral", "correlation", lambda t, s, c, step: _spectral_correlation(t, s, c),
                             ("k", "n_init", "reference", "tasks")))
