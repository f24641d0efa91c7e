"""Spectral clustering of neuron graphs, the normalised cut, and the two graphs of METHODS.md section 3.

**Clustering** (:func:`spectral_clustering`): the graph is a symmetric non-negative adjacency ``A`` (dense array,
tensor or ``scipy.sparse``). Nodes of zero degree, and nodes outside an optional ``mask``, are excluded and get label
``-1`` (removing masked nodes can isolate others; those are excluded too). On the rest, the ``k`` leading
eigenvectors of the symmetric-normalised adjacency ``D^-1/2 A D^-1/2`` (equivalently the ``k`` smallest of the
normalised Laplacian) are found with ARPACK (:func:`scipy.sparse.linalg.eigsh`; dense ``eigh`` below
``dense_below`` nodes), each node's row is normalised to unit length (Ng, Jordan and Weiss), and the rows are
clustered by k-means (scikit-learn's, or balanced k-means with ``balanced=True``). Seeded and deterministic.

**n-cut** (:func:`ncut`): ``sum_c cut(c) / vol(c)`` over the clusters ``c`` of the nodes whose label is not ``-1``,
computed on the graph restricted to those nodes: ``cut(c)`` = total weight of edges from ``c`` to other clusters,
``vol(c)`` = total degree of ``c``'s nodes. A cluster with zero volume contributes 0.

**Graphs.** :func:`correlation_graph`: ``rho^2`` with a zero diagonal and NaN set to 0. :func:`weight_graph`:

* transformers: nodes are the MLP neurons of the chosen layers, in layer order. Neuron ``i`` of layer ``a`` and
  neuron ``j`` of the next chosen layer ``b`` are joined with weight ``|W_in(b)[j, :] . W_out(a)[:, i]|``, where
  ``W_out(a)`` is layer ``a``'s MLP output projection (``[d_model, width]``, column ``i`` is what neuron ``i`` writes
  into the residual stream) and ``W_in(b)`` is layer ``b``'s MLP input projection (``[width, d_model]``, row ``j``
  is what neuron ``j`` reads). This is *neurospec's definition* of the weight between two MLP neurons through the
  residual stream: it follows the direct path only and leaves out the normalisation in between (its scale and the
  per-token RMS) and the attention layers. ``projection``: ``"up"`` (default; the only projection of a non-gated
  MLP), ``"gate"``, or ``"max"`` (the larger of the two weights, gated MLPs only).
* plain MLP stacks (a module without a transformers ``config`` whose ``nn.Linear`` layers chain, e.g.
  ``nn.Sequential``): nodes are the hidden units (the outputs of every linear layer but the last); hidden layer
  ``h`` is named ``layers.h.mlp``; unit ``i`` of layer ``h`` and unit ``j`` of layer ``h + 1`` are joined with
  ``|W_{h+1}[j, i]|``. Input features and output logits are not nodes.

Only consecutive (chosen) layers are joined, so the adjacency is block-tridiagonal and stored sparse. A dense block
between two 1536-wide layers holds 2.4M edges; for many layers pass ``top_k``: each node keeps only its ``top_k``
strongest edges to each neighbouring layer (an edge survives if either end keeps it), which bounds the graph at about
``2 * top_k`` edges per node and neighbouring layer. ``top_k=None`` (default) keeps every edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from neurospec.cluster.embedding import as_adjacency, degrees, restrict, spectral_embedding
from neurospec.cluster.kmeans import BalancedKMeans
from neurospec.cluster.moefication import mlp_input_projections, model_and_sites, resolve_site
from neurospec.models.linear import weight_out_in
from neurospec.models.sites import NeuronId, Site, get_module, site_name

GRAPH_PROJECTIONS = ("up", "gate", "max")


def spectral_clustering(
    adjacency: Any,
    n_clusters: int,
    *,
    mask: Any = None,
    n_init: int = 10,
    balanced: bool = False,
    seed: int = 0,
    dense_below: int = 3000,
) -> np.ndarray:
    """Normalised spectral clustering: labels ``[n]`` (int64, ``0 .. n_clusters - 1``; ``-1`` for excluded nodes).

    ``mask``: ``[n]`` bool, False excludes a node (e.g. dead neurons); zero-degree nodes are always excluded.
    ``balanced``: cluster the embedding with balanced k-means (equal sizes) instead of k-means.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    emb = spectral_embedding(adjacency, n_clusters, mask=mask, seed=seed, dense_below=dense_below)
    x = emb.vectors[emb.kept]
    if balanced:
        sub = BalancedKMeans(n_clusters, n_init=n_init, seed=seed).fit(x).labels_
    else:
        from sklearn.cluster import KMeans

        sub = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(x).labels_
    labels = np.full(emb.kept.shape[0], -1, dtype=np.int64)
    labels[emb.kept] = sub
    return labels


