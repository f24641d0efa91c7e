"""Are clusters of neurons important, coherent, aligned with a task? Tests against random same-size sets.

Everything here is model-agnostic statistics over neuron indices; the caller brings the numbers (an ablation metric,
a correlation matrix, a selectivity table, a task's neurons) and the cluster labels (``[width]`` int, ``-1`` =
excluded, as returned by :mod:`neurospec.cluster`). Definitions:

* **p-value** (:func:`permutation_pvalue`): ``(r + 1) / (n + 1)`` with ``r`` the number of the ``n`` null samples at
  least as extreme as the observed value (exact comparisons; ties count as extreme). Never 0.
* **Fisher's method** (:func:`fisher_combine`): ``X = -2 sum ln p_i`` is chi-square with ``2k`` degrees of freedom
  under the joint null.
* **Cluster importance** (:func:`cluster_importance`, METHODS.md section 3): for every cluster intersected with one
  layer and of size ``>= min_size``, the caller's metric change when those neurons are ablated, against the same
  metric for ``n_random`` random sets of the same size drawn from the same layer's clustered neurons (label >= 0;
  dead, excluded neurons would make an easy null).
* **Correlation coherence** (:func:`coherence_correlation`): a cluster's mean ``|rho_ij|`` over its pairs ``i != j``
  (NaN counted as 0), against random same-size sets: do its neurons respond to the same inputs?
* **Task coherence** (:func:`coherence_task`): with a non-negative selectivity table ``[neurons, tasks]``, a
  cluster's share of its summed selectivity that goes to its top task, ``max_t S_t / sum_t S_t`` with
  ``S_t = sum_{i in cluster} sel[i, t]`` (``1 / n_tasks`` when the cluster has no selectivity at all), against random
  same-size sets: is the cluster about one task?
* **Alignment** (:func:`alignment`): are a task's neurons concentrated in fewer clusters than chance? Two statistics
  of the hit distribution ``m_c`` (task neurons in cluster ``c``): the number of distinct clusters hit and the
  entropy ``-sum_c p_c ln p_c`` with ``p_c = m_c / m`` (lower = more concentrated). Null: which neurons are task
  neurons is permuted (random same-size sets of the clustered neurons); one-sided p-values (lower tail).

Random sets are uniform without replacement; everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALTERNATIVES = ("greater", "less", "two-sided")
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------------- p-values


def permutation_pvalue(observed: float, null_samples: Any, alternative: str = "greater") -> float:
    """``(r + 1) / (n + 1)``; ``r`` counts null samples ``>= observed`` (``"greater"``), ``<= observed``
    (``"less"``) or at least as far from the null mean as the observed value (``"two-sided"``)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    null = np.asarray(null_samples, dtype=np.float64).ravel()
    if null.size == 0:
        raise ValueError("need at least one null sample")
    obs = float(observed)
    if alternative == "greater":
        r = int(np.sum(null >= obs))
    elif alternative == "less":
        r = int(np.sum(null <= obs))
    else:
        center = null.mean()
        r = int(np.sum(np.abs(null - center) >= abs(obs - center)))
    return (r + 1) / (null.size + 1)


@dataclass(frozen=True)
class Combined:
    """Fisher's combination: ``statistic = -2 sum ln p``, chi-square with ``dof = 2k``."""

    statistic: float
    pvalue: float
    dof: int


def fisher_combine(pvalues: Any) -> Combined:
    """Combine independent p-values with Fisher's method (matches ``scipy.stats.combine_pvalues``)."""
    from scipy.stats import chi2

    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("need at least one p-value to combine")
    if np.any((p <= 0) | (p > 1)) or not np.isfinite(p).all():
        raise ValueError("p-values must be in (0, 1]")
    stat = float(-2.0 * np.log(p).sum())
    dof = 2 * p.size
    return Combined(stat, float(chi2.sf(stat, dof)), dof)


# ----------------------------------------------------------------------------------------------- random sets


