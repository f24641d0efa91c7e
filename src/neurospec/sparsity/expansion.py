"""Sparse expansion: one SparseGPT-pruned copy of an MLP linear layer per cluster of its inputs, tokens routed to the
copy of their cluster.

Per chosen linear module (the MLP linears only: the sites' input projections and reader, e.g. Llama's gate, up and
down projections, BERT's ``intermediate.dense`` and ``output.dense``):

1. its calibration inputs ``X [tokens, in]`` are projected by PCA (scikit-learn, fitted on ``X``) to
   ``p = max(1, in // pca_div)`` dimensions and clustered by k-means (scikit-learn, ``clusters`` centroids, seeded,
   one k-means++ initialisation);
2. every calibration token is routed to the cluster whose centroid is nearest to its projection (the same routing
   the layer uses at inference, so calibration and inference assign a given input alike even where k-means' own
   labels would not);
3. cluster ``k``'s copy is SparseGPT run on the Hessian of the tokens routed to ``k`` only (same pattern, sparsity
   and options as plain SparseGPT). A cluster with fewer than ``min_cluster_tokens`` tokens (default: the layer's
   input width, the floor plain SparseGPT applies to a whole layer, below which the Hessian is rank-deficient and
   only the dampening holds it together) gets the plain SparseGPT weights of the layer instead (a *fallback*,
   listed in the layer's summary).

The fitted PCA mean and components and the centroids are kept as tensors in :class:`ExpandedLinear`, so routing is
pure torch. Modules fed the same tensor (gate and up) share one PCA and k-means fit and so one routing.

Layer-sequential like :func:`~neurospec.sparsity.driver.sparsify`: block by block, the block runs over all
calibration tokens with hooks storing the chosen modules' inputs, those modules are expanded, and the expanded
block runs again to produce the next block's inputs. Within a block all modules are calibrated in that one pass,
as plain SparseGPT calibrates them (so one cluster reproduces it exactly): the down projection is fitted on the
product of the *dense* gate and up of its block, while at inference it receives the product of the expanded ones,
so a few of its tokens route to another cluster than the same token did in calibration (about 5% in a tiny test
model). Memory: the stored inputs of one block (``tokens x in``
floats per distinct input) and the copies: ``clusters`` times the weights of every expanded module
(:func:`expansion_memory`; SmolLM2-135M, all 30 blocks, 16 clusters: about 1.3 G parameters, 5 GB in float32).

An expanded model evaluates, records (hooks on the expanded modules fire as on the linears they replace) and
fingerprints like any model, but it is not a Hugging Face architecture: it cannot be saved with
``save_pretrained`` (:func:`~neurospec.sparsity.save.save_sparse` refuses it), and weight folds (pruning,
ablation) refuse its expanded modules.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurospec.models.linear import is_expanded, linear_dims, weight_out_in
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import find_sites
from neurospec.sparsity.driver import BlockRunner, LinearRef, list_linears, select_linears
from neurospec.sparsity.error import relative_output_error
from neurospec.sparsity.layer import prune_weight
from neurospec.sparsity.outputs import record_outputs
from neurospec.sparsity.patterns import SparsityError, SparsityPattern, make_pattern
from neurospec.sparsity.stats import InputHessian
from neurospec.sparsity.wasserstein import score_outputs, spearman, top_neurons

ProgressFn = Callable[[str, int, int], None]
WARN_BYTES = 2 * 1024**3  # expand() warns when the copies need more than this many extra bytes


def route(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``LongTensor[...]``: for each token of ``x [..., in]`` the index of the centroid ``[K, p]`` nearest (squared
    Euclidean distance; ties: the lowest index) to its PCA projection ``(x - mean) @ components^T``, in float32."""
    z = (x.float() - mean.to(x.device, torch.float32)) @ components.to(x.device, torch.float32).t()
    d = (z.unsqueeze(-2) - centroids.to(x.device, torch.float32)).square().sum(-1)
    return d.argmin(-1)


