"""A graph's spectral embedding: the leading eigenvectors of its symmetric-normalised adjacency.

The graph is a symmetric non-negative adjacency ``A`` (dense array, tensor or ``scipy.sparse``); see
:mod:`neurospec.cluster.spectral` for the clustering built on it and for the neuron graphs. Both spectral clustering and
MoEfication by co-activation use :func:`spectral_embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse

# --------------------------------------------------------------------------------------------------- adjacency


def as_adjacency(adjacency: Any, *, check_symmetric: bool = True) -> sparse.csr_array | np.ndarray:
    """A float64 dense array or CSR matrix, checked to be square, finite, non-negative and symmetric."""
    if hasattr(adjacency, "detach"):
        adjacency = adjacency.detach().to("cpu", torch.float64).numpy()
    if sparse.issparse(adjacency):
        a = sparse.csr_array(adjacency, dtype=np.float64)
        values = a.data
    else:
        a = np.asarray(adjacency, dtype=np.float64)
        values = a
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"the adjacency must be a square [n, n] matrix, got shape {a.shape}")
    if not np.isfinite(values).all():
        raise ValueError("the adjacency contains NaN or infinite values (correlation_graph sets NaN to 0)")
    if values.size and values.min() < 0:
        raise ValueError("the adjacency must be non-negative (take |w| or rho^2)")
    if check_symmetric:
        diff = abs(a - a.T)
        worst = diff.max() if diff.size else 0.0
        scale = values.max() if values.size else 0.0
        if worst > 1e-8 * max(1.0, scale):
            raise ValueError(f"the adjacency must be symmetric (largest |A - A.T| = {worst:.3g})")
    return a


def degrees(a: sparse.csr_array | np.ndarray) -> np.ndarray:
    return np.asarray(a.sum(axis=1)).ravel()


def restrict(a: sparse.csr_array | np.ndarray, keep: np.ndarray) -> sparse.csr_array | np.ndarray:
    idx = np.flatnonzero(keep)
    if sparse.issparse(a):
        return a[idx][:, idx]
    return a[np.ix_(idx, idx)]


@dataclass(frozen=True)
class SpectralEmbedding:
    """``vectors``: ``[n, k]`` rows normalised to unit length (zero rows for excluded nodes); ``kept``: ``[n]`` bool;
    ``eigenvalues``: ``[k]`` of ``D^-1/2 A D^-1/2`` on the kept nodes, in decreasing order."""

    vectors: np.ndarray
    kept: np.ndarray
    eigenvalues: np.ndarray


def spectral_embedding(
    adjacency: Any, n_components: int, *, mask: Any = None, seed: int = 0, dense_below: int = 3000
) -> SpectralEmbedding:
    """The normalised spectral embedding of the graph's non-excluded nodes (see the module docstring).

    Cost: ARPACK on the sparse normalised adjacency (a few hundred sparse products); dense ``eigh`` (``O(n^3)``)
    when fewer than ``dense_below`` nodes are kept.
    """
    a = as_adjacency(adjacency)
    n = a.shape[0]
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    if keep.shape != (n,):
        raise ValueError(f"mask must have shape [{n}], got {keep.shape}")
    # Excluding nodes can isolate their neighbours: repeat until every kept node has an edge to a kept node.
    while True:
        deg = degrees(restrict(a, keep))
        isolated = deg <= 0
        if not isolated.any():
            break
        keep[np.flatnonzero(keep)[isolated]] = False
    n_kept = int(keep.sum())
    if n_kept <= n_components:
        raise ValueError(
            f"only {n_kept} nodes have edges (after excluding dead or masked ones): too few for {n_components} "
            "clusters"
        )
    sub = restrict(a, keep)
    inv_sqrt = 1.0 / np.sqrt(deg)
    if n_kept < dense_below:
        from scipy.linalg import eigh

        dense = sub.toarray() if sparse.issparse(sub) else sub
        m = inv_sqrt[:, None] * dense * inv_sqrt[None, :]
        vals, vecs = eigh(m, subset_by_index=[n_kept - n_components, n_kept - 1])
    else:
        from scipy.sparse.linalg import eigsh

        d = sparse.diags_array(inv_sqrt)
        m = (d @ sparse.csr_array(sub) @ d).tocsr()
        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, size=n_kept)
        ncv = min(n_kept, max(2 * n_components + 1, n_components + 32))
        vals, vecs = eigsh(m, k=n_components, which="LA", v0=v0, ncv=ncv)
    order = np.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / np.where(norms > 0, norms, 1.0)
    full = np.zeros((n, n_components))
    full[keep] = vecs
    return SpectralEmbedding(full, keep, vals)
