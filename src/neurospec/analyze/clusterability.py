"""Clusterability: does a trained network's weight graph split better than the same weights shuffled?

METHODS.md section 3: the n-cut of the network's spectral partition is compared with the n-cuts of networks whose
layers keep their weights but in a random order. The shuffle permutes the entries of every weight matrix the weight
graph reads, independently and seeded (so each matrix keeps its multiset of values, its shape and its scale); then the
shuffled graph is built and partitioned with the same settings. A trained network is *clusterable* when its n-cut is
lower than the shuffled ones: :func:`clusterability` reports their mean and standard deviation, the z-score
``(ncut - mean) / std`` (negative = more clusterable; sample std) and the one-sided empirical p-value
``(r + 1) / (n + 1)``, ``r`` = number of shuffles whose n-cut is at most the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurospec.analyze.importance import permutation_pvalue
from neurospec.cluster.baselines import shuffle_seeds
from neurospec.cluster.spectral import WeightChain, ncut, spectral_clustering
from neurospec.models.sites import Site


@dataclass(frozen=True)
class Clusterability:
    """The real n-cut against ``len(null)`` shuffled ones (see the module docstring)."""

    ncut: float
    null: np.ndarray
    mean: float
    std: float
    z: float
    pvalue: float
    n_clusters: int

    def to_dict(self) -> dict:
        return {
            "ncut": self.ncut,
            "null": [float(v) for v in self.null],
            "mean": self.mean,
            "std": self.std,
            "z": self.z,
            "pvalue": self.pvalue,
            "n_clusters": self.n_clusters,
        }


def clusterability(
    model: Any,
    n_clusters: int = 16,
    *,
    sites: Sequence[Site | str] | None = None,
    layers: Sequence[int] | None = None,
    projection: str = "up",
    top_k: int | None = None,
    n_shuffles: int = 10,
    mask: Any = None,
    n_init: int = 10,
    seed: int = 0,
) -> Clusterability:
    """Spectral n-cut of the weight graph of ``model`` against ``n_shuffles`` shuffled copies.

    ``sites``/``layers``/``projection``/``top_k`` are those of :func:`~neurospec.cluster.spectral.weight_graph`;
    ``mask`` (``[n_nodes]`` bool) excludes nodes, e.g. dead neurons, from every partition. Cost: ``1 + n_shuffles``
    weight graphs and spectral clusterings.
    """
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    chain = WeightChain.from_model(model, sites, layers=layers, projection=projection)
    observed = _partition_ncut(chain, n_clusters, top_k, mask, n_init, seed)
    null = np.array([
        _partition_ncut(chain.shuffled(s), n_clusters, top_k, mask, n_init, seed)
        for s in shuffle_seeds(seed, n_shuffles)
    ])
    mean = float(null.mean())
    std = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    z = (observed - mean) / std if std > 0 else float("nan")
    p = permutation_pvalue(observed, null, alternative="less")
    return Clusterability(observed, null, mean, std, float(z), p, n_clusters)


def _partition_ncut(chain: WeightChain, k: int, top_k: int | None, mask: Any, n_init: int, seed: int) -> float:
    graph = chain.graph(top_k)
    labels = spectral_clustering(graph.adjacency, k, mask=mask, n_init=n_init, seed=seed)
    return ncut(graph.adjacency, labels)
