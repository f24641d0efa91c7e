"""Clusters of neurons: MoEfication experts, spectral clusters of weight and correlation graphs, baselines.

Modules: :mod:`~neurospec.cluster.kmeans` (balanced k-means), :mod:`~neurospec.cluster.moefication` (experts,
routing), :mod:`~neurospec.cluster.spectral` (graphs, spectral clustering, n-cut), :mod:`~neurospec.cluster.baselines`
(clusterability against shuffled weights) and :mod:`~neurospec.cluster.result` (a clustering on disk).

:data:`METHODS` is the registry of clustering methods and the graphs each can read; the command line, the pipelines
(:mod:`neurospec.experiments.clusters`) and the tests read their choices from it. Each (method, graph) pair is a
*clusterer* (:data:`CLUSTERERS`): its implementation ``run(target, sites, cfg, step) -> (labels, ncut, scope,
extra)`` and the fields of the clustering config it reads; the pipeline dispatches through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from neurospec.errors import NeurospecError


@dataclass(frozen=True)
class ClusterMethod:
    """A clustering method: its name, the graphs (or feature sources) it reads, the default one, and a summary."""

    name: str
    graphs: tuple[str, ...]
    default_graph: str
    description: str


METHODS: dict[str, ClusterMethod] = {}


def register_method(method: ClusterMethod, *, replace: bool = False) -> ClusterMethod:
    """Add a clustering method; a taken name is an error unless ``replace``."""
    if method.name in METHODS and not replace:
        raise ValueError(f"clustering method {method.name!r} is already registered")
    if method.default_graph not in method.graphs:
        raise ValueError(f"default graph {method.default_graph!r} is not one of {method.graphs}")
    METHODS[method.name] = method
    return method


register_method(ClusterMethod(
    "moefication", ("params", "coactivation"), "params",
    "equal-size experts per MLP layer: balanced k-means of the L2-normalised input-projection rows (params), or a "
    "balanced partition of the recorded co-activation graph (coactivation)",
))
register_method(ClusterMethod(
    "spectral", ("weights", "correlation"), "weights",
    "normalised spectral clustering of the weight graph through the residual stream (weights, all chosen layers at "
    "once) or of rho^2 activation correlations (correlation)",
))


@dataclass(frozen=True)
class Clusterer:
    """One way to cluster: ``method`` by ``graph``, the config fields it reads (``options``; the others must stay
    unset) and its implementation ``run(target, sites, cfg, step) -> (labels, ncut, scope, extra)``."""

    method: str
    graph: str
    run: Callable = field(repr=False)
    options: tuple[str, ...] = ()


CLUSTERERS: dict[tuple[str, str], Clusterer] = {}


def register_clusterer(clusterer: Clusterer, *, replace: bool = False) -> Clusterer:
    """Add the implementation of a (method, graph) pair of :data:`METHODS`; a taken pair is an error unless
    ``replace``."""
    key = (clusterer.method, clusterer.graph)
    if clusterer.method not in METHODS or clusterer.graph not in METHODS[clusterer.method].graphs:
        raise ValueError(f"{clusterer.method} by {clusterer.graph} is not a registered method and graph")
    if key in CLUSTERERS and not replace:
        raise ValueError(f"clusterer {clusterer.method} by {clusterer.graph} is already registered")
    CLUSTERERS[key] = clusterer
    return clusterer


def get_clusterer(method: str, graph: str) -> Clusterer:
    """The clusterer of ``method`` by ``graph``. The implementations register themselves where they are defined:
    the clustering pipeline :mod:`neurospec.experiments.clusters`, which is the module that calls this."""
    try:
        return CLUSTERERS[(method, graph)]
    except KeyError:
        known = ", ".join(f"{m} by {g}" for m, g in CLUSTERERS)
        raise NeurospecError(f"no clusterer {method} by {graph}; known: {known}") from None