class ExpandedLinear(nn.Module):
    """A linear layer with one weight per input cluster; each token goes through the copy of its cluster.

    ``weights [K, out, in]`` (a parameter), ``bias [out]`` or ``None`` (shared: pruning never changes it);
    router buffers ``mean [in]``, ``components [p, in]`` (PCA) and ``centroids [K, p]`` (k-means, in PCA space).
    Routing runs in float32 whatever the weights' dtype.
    """

    is_expanded_linear = True

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                 components: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        k, out, inp = weights.shape
        if mean.shape != (inp,) or components.dim() != 2 or components.shape[1] != inp:
            raise SparsityError(f"PCA mean {tuple(mean.shape)} / components {tuple(components.shape)} do not match "
                                f"{inp} inputs")
        if centroids.shape != (k, components.shape[0]):
            raise SparsityError(f"centroids {tuple(centroids.shape)} do not match {k} clusters of "
                                f"{components.shape[0]} PCA dimensions")
        if bias is not None and bias.shape != (out,):
            raise SparsityError(f"bias {tuple(bias.shape)} does not match {out} outputs")
        self.in_features, self.out_features, self.clusters = inp, out, k
        self.weights = nn.Parameter(weights.detach(), requires_grad=False)  # taken as is (no copy)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("components", components.detach().float().clone())
        self.register_buffer("centroids", centroids.detach().float().clone())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, clusters={self.clusters}, "
                f"pca_dims={self.components.shape[0]}, bias={self.bias is not None}")

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``LongTensor[...]``: the cluster of each token of ``x [..., in]`` (:func:`route`)."""
        return route(x, self.mean, self.components, self.centroids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        labels = self.route(flat)
        out = flat.new_empty(flat.shape[0], self.out_features, dtype=self.weights.dtype)
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.clusters).tolist()
        start = 0
        for k, n in enumerate(counts):  # one matmul per non-empty cluster
            if n:
                idx = order[start : start + n]
                out[idx] = F.linear(flat[idx].to(self.weights.dtype), self.weights[k], self.bias)
                start += n
        return out.reshape(*shape[:-1], self.out_features)


# ---------------------------------------------------------------------------------------------- selection


def mlp_linears(model: nn.Module, layers: Sequence[int | str] | None = None) -> dict[str, LinearRef]:
    """The MLP linear modules (each dense MLP site's input projections and reader, from the architecture
    registry) of the blocks chosen by ``layers`` (as :func:`~neurospec.sparsity.driver.select_linears`: block
    indices or module names; a named module that is not an MLP linear is an error)."""
    every = list_linears(model)
    by_path = {ref.path: name for name, ref in every.items()}
    mlp: set[str] = set()
    for site in find_sites(model):
        if site.kind != "mlp" or site.expert is not None:
            continue
        for path in (*site.inputs, site.module):
            if path in by_path:
                mlp.add(by_path[path])
    if not mlp:
        raise SparsityError("the model has no dense MLP linear modules to expand (routed experts are not supported)")
    chosen = select_linears(model, layers)
    named = [str(x).strip() for x in layers or [] if str(x).strip() in every]
    bad = [n for n in named if n not in mlp]
    if bad:
        example = ", ".join(sorted(n for n in mlp if n.startswith(bad[0].rsplit(".", 2)[0]))[:3])
        raise SparsityError(f"{bad[0]} is not an MLP linear module: only MLP linears are expanded (e.g. {example})")
    return {n: ref for n, ref in chosen.items() if n in mlp}


def expansion_memory(model: nn.Module | LoadedModel, layers: Sequence[int | str] | None = None, *,
                     clusters: int = 16) -> dict[str, int]:
    """Extra memory of expanding the MLP linears chosen by ``layers`` into ``clusters`` copies (estimated before
    building): ``{"modules", "parameters", "bytes"}`` with ``parameters = (clusters - 1) * sum(out * in)`` (the
    router's few floats left out) in the weights' dtype."""
    net = model.model if isinstance(model, LoadedModel) else model
    refs = mlp_linears(net, layers)
    per_copy = sum(linear_dims(r.module)[0] * linear_dims(r.module)[1] for r in refs.values())
    size = next(iter(refs.values())).module.weight.element_size() if refs else 4
    extra = max(clusters - 1, 0) * per_copy
    return {"modules": len(refs), "parameters": int(extra), "bytes": int(extra * size)}


# ------------------------------------------------------------------------------------------------- results


@dataclass
class ExpandedLayer:
    """One expanded module: tokens per cluster, the achieved sparsity of each copy, the clusters that fell back to
    the plain SparseGPT weights, and ``plain_weight`` (plain SparseGPT on all of the layer's calibration tokens,
    kept for comparisons)."""

    name: str
    shape: tuple[int, int]
    pca_dims: int
    cluster_tokens: list[int]
    sparsity: list[float]
    fallbacks: list[int]
    plain_sparsity: float
    tokens: int
    plain_weight: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "pca_dims": self.pca_dims,
                "cluster_tokens": list(self.cluster_tokens), "sparsity": list(self.sparsity),
                "fallbacks": list(self.fallbacks), "plain_sparsity": self.plain_sparsity, "tokens": self.tokens}


@dataclass
class ExpansionResult:
    """``model``: the expanded model (a copy unless ``inplace``); ``layers``: one :class:`ExpandedLayer` per module."""

    model: nn.Module
    pattern: SparsityPattern
    clusters: int
    pca_div: int
    min_cluster_tokens: int | None
    layers: dict[str, ExpandedLayer]
    calibration_tokens: int
    memory: dict[str, int]
    seconds: float

    def summary(self) -> dict:
        """The JSON summary: clusters, PCA dimensions per module, cluster sizes (min/median/max per module),
        fallbacks, the extra memory."""
        sizes = {}
        for n, r in self.layers.items():
            t = sorted(r.cluster_tokens)
            sizes[n] = {"min": t[0], "median": t[len(t) // 2], "max": t[-1]}
        return {"clusters": self.clusters, "pca_div": self.pca_div,
                "pca_dims": {n: r.pca_dims for n, r in self.layers.items()},
                "min_cluster_tokens": self.min_cluster_tokens, "cluster_tokens": sizes,
                "fallbacks": {n: r.fallbacks for n, r in self.layers.items() if r.fallbacks},
                "extra_parameters": self.memory["parameters"], "extra_bytes": self.memory["bytes"]}

    def to_dict(self) -> dict:
        return {"method": "sparsegpt", "sparsity": float(self.pattern.sparsity), "pattern": self.pattern.label,
                "layers": {n: sum(r.sparsity) / len(r.sparsity) for n, r in self.layers.items()},
                "layer_details": {n: r.to_dict() for n, r in self.layers.items()},
                "expansion": self.summary(), "calibration_tokens": self.calibration_tokens,
                "seconds": self.seconds}


# -------------------------------------------------------------------------------------------------- fitting


def fit_router(inputs: torch.Tensor, clusters: int, pca_dims: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA to ``pca_dims`` then k-means into ``clusters`` (scikit-learn, seeded) fitted on ``inputs [tokens, in]``:
    ``{"mean" [in], "components" [p, in], "centroids" [K, p]}`` (float32)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = inputs.detach().reshape(-1, inputs.shape[-1]).float().cpu().numpy()
    pca = PCA(n_components=pca_dims, random_state=seed).fit(x)
    z = pca.transform(x)
    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(z)
    return {"mean": torch.as_tensor(pca.mean_).float(), "components": torch.as_tensor(pca.components_).float(),
            "centroids": torch.as_tensor(km.cluster_centers_).float()}


def expand_linear(module: nn.Module, batches: Sequence[torch.Tensor], pattern: SparsityPattern, *, clusters: int = 16,
                  pca_div: int = 32, seed: int = 0, min_cluster_tokens: int | None = None,
                  router: Mapping[str, torch.Tensor] | None = None, name: str = "the layer",
                  **options) -> tuple[ExpandedLinear, ExpandedLayer]:
    """Expand one linear module given its calibration inputs (``batches``: tensors ``[..., in]``, streamed in this
    order into each Hessian, so one cluster reproduces plain SparseGPT bit for bit). ``router``: a fitted
    :func:`fit_router` to reuse (modules fed the same inputs). ``options`` go to SparseGPT (``blocksize``,
    ``damp``, ``dtype``). The module is not changed."""
    inp, out = linear_dims(module)
    check_expansion(inp, clusters, pca_div, name)
    flat = [b.detach().reshape(-1, inp) for b in batches]
    tokens = sum(int(b.shape[0]) for b in flat)
    if tokens < clusters:
        raise SparsityError(f"{name} saw {tokens} calibration tokens, fewer than the {clusters} clusters: give more "
                            "calibration tokens or fewer clusters")
    if tokens < inp:
        raise SparsityError(f"sparsegpt needs at least {inp} calibration tokens for {name}, but it saw {tokens}: "
                            "give more calibration inputs")
    p = pca_dims(inp, pca_div)
    if router is None:
        router = fit_router(torch.cat(flat), clusters, p, seed)
    floor = inp if min_cluster_tokens is None else int(min_cluster_tokens)
    w = weight_out_in(module).detach()
    bias = getattr(module, "bias", None)
    total = InputHessian()
    per = [InputHessian() for _ in range(clusters)]
    for b in flat:
        total.update(b)
        labels = route(b, router["mean"], router["components"], router["centroids"])
        for k in range(clusters):
            part = b[labels == k]
            if part.shape[0]:
                per[k].update(part)
    plain = prune_weight("sparsegpt", w, total.compute(), pattern, name=name, **options)
    weights, sparsity, fallbacks = [], [], []
    for k in range(clusters):
        if per[k].count < floor:
            weights.append(plain.weight)
            sparsity.append(plain.sparsity)
            fallbacks.append(k)
            continue
        res = prune_weight("sparsegpt", w, per[k].compute(), pattern, name=f"{name} (cluster {k})", **options)
        weights.append(res.weight)
        sparsity.append(res.sparsity)
    new = ExpandedLinear(torch.stack(weights), bias, router["mean"], router["components"], router["centroids"])
    new.to(w.device)
    info = ExpandedLayer(name, (out, inp), p, [h.count for h in per], sparsity, fallbacks, plain.sparsity, tokens,
                         plain.weight)
    return new, info


def pca_dims(width: int, pca_div: int) -> int:
    """The PCA dimension of a layer with ``width`` inputs: ``max(1, width // pca_div)``."""
    return max(1, width // pca_div)


def check_expansion(width: int | None, clusters: int, pca_div: int, name: str = "the layer") -> None:
    """Clear errors for cluster counts below 1 and PCA divisors below 1 or above the input width."""
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise SparsityError(f"clusters must be a positive integer (16 in the published method), got {clusters!r}")
    if isinstance(pca_div, bool) or not isinstance(pca_div, int) or pca_div < 1:
        raise SparsityError(f"pca_div must be a positive integer (PCA keeps width // pca_div dimensions; 32 in the "
                            f"published method), got {pca_div!r}")
    if width is not None and pca_div > width:
        raise SparsityError(f"pca_div {pca_div} is larger than the input width {width} of {name}: PCA would keep "
                            f"width // pca_div = 0 dimensions; use a pca_div of at most {width}")


# --------------------------------------------------------------------------------------------------- driver


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def expand(
    model: nn.Module | LoadedModel,
    calibration: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: str | SparsityPattern | None = None,
    clusters: int = 16,
    pca_div: int = 32,
    seed: int = 0,
    layers: Sequence[int | str] | None = None,
    min_cluster_tokens: int | None = None,
    batch_size: int = 8,
    inplace: bool = False,
    progress: ProgressFn | None = None,
    **options,
) -> ExpansionResult:
    """Sparse expansion (module docstring) of the MLP linear modules of ``model``'s blocks.

    Like :func:`~neurospec.sparsity.driver.sparsify`, the caller's model is not changed: a ``copy.deepcopy`` is
    expanded and returned as ``result.model``; with ``inplace=True`` the MLP linears of the given model are replaced
    in place by :class:`ExpandedLinear` modules (and ``result.model`` is that model).

    ``calibration``: ``LongTensor[blocks, seq]`` token ids. ``sparsity`` / ``pattern``: as plain SparseGPT
    (default 50% unstructured). ``layers``: block indices or MLP module names (default: every block).
    ``min_cluster_tokens``: clusters with fewer calibration tokens get the plain SparseGPT weights (default: the
    module's input width). ``options``: SparseGPT's ``blocksize``, ``damp``, ``dtype``. Warns when the copies need
    more than 2 GiB (:func:`expansion_memory`).
    """
    t_start = time.perf_counter()
    pat = pattern if isinstance(pattern, SparsityPattern) else make_pattern(sparsity, pattern)
    check_expansion(None, clusters, pca_div)
    unknown = sorted(set(options) - {"blocksize", "damp", "dtype"})
    if unknown:
        raise SparsityError(f"expansion takes no option {unknown}; SparseGPT's options are blocksize, damp, dtype")
    if calibration is None or calibration.numel() == 0:
        raise SparsityError("sparse expansion needs calibration token ids [blocks, seq]")
    n_tokens = int(calibration.shape[0]) if calibration.is_floating_point() else int(calibration.numel())
    if n_tokens < clusters and not calibration.is_floating_point():  # images: their tokens are checked per module
        raise SparsityError(f"{clusters} clusters need at least as many calibration tokens, got {n_tokens}: give more "
                            "calibration tokens or fewer clusters")
    source = model.model if isinstance(model, LoadedModel) else model
    chosen_src = mlp_linears(source, layers)
    if not chosen_src:
        raise SparsityError("no MLP linear module was chosen to expand")
    for name, ref in chosen_src.items():
        if is_expanded(ref.module):
            raise SparsityError(f"{name} is already expanded")
        check_expansion(ref.in_features, clusters, pca_div, name)
        pat.check_width(ref.in_features, name)
    memory = expansion_memory(source, list(chosen_src), clusters=clusters)
    if memory["bytes"] > WARN_BYTES:
        warnings.warn(f"sparse expansion into {clusters} clusters adds {memory['parameters'] / 1e9:.2f} G parameters "
                      f"({memory['bytes'] / 1024**3:.1f} GiB) for {memory['modules']} modules; limit it with layers",
                      stacklevel=2)
    net = source if inplace else copy.deepcopy(source)
    chosen = {n: r for n, r in list_linears(net).items() if n in chosen_src}
    by_block: dict[int, list[LinearRef]] = {}
    for ref in chosen.values():
        by_block.setdefault(ref.block, []).append(ref)
    last = max(by_block)
    runner = BlockRunner(net, calibration, batch_size=batch_size, upto=last)
    infos: dict[str, ExpandedLayer] = {}
    for b in range(last + 1):
        refs = by_block.get(b, [])
        if refs:
            inputs, owner = _collect_inputs(runner, b, refs)
            routers: dict[str, dict[str, torch.Tensor]] = {}
            for ref in refs:
                src = owner[ref.name]
                new, info = expand_linear(ref.module, inputs[src], pat, clusters=clusters, pca_div=pca_div,
                                          seed=seed, min_cluster_tokens=min_cluster_tokens, router=routers.get(src),
                                          name=ref.name, **options)
                routers.setdefault(src, {k: getattr(new, k) for k in ("mean", "components", "centroids")})
                _set_module(net, ref.path, new)
                infos[ref.name] = info
            del inputs
        if b < last:
            runner.run(b)
        if progress:
            progress("blocks", b + 1, last + 1)
    del runner
    return ExpansionResult(net, pat, clusters, pca_div, min_cluster_tokens, {n: infos[n] for n in chosen}, n_tokens,
                           memory, time.perf_counter() - t_start)


def _collect_inputs(runner: BlockRunner, b: int, refs: Sequence[LinearRef]
                    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, str]]:
    """Run block ``b`` with pre-hooks storing each chosen module's input batches; modules fed the same tensor
    (gate, up) share one list: ``owner[name]`` is the key of its list."""
    inputs: dict[str, list[torch.Tensor]] = {}
    owner: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def hook_for(name: str):
        def hook(mod, args):
            x = args[0]
            for t, first in seen:
                if t is x:
                    owner.setdefault(name, first)
                    return
            seen.append((x, name))
            owner.setdefault(name, name)
            inputs.setdefault(owner[name], []).append(x.detach().reshape(-1, x.shape[-1]))
        return hook

    handles = [ref.module.register_forward_pre_hook(hook_for(ref.name)) for ref in refs]
    try:
        runner.run(b, keep=False, before_batch=seen.clear)
        seen.clear()
    finally:
        for h in handles:
            h.remove()
    missing = [ref.name for ref in refs if ref.name not in owner]
    if missing:
        raise SparsityError(f"modules {missing} were not called when block {b} ran; they cannot be calibrated")
    return inputs, owner


# ---------------------------------------------------------------------------------------------- measurement


@torch.no_grad()
def expansion_error(
    dense: nn.Module | LoadedModel,
    result: ExpansionResult,
    blocks: torch.Tensor,
    *,
    fraction: float = 0.03,
    batch_size: int = 8,
    w1: Mapping[str, torch.Tensor] | None = None,
    w1_after: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per expanded module, on held-out ``blocks`` with the inputs the *dense* model gives that module (the layer's
    own error, as :func:`~neurospec.sparsity.error.neuron_output_error`): the per-neuron relative output error
    ``||W x - W' x|| / ||W x||`` of plain SparseGPT (``result``'s plain weights) and of the expansion (each token
    through its cluster's copy), and how the error reduction ``plain - expanded`` relates to each neuron's W1
    (entanglement of its dense output on ``blocks``, :mod:`neurospec.sparsity.wasserstein`; or given as ``w1``).

    Returns ``{module: {"error_plain", "error_expanded" (means over neurons), "reduction" (mean), "spearman"
    (Spearman of the reduction with W1), "reduction_top", "reduction_rest" (mean reduction among the top
    ``fraction`` W1 neurons and the others), "top" (their count), "w1_top", "w1_rest" (mean dense W1),
    "w1_top_after", "w1_rest_after" (the same neurons' W1 in the expanded model, with ``w1_after``),
    "per_neuron": {"plain", "expanded", "w1"} tensors}}``. Neither model is changed.
    """
    dnet = dense.model if isinstance(dense, LoadedModel) else dense
    d_lin, e_lin = list_linears(dnet), list_linears(result.model)
    names = [n for n in result.layers if n in d_lin and n in e_lin and is_expanded(e_lin[n].module)]
    if not names:
        raise SparsityError("the expansion result holds no expanded module that the dense model also has")
    total = {n: InputHessian() for n in names}
    per = {n: [InputHessian() for _ in range(e_lin[n].module.clusters)] for n in names}

    def hook_for(n: str):
        exp = e_lin[n].module

        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            total[n].update(x)
            labels = exp.route(x)
            for k in range(exp.clusters):
                part = x[labels == k]
                if part.shape[0]:
                    per[n][k].update(part)
        return hook

    handles = [d_lin[n].module.register_forward_pre_hook(hook_for(n)) for n in names]
    key = "pixel_values" if blocks.is_floating_point() else "input_ids"
    device = next(dnet.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            dnet(**{key: blocks[i : i + batch_size].to(device)})
    finally:
        for h in handles:
            h.remove()
    if w1 is None:
        scores = score_outputs(record_outputs(dnet, blocks, modules={n: d_lin[n] for n in names},
                                              batch_size=batch_size))
        w1 = {n: scores[n].w1 for n in names}
    after = None
    if w1_after:
        scores = score_outputs(record_outputs(result.model, blocks, modules={n: e_lin[n] for n in names},
                                              batch_size=batch_size))
        after = {n: scores[n].w1 for n in names}
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        W = weight_out_in(d_lin[n].module).detach()
        S = total[n].second_moment()
        plain = relative_output_error(W, result.layers[n].plain_weight, second_moment=S)
        expanded = _expanded_error(W, e_lin[n].module.weights, per[n], S)
        red = plain - expanded
        score = w1[n].double().cpu()
        top = top_neurons(score, fraction)
        rest = torch.ones(score.numel(), dtype=torch.bool)
        rest[top] = False
        row = {"error_plain": _nanmean(plain), "error_expanded": _nanmean(expanded), "reduction": _nanmean(red),
               "spearman": spearman(red.cpu(), score), "reduction_top": _nanmean(red[top]),
               "reduction_rest": _nanmean(red[rest]), "top": int(top.numel()),
               "w1_top": _nanmean(score[top]), "w1_rest": _nanmean(score[rest])}
        if after is not None:
            a = after[n].double().cpu()
            row.update(w1_top_after=_nanmean(a[top]), w1_rest_after=_nanmean(a[rest]))
        row["per_neuron"] = {"plain": plain.cpu(), "expanded": expanded.cpu(), "w1": score}
        out[n] = row
    return out


def _expanded_error(dense_weight: torch.Tensor, weights: torch.Tensor, per: Sequence[InputHessian],
                    second_moment: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_k d_ko S_k d_ko^T / w_o S w_o^T)`` per row ``o``, with ``d_k = W - W_k`` and ``S_k`` the second
    moment of the tokens routed to cluster ``k`` (``S = sum_k S_k``)."""
    S = second_moment.to(torch.float64)
    W = dense_weight.to(S.device, torch.float64)
    num = torch.zeros(W.shape[0], dtype=torch.float64, device=S.device)
    for k, acc in enumerate(per):
        if acc.count:
            D = W - weights[k].detach().to(S.device, torch.float64)
            num += ((D @ acc.second_moment().to(S.device)) * D).sum(1)
    den = ((W @ S) * W).sum(1)
    return num.clamp_min(0).sqrt() / den.clamp_min(0).sqrt()


def _nanmean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.double().mean()) if x.numel() else math.nan


def summarise_error(errors: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`expansion_error` without the per-neuron tensors (the JSON form)."""
    return {n: {k: v for k, v in row.items() if k != "per_neuron"} for n, row in errors.items()}
