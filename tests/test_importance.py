"""neurospec.analyze.importance: p-values, Fisher's method, cluster importance and coherence, alignment."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from neurospec.analyze.importance import (
    alignment,
    cluster_importance,
    coherence_correlation,
    coherence_task,
    fisher_combine,
    permutation_pvalue,
    random_subsets,
)


def test_permutation_pvalue_by_brute_force():
    null = [0.1, 0.5, 0.5, 0.9, 2.0]
    for obs in (-1.0, 0.1, 0.5, 0.7, 2.0, 3.0):
        r_greater = sum(v >= obs for v in null)
        r_less = sum(v <= obs for v in null)
        assert permutation_pvalue(obs, null) == pytest.approx((r_greater + 1) / 6)
        assert permutation_pvalue(obs, null, "less") == pytest.approx((r_less + 1) / 6)
        mean = sum(null) / 5
        r_two = sum(abs(v - mean) >= abs(obs - mean) for v in null)
        assert permutation_pvalue(obs, null, "two-sided") == pytest.approx((r_two + 1) / 6)
    assert permutation_pvalue(10.0, np.zeros(19)) == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="alternative"):
        permutation_pvalue(0.0, null, "bigger")


def test_fisher_matches_scipy():
    p = [0.01, 0.2, 0.5, 0.04, 1.0]
    got = fisher_combine(p)
    ref = stats.combine_pvalues(p, method="fisher")
    assert got.statistic == pytest.approx(ref.statistic) and got.pvalue == pytest.approx(ref.pvalue)
    assert got.dof == 10
    assert got.statistic == pytest.approx(-2 * sum(math.log(v) for v in p))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fisher_combine([0.0, 0.5])


def test_random_subsets_are_uniform_distinct_and_from_the_pool():
    pool = np.array([3, 5, 8, 13, 21])
    sets = random_subsets(pool, 2, 20000, np.random.default_rng(0))
    assert sets.shape == (20000, 2)
    assert np.all(sets[:, 0] != sets[:, 1]) and np.isin(sets, pool).all()
    pairs = {tuple(sorted(p)) for p in itertools.combinations(pool.tolist(), 2)}
    counts = {p: 0 for p in pairs}
    for row in sets.tolist():
        counts[tuple(sorted(row))] += 1
    assert min(counts.values()) > 1700 and max(counts.values()) < 2300  # 2000 expected each


def test_cluster_importance_flags_the_important_cluster():
    weights = {"layers.0.mlp": np.full(40, 0.1), "layers.1.mlp": np.full(30, 0.1)}
    weights["layers.0.mlp"][10:20] = 5.0  # cluster 1 of layer 0 matters
    labels = {"layers.0.mlp": np.repeat(np.arange(4), 10), "layers.1.mlp": np.repeat([0, 1, 2], 10)}
    labels["layers.1.mlp"][0] = -1  # excluded: never drawn, never tested
    labels["layers.1.mlp"][10:19] = 2  # cluster 1 of layer 1 keeps one neuron: below min_size
    calls = []

    def metric(site, idx):
        calls.append((site, idx.copy()))
        return float(weights[site][idx].sum())

    res = cluster_importance(labels, metric, n_random=19, seed=0)
    found = {(t.site, t.cluster): t for t in res.tests}
    assert set(found) == {("layers.0.mlp", c) for c in range(4)} | {("layers.1.mlp", 0), ("layers.1.mlp", 2)}
    hit = found[("layers.0.mlp", 1)]
    assert hit.pvalue == pytest.approx(1 / 20) and hit.effect == pytest.approx(50.0) and hit.size == 10
    assert found[("layers.0.mlp", 0)].pvalue > 0.5
    assert len(calls) == 6 * 20
    for site, idx in calls:
        assert site in labels and np.all(labels[site][idx] >= 0) and len(set(idx.tolist())) == idx.size
    assert found[("layers.1.mlp", 2)].size == 19
    ref = stats.combine_pvalues([t.pvalue for t in res.tests], method="fisher")
    assert res.combined.pvalue == pytest.approx(ref.pvalue)
    assert len(res.to_rows()) == 6


def _block_corr(truth, strength, rng):
    n = truth.size
    latent = rng.normal(size=(500, truth.max() + 1))
    acts = strength * latent[:, truth] + rng.normal(size=(500, n))
    return np.corrcoef(acts.T)


def test_coherence_correlation():
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(4), 8))
    corr = _block_corr(truth, 1.0, rng)
    corr[0, :] = corr[:, 0] = np.nan  # a dead neuron
    res = coherence_correlation(torch.tensor(corr), truth, n_random=199, seed=1)
    assert len(res.tests) == 4 and all(t.pvalue == pytest.approx(1 / 200) for t in res.tests)
    c = np.nan_to_num(np.abs(corr))
    members = np.flatnonzero(truth == res.tests[0].cluster)
    brute = np.mean([c[i, j] for i in members for j in members if i != j])
    assert res.tests[0].effect == pytest.approx(brute)
    shuffled = coherence_correlation(corr, rng.permutation(truth), n_random=199, seed=1)
    assert np.mean([t.pvalue for t in shuffled.tests]) > 0.15


def test_coherence_task():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 10)
    sel = rng.random((30, 3)) * 0.2
    sel[truth == 0, 2] += 1.0  # cluster 0 is about task 2
    res = coherence_task(sel, truth, n_random=499, seed=0)
    t0 = next(t for t in res.tests if t.cluster == 0)
    tot = sel[truth == 0].sum(0)
    assert t0.top_task == 2 and t0.effect == pytest.approx(tot.max() / tot.sum())
    assert t0.pvalue < 0.01
    assert next(t for t in res.tests if t.cluster == 1).pvalue > 0.05
    with pytest.raises(ValueError, match="non-negative"):
        coherence_task(-sel, truth)


def test_alignment_planted_vs_random():
    labels = np.repeat(np.arange(16), 24)  # 16 clusters of 24 neurons
    labels[-5:] = -1
    rng = np.random.default_rng(0)
    planted = np.zeros(labels.size, dtype=bool)
    planted[rng.choice(np.flatnonzero(labels == 3), 12, replace=False)] = True
    planted[-1] = True  # a task neuron without a cluster is set aside
    res = alignment(planted, labels, n_perm=999, seed=0)
    assert res.n_task == 12 and res.n_excluded == 1 and res.n_clusters_hit == 1 and res.entropy == 0.0
    assert res.pvalue_clusters < 0.05 and res.pvalue_entropy < 0.05
    assert res.null_clusters_hit_mean > 6
    p_random = []
    for s in range(20):
        mask = np.zeros(labels.size, dtype=bool)
        mask[np.random.default_rng(100 + s).choice(labels.size - 5, 12, replace=False)] = True
        r = alignment(mask, labels, n_perm=199, seed=s)
        p_random.append(r.pvalue_clusters)
    assert np.mean(p_random) > 0.25 and np.mean(np.array(p_random) < 0.05) <= 0.2


def test_alignment_statistics_by_brute_force():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    mask = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    res = alignment(mask, labels, n_perm=10, seed=0)
    assert res.n_clusters_hit == 3
    p = np.array([2, 1, 1]) / 4
    assert res.entropy == pytest.approx(-(p * np.log(p)).sum())
    with pytest.raises(ValueError, match="no task neuron"):
        alignment(np.zeros(9, dtype=bool), labels)
