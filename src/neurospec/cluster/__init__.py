"""Clusters of neurons: MoEfication experts, spectral clusters of weight and correlation graphs, baselines.

Modules: :mod:`~neurospec.cluster.kmeans` (balanced k-means), :mod:`~neurospec.cluster.moefication` (experts,
routing), :mod:`~neurospec.cluster.spectral` (graphs, spectral clustering, n-cut), :mod:`~neurospec.cluster.baselines`
(clusterability against shuffled weights) and :mod:`~neurospec.cluster.result` (a clustering on disk).

:data:`METHODS` is the registry of clustering methods and the graphs each can read; the command line, the pipelines
(:mod:`neurospec.experiments.clusters`) and the tests read their choices from it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