def random_subsets(pool: np.ndarray, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, size]`` rows of distinct elements of ``pool``, each row a uniform random subset."""
    pool = np.asarray(pool)
    if not 0 < size <= pool.size:
        raise ValueError(f"cannot draw sets of {size} from a pool of {pool.size}")
    out = np.empty((n, size), dtype=pool.dtype)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, pool.size))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        keys = rng.random((m, pool.size))
        idx = keys.argsort(axis=1)[:, :size] if size == pool.size else np.argpartition(keys, size - 1, axis=1)[:, :size]
        out[start:start + m] = pool[idx]
    return out


@dataclass(frozen=True)
class ClusterTest:
    """One cluster against random same-size sets: its statistic (``effect``), the null's mean and std, a p-value.

    ``top_task``: for task coherence, the task with the largest summed selectivity; otherwise ``None``.
    """

    site: str
    cluster: int
    size: int
    effect: float
    null_mean: float
    null_std: float
    pvalue: float
    top_task: int | None = None


@dataclass(frozen=True)
class ClusterTests:
    """Per-cluster tests and their Fisher combination (``None`` when no cluster was large enough)."""

    tests: tuple[ClusterTest, ...]
    combined: Combined | None

    def to_rows(self) -> list[dict]:
        return [asdict(t) for t in self.tests]


def _labels(labels: Any, n: int | None = None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or (n is not None and lab.shape[0] != n):
        raise ValueError(f"labels must have shape [{n if n is not None else 'width'}], got {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        if not np.all(lab == np.round(lab)):
            raise ValueError("labels must be integers (-1 = excluded)")
    return lab.astype(np.int64)


def _clusters(lab: np.ndarray, min_size: int) -> list[tuple[int, np.ndarray]]:
    return [(int(c), np.flatnonzero(lab == c)) for c in np.unique(lab[lab >= 0]) if np.sum(lab == c) >= min_size]


def _finish(tests: list[ClusterTest]) -> ClusterTests:
    combined = fisher_combine([t.pvalue for t in tests]) if tests else None
    return ClusterTests(tuple(tests), combined)


def _test(site, cluster, idx, effect, null, alternative, top_task=None) -> ClusterTest:
    null = np.asarray(null, dtype=np.float64)
    std = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    return ClusterTest(site, cluster, int(idx.size), float(effect), float(null.mean()), std,
                       permutation_pvalue(effect, null, alternative), top_task)


# ------------------------------------------------------------------------------------------------ importance


def cluster_importance(
    clusters_by_layer: Mapping[str, Any],
    metric_fn: Callable[[str, np.ndarray], float],
    *,
    n_random: int = 19,
    min_size: int = 2,
    alternative: str = "greater",
    seed: int = 0,
) -> ClusterTests:
    """Importance of each cluster of each layer against ``n_random`` random same-size sets of that layer.

    ``clusters_by_layer``: ``{site name: labels [width]}`` (e.g. ``NeuronGraph.split(labels)``; ``-1`` = excluded).
    ``metric_fn(site, indices)``: the metric change when the neurons ``indices`` (int64, sorted for clusters) of
    ``site`` are ablated, larger = more damage (e.g. accuracy before minus after); with the opposite sign pass
    ``alternative="less"``. It is called ``1 + n_random`` times per cluster. Cost: dominated by ``metric_fn``.
    """
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    rng = np.random.default_rng(seed)
    tests = []
    for site, labels in clusters_by_layer.items():
        lab = _labels(labels)
        pool = np.flatnonzero(lab >= 0)
        for c, idx in _clusters(lab, min_size):
            effect = float(metric_fn(site, idx))
            null = [float(metric_fn(site, np.sort(s))) for s in random_subsets(pool, idx.size, n_random, rng)]
            tests.append(_test(site, c, idx, effect, null, alternative))
    return _finish(tests)


# ------------------------------------------------------------------------------------------------- coherence


def _abs_corr(corr: Any) -> np.ndarray:
    if hasattr(corr, "detach"):
        corr = corr.detach().to("cpu").double().numpy()
    c = np.abs(np.nan_to_num(np.array(corr, dtype=np.float64), nan=0.0))
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"corr must be a square [n, n] matrix, got shape {c.shape}")
    np.fill_diagonal(c, 0.0)
    return c


def _mean_pair_abs(c: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Mean off-diagonal entry of ``c`` over each row of ``sets`` (``[m, s]``) -> ``[m]``."""
    m, s = sets.shape
    out = np.empty(m)
    chunk = max(1, _CHUNK_ELEMENTS // (s * s))
    for start in range(0, m, chunk):
        rows = sets[start:start + chunk]
        out[start:start + chunk] = c[rows[:, :, None], rows[:, None, :]].sum(axis=(1, 2))
    return out / (s * (s - 1))


def coherence_correlation(
    corr: Any, labels: Any, *, n_random: int = 999, min_size: int = 2, site: str = "", seed: int = 0
) -> ClusterTests:
    """Correlation coherence of each cluster: mean within-cluster ``|rho|`` against random same-size sets.

    ``corr``: ``[n, n]`` correlation matrix of the clustered neurons; ``labels``: ``[n]`` (``-1`` excluded, also
    from the random sets). One-sided (greater). Cost: ``n_random * size^2`` reads per cluster.
    """
    c = _abs_corr(corr)
    lab = _labels(labels, c.shape[0])
    pool = np.flatnonzero(lab >= 0)
    rng = np.random.default_rng(seed)
    tests = []
    for k, idx in _clusters(lab, max(2, min_size)):
        effect = _mean_pair_abs(c, idx[None, :])[0]
        null = _mean_pair_abs(c, random_subsets(pool, idx.size, n_random, rng))
        tests.append(_test(site, k, idx, effect, null, "greater"))
    return _finish(tests)


def _top_share(sel: np.ndarray, sets: np.ndarray) -> np.ndarray:
    m, s = sets.shape
    n_tasks = sel.shape[1]
    out = np.empty(m)
    chunk = max(1, _CHUNK_ELEMENTS // (s * n_tasks))
    for start in range(0, m, chunk):
        tot = sel[sets[start:start + chunk]].sum(axis=1)
        total = tot.sum(axis=1)
        share = np.divide(tot.max(axis=1), total, out=np.full(total.shape, 1.0 / n_tasks), where=total > 0)
        out[start:start + chunk] = share
    return out


def coherence_task(
    selectivity: Any, labels: Any, *, n_random: int = 999, min_size: int = 2, site: str = "", seed: int = 0
) -> ClusterTests:
    """Task coherence of each cluster: the top task's share of its summed selectivity, against random sets.

    ``selectivity``: ``[n_neurons, n_tasks]``, non-negative (e.g. a scorer's per-task score, or ``|score|``);
    ``labels``: ``[n_neurons]``. One-sided (greater); ``top_task`` is reported per cluster.
    """
    if hasattr(selectivity, "detach"):
        selectivity = selectivity.detach().to("cpu").double().numpy()
    sel = np.asarray(selectivity, dtype=np.float64)
    if sel.ndim != 2 or sel.shape[1] < 2:
        raise ValueError(f"selectivity must be [n_neurons, n_tasks] with at least 2 tasks, got shape {sel.shape}")
    if not np.isfinite(sel).all() or sel.min() < 0:
        raise ValueError("selectivity must be finite and non-negative (pass |score| for signed scores)")
    lab = _labels(labels, sel.shape[0])
    pool = np.flatnonzero(lab >= 0)
    rng = np.random.default_rng(seed)
    tests = []
    for k, idx in _clusters(lab, min_size):
        effect = _top_share(sel, idx[None, :])[0]
        top = int(np.argmax(sel[idx].sum(axis=0)))
        null = _top_share(sel, random_subsets(pool, idx.size, n_random, rng))
        tests.append(_test(site, k, idx, effect, null, "greater", top))
    return _finish(tests)


# ------------------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Alignment:
    """How concentrated a task's neurons are among clusters, against ``n_perm`` random same-size sets.

    ``n_task``: task neurons that have a cluster; ``n_excluded``: task neurons with label ``-1`` (not counted).
    """

    n_task: int
    n_excluded: int
    n_clusters_hit: int
    entropy: float
    null_clusters_hit_mean: float
    null_entropy_mean: float
    pvalue_clusters: float
    pvalue_entropy: float
    n_perm: int

    def to_dict(self) -> dict:
        return asdict(self)


def _hit_stats(lab_sets: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """``[m, s]`` cluster labels -> (distinct clusters hit ``[m]``, entropy of the hit distribution ``[m]``)."""
    m, s = lab_sets.shape
    flat = (np.arange(m)[:, None] * n_clusters + lab_sets).ravel()
    counts = np.bincount(flat, minlength=m * n_clusters).reshape(m, n_clusters)
    hit = (counts > 0).sum(axis=1)
    p = counts / s
    logp = np.log(np.where(p > 0, p, 1.0))
    return hit, -(p * logp).sum(axis=1)


def alignment(task_neurons_mask: Any, labels: Any, *, n_perm: int = 1000, seed: int = 0) -> Alignment:
    """Are the task's neurons concentrated in fewer clusters than chance? (see the module docstring)

    ``task_neurons_mask``: ``[width]`` bool; ``labels``: ``[width]`` cluster of each neuron (``-1`` = excluded).
    """
    if hasattr(task_neurons_mask, "detach"):
        task_neurons_mask = task_neurons_mask.detach().to("cpu").numpy()
    mask = np.asarray(task_neurons_mask).astype(bool)
    lab = _labels(labels, mask.shape[0])
    if mask.ndim != 1:
        raise ValueError(f"task_neurons_mask must have shape [width], got {mask.shape}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    clustered = lab >= 0
    task = np.flatnonzero(mask & clustered)
    if task.size == 0:
        raise ValueError("no task neuron has a cluster (the mask is empty or all its neurons are labelled -1)")
    k = int(lab.max()) + 1
    obs_hit, obs_ent = _hit_stats(lab[task][None, :], k)
    rng = np.random.default_rng(seed)
    null_sets = random_subsets(np.flatnonzero(clustered), task.size, n_perm, rng)
    null_hit, null_ent = _hit_stats(lab[null_sets], k)
    return Alignment(
        n_task=int(task.size),
        n_excluded=int(np.sum(mask & ~clustered)),
        n_clusters_hit=int(obs_hit[0]),
        entropy=float(obs_ent[0]),
        null_clusters_hit_mean=float(null_hit.mean()),
        null_entropy_mean=float(null_ent.mean()),
        pvalue_clusters=permutation_pvalue(obs_hit[0], null_hit, "less"),
        pvalue_entropy=permutation_pvalue(obs_ent[0], null_ent, "less"),
        n_perm=n_perm,
    )
