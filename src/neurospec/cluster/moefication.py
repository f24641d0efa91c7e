"""MoEfication: split each MLP's neurons into equal-size experts, and route tokens to the top-k experts.

Two ways to form experts (METHODS.md section 6), both returning labels ``[width]`` (int64, ``0 .. n_experts - 1``,
the scikit-learn convention) with every expert holding ``width // n_experts`` or ``width // n_experts + 1`` neurons:

* :func:`moefy_site` / :func:`moefy` (parameter clustering): L2-normalise the rows of the MLP input projection (one row
  per neuron) and cluster them with :class:`~neurospec.cluster.kmeans.BalancedKMeans`. ``projection`` picks the rows:
  ``"up"`` (default; for a non-gated MLP, its only input projection), ``"gate"``, or ``"both"`` (each projection's
  row L2-normalised, the two concatenated and scaled by ``1/sqrt(2)``, so both count equally). ``"gate"`` and
  ``"both"`` raise for a non-gated MLP.
* :func:`coactivation_experts` (co-activation graph): from a symmetric ``[width, width]`` co-moment matrix of the site's
  activations, a balanced graph partition by spectral embedding followed by balanced k-means. The published graph
  (:data:`COACTIVATIONS` ``"relu"``) weighs the edge ``i - j`` by ``sum_t relu(x_ti) relu(x_tj)`` over tokens and
  drops the edges below a threshold (:func:`coactivation_graph`); :func:`relu_coactivation` computes it from an
  activation tensor, :class:`~neurospec.record.coactivation.ReluCoMoments` streams it. The variant ``"raw"`` reads
  the raw second moments ``E[x_i x_j]`` with negative entries dropped.

Routing (:func:`route_topk`, :func:`install_routing`): a token's score for an expert is the sum of that expert's
neuron activations; the top-k experts are kept and every other neuron is set to zero. Measuring loss or top-1 against
k with :func:`install_routing` shows how much a model depends on its non-selected experts (with SiLU/GELU MLPs, much
more than with ReLU ones).

A routed expert of a mixture-of-experts model (site ``layers.L.mlp.E``) is split like any MLP: its input rows are its
slices of the fused ``gate_up_proj``, and :func:`install_routing` rewrites its activations through an expert hook
(:mod:`neurospec.models.experts`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from neurospec.cluster.embedding import spectral_embedding
from neurospec.cluster.kmeans import BalancedKMeans
from neurospec.errors import ArchitectureError, NeuronSetError
from neurospec.models.experts import add_expert_hook
from neurospec.models.linear import weight_out_in
from neurospec.models.sites import Site, Sites, find_sites, get_module

MOE_PROJECTIONS = ("up", "gate", "both")
ROUTING_SCORES = ("sum", "abs")
COACTIVATIONS = ("relu", "raw")
"""Co-activation graphs: ``relu`` = ``E[relu(x_i) relu(x_j)]`` (published), ``raw`` = ``E[x_i x_j]`` clipped at 0."""


def model_and_sites(model: Any) -> tuple[nn.Module, Sites]:
    """``(module, sites)`` from a :class:`~neurospec.models.loading.LoadedModel` or a transformers ``nn.Module``."""
    if isinstance(model, nn.Module):
        return model, find_sites(model)
    inner, sites = getattr(model, "model", None), getattr(model, "sites", None)
    if isinstance(inner, nn.Module) and isinstance(sites, Sites):
        return inner, sites
    raise TypeError(f"expected a torch nn.Module or a neurospec LoadedModel, got {type(model).__name__}")


def resolve_site(sites: Sites, site: Site | str) -> Site:
    """A :class:`Site` from a site or its name; it must be an MLP site."""
    s = sites[site] if isinstance(site, str) else site
    if s.kind != "mlp":
        raise NeuronSetError(f"site {s.name} is an attention site; MoEfication and weight graphs need MLP sites")
    return s


def mlp_input_projections(model: nn.Module, site: Site) -> dict[str, torch.Tensor]:
    """The MLP input projections of ``site`` as ``[width, d_model]`` weights (row ``i`` feeds neuron ``i``).

    Keys: ``{"gate", "up"}`` for a gated MLP (the projection whose module name contains ``gate`` is the gate), and
    ``{"up"}`` for a non-gated MLP.
    """
    if site.expert is not None:  # a routed expert: its rows of the fused [experts, 2*width, d] gate_up_proj
        gate_up = get_module(model, site.module).gate_up_proj[site.expert].detach()
        return {"gate": gate_up[: site.width], "up": gate_up[site.width :]}
    if not site.inputs:
        raise ArchitectureError(
            f"site {site.name} lists no MLP input projections (fused gate/up projections are not supported); "
            "register the model family with its `mlp_inputs`"
        )
    weights = {path: weight_out_in(get_module(model, path)).detach() for path in site.inputs}
    for path, w in weights.items():
        if w.shape[0] != site.width:
            raise ArchitectureError(
                f"{path} has {w.shape[0]} outputs but site {site.name} has width {site.width}; it is not this MLP's "
                "input projection"
            )
    if len(weights) == 1:
        return {"up": next(iter(weights.values()))}
    gates = [p for p in weights if "gate" in p.rsplit(".", 1)[-1]]
    if len(weights) != 2 or len(gates) != 1:
        raise ArchitectureError(
            f"site {site.name}: cannot tell gate from up among the MLP inputs {list(weights)} (expected two "
            "projections, exactly one named like '*gate*')"
        )
    up = next(p for p in weights if p != gates[0])
    return {"gate": weights[gates[0]], "up": weights[up]}


def _unit_rows(w: torch.Tensor) -> np.ndarray:
    x = w.to("cpu", torch.float64).numpy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def expert_features(model: nn.Module, site: Site, projection: str = "up") -> np.ndarray:
    """The ``[width, d]`` unit-norm rows that MoEfication clusters (see the module docstring for ``projection``)."""
    if projection not in MOE_PROJECTIONS:
        raise ValueError(f"projection must be one of {MOE_PROJECTIONS}, got {projection!r}")
    proj = mlp_input_projections(model, site)
    if projection != "up" and "gate" not in proj:
        raise ArchitectureError(f"site {site.name} is a non-gated MLP: projection {projection!r} needs a gate; use 'up'")
    if projection == "both":
        return np.concatenate([_unit_rows(proj["gate"]), _unit_rows(proj["up"])], axis=1) / np.sqrt(2.0)
    return _unit_rows(proj[projection])


def _check_n_experts(n_experts: int, width: int, where: str) -> None:
    if not 1 <= n_experts <= width:
        raise ValueError(
            f"n_experts must be between 1 and the MLP width {width} of {where}, got {n_experts} "
            f"(the default 96 experts needs a width >= 96)"
        )


def moefy_site(
    model: Any,
    site: Site | str,
    n_experts: int = 96,
    *,
    projection: str = "up",
    n_init: int = 1,
    max_iter: int = 100,
    assignment: str = "hybrid",
    seed: int = 0,
) -> np.ndarray:
    """Experts of one MLP site by balanced k-means of its normalised input-projection rows: labels ``[width]``.

    ``model``: an ``nn.Module`` or a ``LoadedModel``; ``site``: a :class:`Site` or its name (``"layers.3.mlp"``).
    Cost: one balanced k-means of ``width`` points (about 0.1-0.3 s for 1536 neurons and 96 experts).
    """
    module, sites = model_and_sites(model)
    return _moefy(module, resolve_site(sites, site), n_experts, projection, n_init, max_iter, assignment, seed)


def moefy(
    model: Any,
    sites: Sequence[Site | str] | None = None,
    *,
    n_experts: int = 96,
    projection: str = "up",
    n_init: int = 1,
    max_iter: int = 100,
    assignment: str = "hybrid",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Experts of several MLP sites (all of them by default): ``{site name: labels [width]}``, same seed per site."""
    module, all_sites = model_and_sites(model)
    chosen = all_sites.of_kind("mlp") if sites is None else tuple(resolve_site(all_sites, s) for s in sites)
    return {s.name: _moefy(module, s, n_experts, projection, n_init, max_iter, assignment, seed) for s in chosen}