def ncut(adjacency: Any, labels: Any) -> float:
    """``sum_c cut(c) / vol(c)`` over the clusters of the nodes labelled ``>= 0`` (see the module docstring)."""
    a = as_adjacency(adjacency, check_symmetric=False)
    lab = np.asarray(labels).astype(np.int64)
    if lab.shape != (a.shape[0],):
        raise ValueError(f"labels must have shape [{a.shape[0]}], got {lab.shape}")
    keep = lab >= 0
    if not keep.any():
        return 0.0
    sub = sparse.csr_array(restrict(a, keep))
    _, lab = np.unique(lab[keep], return_inverse=True)
    k = int(lab.max()) + 1
    n = lab.shape[0]
    h = sparse.csr_array((np.ones(n), (np.arange(n), lab)), shape=(n, k))
    within = (h.T @ sub @ h).diagonal()
    vol = np.bincount(lab, weights=degrees(sub), minlength=k)
    cut = vol - within
    return float(np.sum(np.divide(cut, vol, out=np.zeros(k), where=vol > 0)))


def correlation_graph(corr: Any) -> np.ndarray:
    """The activation graph ``rho^2`` of a ``[n, n]`` correlation matrix, diagonal 0, NaN (dead neurons) -> 0."""
    if hasattr(corr, "detach"):
        corr = corr.detach().to("cpu", torch.float64).numpy()
    c = np.array(corr, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"corr must be a square [n, n] matrix, got shape {c.shape}")
    a = np.nan_to_num(c * c, nan=0.0, posinf=0.0, neginf=0.0)
    a = (a + a.T) / 2.0
    np.fill_diagonal(a, 0.0)
    return a


# ------------------------------------------------------------------------------------------------ weight graph


@dataclass(frozen=True)
class NeuronGraph:
    """A graph over the neurons of several sites: node ``offsets[s] + i`` is neuron ``i`` of ``sites[s]``."""

    adjacency: sparse.csr_array
    sites: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths)]).astype(np.int64)

    @property
    def n_nodes(self) -> int:
        return int(sum(self.widths))

    def neuron(self, node: int) -> NeuronId:
        """The neuron id of a node index."""
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"node {node} out of range for a graph of {self.n_nodes} nodes")
        s = int(np.searchsorted(self.offsets, node, side="right")) - 1
        return NeuronId(self.sites[s], int(node - self.offsets[s]))

    def split(self, labels: Any) -> dict[str, np.ndarray]:
        """Per-node labels ``[n_nodes]`` -> ``{site: labels [width]}``."""
        lab = np.asarray(labels)
        if lab.shape != (self.n_nodes,):
            raise ValueError(f"labels must have shape [{self.n_nodes}], got {lab.shape}")
        off = self.offsets
        return {s: lab[off[i]:off[i + 1]] for i, s in enumerate(self.sites)}