def _moefy(
    module: nn.Module, site: Site, n_experts: int, projection: str, n_init: int, max_iter: int, assignment: str,
    seed: int,
) -> np.ndarray:
    _check_n_experts(n_experts, site.width, f"site {site.name}")
    feats = expert_features(module, site, projection)
    km = BalancedKMeans(n_experts, n_init=n_init, max_iter=max_iter, assignment=assignment, seed=seed).fit(feats)
    return km.labels_


def relu_coactivation(x: Any) -> np.ndarray:
    """``[width, width]`` mean co-activation ``(1/T) sum_t relu(x_ti) relu(x_tj)`` of activations ``x`` ``[T, width]``
    (float64). The published graph is the sum over tokens; the mean differs by the constant ``T`` only, and keeps a
    threshold comparable between runs of different lengths. Streaming form:
    :class:`~neurospec.record.coactivation.ReluCoMoments` (its ``cov + outer(mean, mean)``)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"activations must be a non-empty [tokens, width] matrix, got shape {a.shape}")
    r = np.maximum(a, 0.0)
    return r.T @ r / a.shape[0]


def coactivation_graph(comoment: Any, *, threshold: float = 0.0, keep: float | None = None) -> np.ndarray:
    """The co-activation graph ``[width, width]`` (float64, symmetric, zero diagonal) from a co-moment matrix.

    ``comoment``: e.g. :func:`relu_coactivation` (the published graph) or raw second moments ``E[x_i x_j]``.
    Negative entries (anti-co-activation, possible with raw moments) and the diagonal are set to zero; then edges
    whose weight is below ``threshold`` (same units as ``comoment``; ``0`` drops nothing) are dropped; with
    ``keep`` (0 < keep <= 1), only that fraction of the largest off-diagonal entries is kept as well.
    """
    a = _as_square(comoment, "comoment")
    width = a.shape[0]
    if not np.allclose(a, a.T, rtol=1e-5, atol=1e-8 * max(1.0, float(np.abs(a).max(initial=0.0)))):
        raise ValueError("the co-moment matrix must be symmetric")
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    a = np.clip((a + a.T) / 2.0, 0.0, None)
    np.fill_diagonal(a, 0.0)
    if threshold > 0:
        a = np.where(a >= threshold, a, 0.0)
    if keep is not None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        off = a[np.triu_indices(width, 1)]
        if (off > 0).any():
            cut = np.quantile(off, 1.0 - keep)
            a = np.where(a >= max(cut, np.finfo(float).tiny), a, 0.0)
    return a


def coactivation_experts(
    comoment: Any,
    n_experts: int = 96,
    *,
    threshold: float = 0.0,
    keep: float | None = None,
    n_init: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Experts from a co-activation graph: labels ``[width]`` with balanced sizes.

    ``comoment``: ``[width, width]`` symmetric matrix, e.g. ``E[relu(x_i) relu(x_j)]`` over tokens (the published
    co-activation, :func:`relu_coactivation`) or the raw second moments ``E[x_i x_j]`` (any positive scale; sums and
    means give the same result when ``threshold`` is scaled alike). The graph: :func:`coactivation_graph` with
    ``threshold`` and ``keep``. Partition: the ``n_experts`` leading eigenvectors of the symmetric-normalised
    adjacency, rows normalised, clustered by balanced k-means. Neurons with no edge (dead, or all edges below the
    threshold) get a zero embedding and still fill an expert, so every neuron has one.
    """
    a = _as_square(comoment, "comoment")
    _check_n_experts(n_experts, a.shape[0], "the co-moment matrix")
    a = coactivation_graph(a, threshold=threshold, keep=keep)
    emb = spectral_embedding(a, n_experts, seed=seed)
    return BalancedKMeans(n_experts, n_init=n_init, seed=seed).fit(emb.vectors).labels_


def _as_square(m: Any, what: str) -> np.ndarray:
    if hasattr(m, "detach"):
        m = m.detach().to("cpu", torch.float64).numpy()
    a = np.array(m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{what} must be a square [width, width] matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def _labels_tensor(labels: Any, width: int, n_experts: int | None) -> tuple[torch.Tensor, int]:
    if isinstance(labels, torch.Tensor):
        lab = labels.detach().long()
    else:
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if lab.ndim != 1 or lab.numel() != width:
        raise ValueError(f"labels must have shape [{width}] (one expert per neuron), got {tuple(lab.shape)}")
    if lab.numel() and int(lab.min()) < 0:
        raise ValueError("every neuron needs an expert: labels must be >= 0 for routing")
    e = int(lab.max()) + 1 if n_experts is None else n_experts
    if lab.numel() and int(lab.max()) >= e:
        raise ValueError(f"labels go up to {int(lab.max())} but n_experts is {e}")
    return lab, e


def route_topk(
    x: torch.Tensor, labels: Any, k: int, *, n_experts: int | None = None, score: str = "sum"
) -> torch.Tensor:
    """Keep each token's top-k experts and zero the others' neurons.

    ``x``: ``[..., width]`` activations of one MLP site (e.g. ``[tokens, width]``); ``labels``: ``[width]`` expert of
    each neuron; ``k``: experts kept per token (``1 <= k <= n_experts``). ``score``: ``"sum"`` (an expert's score is
    the sum of its neurons' activations, as published) or ``"abs"`` (sum of absolute activations). Ties are broken by
    :func:`torch.topk`. Returns a tensor like ``x``.
    """
    if score not in ROUTING_SCORES:
        raise ValueError(f"score must be one of {ROUTING_SCORES}, got {score!r}")
    lab, e = _labels_tensor(labels, x.shape[-1], n_experts)
    if not 1 <= k <= e:
        raise ValueError(f"k must be between 1 and the number of experts {e}, got {k}")
    if k == e:
        return x
    lab = lab.to(x.device)
    onehot = torch.zeros(x.shape[-1], e, dtype=x.dtype, device=x.device)
    onehot[torch.arange(x.shape[-1], device=x.device), lab] = 1
    scores = (x.abs() if score == "abs" else x) @ onehot
    top = scores.topk(k, dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return x * keep[..., lab].to(x.dtype)


@contextmanager
def install_routing(
    model: Any, site: Site | str, labels: Any, k: int, *, n_experts: int | None = None, score: str = "sum"
) -> Iterator[None]:
    """Within the block, route the MLP of ``site`` to its top-k experts per token (see :func:`route_topk`).

    A forward pre-hook on ``site.module`` (the MLP's down projection) replaces its input by the routed activations;
    it is removed on exit, even after an exception. The model is not otherwise changed.
    """
    module, sites = model_and_sites(model)
    s = resolve_site(sites, site)
    lab, e = _labels_tensor(labels, s.width, n_experts)
    if not 1 <= k <= e:
        raise ValueError(f"k must be between 1 and the number of experts {e}, got {k}")
    target = get_module(module, s.module)

    def hook(_mod: nn.Module, args: tuple) -> tuple:
        return (route_topk(args[0], lab, k, n_experts=e, score=score), *args[1:])

    if s.expert is not None:  # a routed expert: rewrite its activations inside the fused experts' loop
        handle = add_expert_hook(target, s.expert, lambda x: route_topk(x, lab, k, n_experts=e, score=score),
                                 edit=True)
    else:
        handle = target.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()