@dataclass(frozen=True)
class WeightChain:
    """The weight matrices a weight graph is built from, kept apart so that baselines can shuffle each one.

    ``kind == "residual"`` (transformers): ``outs[i]`` is ``W_out`` of the i-th chosen layer (``[d_model, width]``;
    ``None`` for the last), ``ins[i]`` maps projection name to ``W_in`` (``[width, d_model]``; empty for the first).
    ``kind == "plain"``: ``outs`` is empty and ``ins[i + 1]["w"]`` is the ``[width_{i+1}, width_i]`` matrix joining
    hidden layers ``i`` and ``i + 1``.
    """

    kind: str
    sites: tuple[str, ...]
    widths: tuple[int, ...]
    outs: tuple[torch.Tensor | None, ...]
    ins: tuple[dict[str, torch.Tensor], ...]
    projection: str

    @classmethod
    def from_model(
        cls,
        model: Any,
        sites: Sequence[Site | str] | None = None,
        *,
        layers: Sequence[int] | None = None,
        projection: str = "up",
    ) -> WeightChain:
        """Collect the matrices of :func:`weight_graph` (same arguments)."""
        if projection not in GRAPH_PROJECTIONS:
            raise ValueError(f"projection must be one of {GRAPH_PROJECTIONS}, got {projection!r}")
        if sites is not None and layers is not None:
            raise ValueError("pass either sites or layers, not both")
        if isinstance(model, nn.Module) and getattr(model, "config", None) is None:
            if sites is not None:
                raise ValueError("a plain MLP has no sites: choose its hidden layers with `layers`")
            if projection != "up":
                raise ValueError(f"projection {projection!r} applies to gated transformer MLPs, not a plain MLP")
            return cls._plain(model, layers)
        return cls._residual(model, sites, layers, projection)

    @classmethod
    def _plain(cls, model: nn.Module, layers: Sequence[int] | None) -> WeightChain:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(linears) < 3:
            raise ValueError(
                f"{type(model).__name__} has {len(linears)} linear layers; a weight graph needs at least 3 "
                "(two hidden layers)"
            )
        for h, (m1, m2) in enumerate(zip(linears, linears[1:], strict=False)):
            if m1.out_features != m2.in_features:
                raise ValueError(
                    f"linear layers {h} and {h + 1} do not chain ({m1.out_features} outputs feed "
                    f"{m2.in_features} inputs): only plain stacks of linear layers are supported"
                )
        n_hidden = len(linears) - 1
        chosen = list(range(n_hidden)) if layers is None else sorted(set(int(h) for h in layers))
        if not chosen or chosen[0] < 0 or chosen[-1] >= n_hidden:
            raise ValueError(f"hidden layers must be in 0..{n_hidden - 1}, got {list(layers or [])}")
        if len(chosen) < 2 or any(b != a + 1 for a, b in zip(chosen, chosen[1:], strict=False)):
            raise ValueError(f"choose at least two consecutive hidden layers of a plain MLP, got {chosen}")
        ins = tuple({} if i == 0 else {"w": linears[h].weight.detach()} for i, h in enumerate(chosen))
        return cls(
            "plain",
            tuple(site_name(h, "mlp") for h in chosen),
            tuple(linears[h].out_features for h in chosen),
            (),
            ins,
            "up",
        )

    @classmethod
    def _residual(
        cls, model: Any, sites: Sequence[Site | str] | None, layers: Sequence[int] | None, projection: str
    ) -> WeightChain:
        module, all_sites = model_and_sites(model)
        if layers is not None:
            sites = [site_name(int(layer), "mlp") for layer in layers]
        chosen = all_sites.of_kind("mlp") if sites is None else tuple(resolve_site(all_sites, s) for s in sites)
        chosen = tuple(sorted(set(chosen), key=lambda s: s.layer))
        if len(chosen) < 2:
            raise ValueError(f"a weight graph needs at least two MLP layers, got {[s.name for s in chosen]}")
        wanted = ("gate", "up") if projection == "max" else (projection,)
        outs: list[torch.Tensor | None] = []
        ins: list[dict[str, torch.Tensor]] = []
        for i, s in enumerate(chosen):
            last = i == len(chosen) - 1
            outs.append(None if last else weight_out_in(get_module(module, s.module)).detach())
            if i == 0:
                ins.append({})
                continue
            proj = mlp_input_projections(module, s)
            missing = [p for p in wanted if p not in proj]
            if missing:
                raise ValueError(f"site {s.name} is a non-gated MLP: projection {projection!r} needs a gate; use 'up'")
            ins.append({p: proj[p] for p in wanted})
        return cls("residual", tuple(s.name for s in chosen), tuple(s.width for s in chosen), tuple(outs),
                   tuple(ins), projection)

    def matrices(self) -> list[torch.Tensor]:
        """Every weight matrix the graph reads (the ones a shuffled baseline permutes)."""
        mats = [w for w in self.outs if w is not None]
        for d in self.ins:
            mats.extend(d.values())
        return mats

    def shuffled(self, seed: int) -> WeightChain:
        """A copy with the entries of every matrix permuted independently (seeded); shapes are kept."""
        gen = torch.Generator().manual_seed(int(seed))

        def perm(w: torch.Tensor) -> torch.Tensor:
            flat = w.reshape(-1)
            return flat[torch.randperm(flat.numel(), generator=gen)].reshape(w.shape)

        outs = tuple(None if w is None else perm(w) for w in self.outs)
        ins = tuple({p: perm(w) for p, w in d.items()} for d in self.ins)
        return WeightChain(self.kind, self.sites, self.widths, outs, ins, self.projection)

    def block(self, i: int) -> torch.Tensor:
        """``[width_{i+1}, width_i]`` absolute weights between chosen layers ``i`` and ``i + 1`` (float32)."""
        nxt = self.ins[i + 1]
        if self.kind == "plain":
            return nxt["w"].float().abs()
        out = self.outs[i]
        assert out is not None
        blocks = [(w.float() @ out.float()).abs() for w in nxt.values()]
        return blocks[0] if len(blocks) == 1 else torch.maximum(blocks[0], blocks[1])

    def graph(self, top_k: int | None = None) -> NeuronGraph:
        """The sparse symmetric weight graph (see the module docstring for ``top_k``)."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        off = np.concatenate([[0], np.cumsum(self.widths)])
        rows, cols, vals = [], [], []
        for i in range(len(self.widths) - 1):
            b = self.block(i)
            keep = _top_edges(b, top_k)
            j, k = keep.nonzero(as_tuple=True)
            v = b[j, k].double().numpy()
            nz = v > 0
            r = k.numpy()[nz] + off[i]  # node of layer i
            c = j.numpy()[nz] + off[i + 1]  # node of layer i + 1
            rows += [r, c]
            cols += [c, r]
            vals += [v[nz], v[nz]]
        n = int(off[-1])
        adj = sparse.coo_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        ).tocsr()
        return NeuronGraph(adj, self.sites, self.widths)


def _top_edges(b: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Bool mask of the entries kept: all, or those among the ``top_k`` largest of their row or of their column."""
    if top_k is None or (top_k >= b.shape[0] and top_k >= b.shape[1]):
        return torch.ones_like(b, dtype=torch.bool)
    keep = torch.zeros_like(b, dtype=torch.bool)
    keep.scatter_(1, b.topk(min(top_k, b.shape[1]), dim=1).indices, True)
    keep.scatter_(0, b.topk(min(top_k, b.shape[0]), dim=0).indices, True)
    return keep


def weight_graph(
    model: Any,
    sites: Sequence[Site | str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    projection: str = "up",
    top_k: int | None = None,
) -> NeuronGraph:
    """The weight graph over MLP neurons (see the module docstring for the definition).

    ``model``: a transformers model, a ``LoadedModel``, or a plain MLP stack (``nn.Sequential`` of linear layers).
    ``sites`` (MLP sites or names) or ``layers`` (layer indices; hidden-layer indices for a plain MLP) choose the
    layers; default all. Cost: one ``[width, d_model] @ [d_model, width]`` product per pair of layers; with
    ``top_k=None`` about ``2 * width^2`` stored edges per pair (about 1.6 GB for all 30 layers of a 1536-wide model:
    use ``top_k`` there).
    """
    return WeightChain.from_model(model, sites, layers=layers, projection=projection).graph(top_k)
