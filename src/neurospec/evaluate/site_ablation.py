"""Task metrics of a model with one set of neurons of one site ablated, fast enough for hundreds of ablations.

Cluster importance (Hod et al.) ablates every cluster and 19 random sets of the same size, each in one layer, and
measures every task: thousands of forward passes. Two evaluators share one interface, ``baseline`` (the unablated
metrics) and :meth:`~LMEvaluator.ablate` ``(site, indices) -> {task: {metric: value}}``, plus
:meth:`~LMEvaluator.damage` (how much worse, larger = more damage):

* :class:`LMEvaluator` (causal LMs): mean next-token cross-entropy (``loss``) and top-1 accuracy (``top1``) over each
  task's evaluation blocks, counted by :mod:`neurospec.evaluate.metrics` (the same definition of a hit as every
  other evaluator: ties count against the target, non-finite logits are counted in ``nonfinite`` and never a hit);
  damage = loss increase. *Prefix cache*: ablating a site of layer ``L`` cannot change
  blocks ``0 .. L-1``, so the unablated output of block ``L - 1`` is kept per batch from the baseline pass and, while
  an ablation of layer ``L`` is measured, blocks ``0 .. L-1`` are swapped for stand-ins that return it. The result
  is the same (to float rounding) as the full forward pass and costs only the blocks from ``L`` on plus the head;
  memory: one ``[batch, seq, d_model]`` output per cached layer and batch. It needs the blocks in one
  ``nn.ModuleList`` (every supported family); otherwise the full pass runs. The stand-ins go into a *shadow* of the
  model: the modules on the path from the root to the block list are shallow copies with their own child tables,
  sharing every parameter and every other module with the caller's model, so the caller's module tree is never
  edited (not even for the duration of a measurement).
* :class:`ImageEvaluator` (digits models): top-1 accuracy on the test split, overall (task ``all``) and per class
  (``digit-C``), hits as in :func:`~neurospec.evaluate.metrics.topk_hits`; damage = accuracy drop.

Ablation: ``"zero"`` or ``"mean"`` (``offsets``: per-site means), folded into the site's linear module by
:func:`neurospec.intervene.ablate.ablated` and undone after each measurement.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from neurospec.data.digits import ALL_DIGITS, digits_split, parse_digit_tasks
from neurospec.errors import NeurospecError
from neurospec.evaluate.metrics import TokenCounts, causal_batch, hidden_path, topk_hits
from neurospec.intervene.ablate import ablated
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.digits import image_logits
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import Sites

ABLATIONS = ("zero", "mean")


def _neuron_set(sites: Sites, site: str, idx: Any) -> NeuronSet:
    s = sites[site]
    return NeuronSet({site: torch.as_tensor(np.asarray(idx), dtype=torch.long)}, {site: s.width})


class _Evaluator:
    sites: Sites
    model: nn.Module
    method: str
    offsets: Mapping[str, torch.Tensor] | None
    baseline: dict[str, dict[str, float]]

    def _check_method(self, method: str, offsets: Any) -> None:
        if method not in ABLATIONS:
            raise NeurospecError(f"ablation must be one of {ABLATIONS}, got {method!r}")
        if method == "mean" and offsets is None:
            raise NeurospecError("mean ablation needs offsets (per-neuron means of the recorded tasks)")

    def _ablated(self, site: str, idx: Any):
        ns = _neuron_set(self.sites, site, idx)
        offs = None
        if self.method == "mean":
            assert self.offsets is not None
            offs = {site: self.offsets[site]}
        return ablated(self.model, self.sites, ns, self.method, offsets=offs)


# ---------------------------------------------------------------------------------------------- language models


def block_list_path(model: nn.Module, sites: Sites) -> str | None:
    """The dotted path of the ``nn.ModuleList`` holding the blocks of every site (found from the sites' module
    paths), or ``None``."""
    found: str | None = None
    for s in sites:
        parts = s.module.split(".")
        hit = None
        for i, p in enumerate(parts):
            if p == str(s.layer) and i > 0:
                path = ".".join(parts[:i])
                if isinstance(model.get_submodule(path), nn.ModuleList):
                    hit = path
                    break
        if hit is None or (found is not None and hit != found):
            return None
        found = hit
    return found


def block_list(model: nn.Module, sites: Sites) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` holding the blocks of every site, or ``None`` (see :func:`block_list_path`)."""
    path = block_list_path(model, sites)
    return None if path is None else model.get_submodule(path)


def _shadow(model: nn.Module, path: str, blocks: nn.ModuleList) -> nn.Module:
    """A stand-in for ``model`` whose module at ``path`` is ``blocks``: every module from the root to ``path``'s parent
    is a shallow copy with its own child table; parameters, buffers and all other modules are the model's own."""
    names = path.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    node, orig = root, model
    for name in names[:-1]:
        child = copy.copy(orig._modules[name])
        child._modules = dict(orig._modules[name]._modules)
        node._modules[name] = child
        node, orig = child, orig._modules[name]
    node._modules[names[-1]] = blocks
    return root


class _Replay(nn.Module):
    """Stands in for a block: returns the cached output of block ``layer`` for the batch being measured."""

    def __init__(self, owner: LMEvaluator, layer: int):
        super().__init__()
        self.owner, self.layer = [owner], layer  # a list, so the owner is not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner[0]
        return owner._cache[self.layer][owner._batch]


class LMEvaluator(_Evaluator):
    """Next-token loss and top-1 of each task's blocks under single-site ablations (see the module docstring).

    ``blocks``: ``{task: LongTensor [n_blocks, seq]}``; ``layers``: the layers whose sites will be ablated (their
    prefixes are cached); ``prefix_cache=False`` always runs the full model (the reference the cache is tested
    against).
    """

    def __init__(
        self, loaded: LoadedModel, blocks: Mapping[str, torch.Tensor], *, layers: Iterable[int] = (), batch_size: int = 8,
        method: str = "zero", offsets: Mapping[str, torch.Tensor] | None = None, prefix_cache: bool = True,
    ) -> None:
        if getattr(loaded, "head", None) != "causal-lm":
            raise NeurospecError(f"next-token metrics need a causal LM; {loaded.name} has head {loaded.head!r}")
        self._check_method(method, offsets)
        self.model, self.sites, self.method, self.offsets = loaded.model, loaded.sites, method, offsets
        self.device = next(self.model.parameters()).device
        self.batches: list[tuple[str, torch.Tensor]] = []
        for task, b in blocks.items():
            if b.ndim != 2 or b.shape[1] < 2 or b.shape[0] == 0:
                raise NeurospecError(f"task {task!r}: need evaluation blocks [n >= 1, seq >= 2], got {tuple(b.shape)}")
            for lo in range(0, b.shape[0], batch_size):
                self.batches.append((task, b[lo:lo + batch_size]))
        self.tasks = list(blocks)
        self._blocks_path = block_list_path(self.model, self.sites) if prefix_cache else None
        self.blocks = None if self._blocks_path is None else self.model.get_submodule(self._blocks_path)
        self._shadows: dict[int, tuple[nn.Module, Any]] = {}
        self._cache: dict[int, list[Any]] = {}
        self._batch = 0
        self.path = hidden_path(self.model)
        want = sorted({int(x) - 1 for x in layers if int(x) > 0}) if self.blocks is not None else []
        self.baseline = self._run(capture=want)

    def _run(self, capture: list[int] = (), run: tuple[nn.Module, Any] | None = None) -> dict[str, dict[str, float]]:
        model, path = (self.model, self.path) if run is None else run
        counts = {t: TokenCounts(1, None) for t in self.tasks}
        handles = []
        if capture:
            assert self.blocks is not None
            for i in capture:
                self._cache[i] = []

                def hook(_m, _a, out, _i=i):
                    self._cache[_i].append(out)

                handles.append(self.blocks[i].register_forward_hook(hook))
        try:
            with torch.no_grad():
                for b, (task, ids) in enumerate(self.batches):
                    self._batch = b
                    causal_batch(model, ids.to(self.device), counts[task], path)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for t in self.tasks:
            m = counts[t].compute("causal")
            out[t] = {"loss": m["loss"], "top1": m["top1"], "tokens": m["tokens"], "nonfinite": m["nonfinite"]}
        return out

    def _model_for(self, layer: int) -> tuple[nn.Module, Any]:
        """``(model, hidden path)`` to run for an ablation in ``layer``: a shadow whose blocks ``0 .. layer-1`` replay
        the cached output of block ``layer - 1`` when that output is cached, else the model itself."""
        if self.blocks is None or layer <= 0 or (layer - 1) not in self._cache:
            return self.model, self.path
        if layer not in self._shadows:
            assert self._blocks_path is not None
            replay = _Replay(self, layer - 1)
            blocks = nn.ModuleList([replay if i < layer else b for i, b in enumerate(self.blocks)])
            shadow = _shadow(self.model, self._blocks_path, blocks)
            self._shadows[layer] = (shadow, hidden_path(shadow))
        return self._shadows[layer]

    def measure(self) -> dict[str, dict[str, float]]:
        """Metrics of the model as it is now (e.g. inside another intervention's context)."""
        return self._run()

    def ablate(self, site: str, idx: Any) -> dict[str, dict[str, float]]:
        """Metrics with neurons ``idx`` of ``site`` ablated."""
        with self._ablated(site, idx):
            return self._run(run=self._model_for(self.sites[site].layer))

    def damage(self, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Loss increase over the baseline, per task."""
        return {t: float(metrics[t]["loss"] - self.baseline[t]["loss"]) for t in self.tasks}

    metric = "next-token loss increase"


# ----------------------------------------------------------------------------------------------------- images


class ImageEvaluator(_Evaluator):
    """Top-1 accuracy of a zoo model on the digits test split, overall (``all``) and per class (``digit-C``)."""

    metric = "top-1 accuracy drop"

    def __init__(self, loaded: LoadedModel, tasks: Iterable[str], *, method: str = "zero",
                 offsets: Mapping[str, torch.Tensor] | None = None) -> None:
        self._check_method(method, offsets)
        self.model, self.sites, self.method, self.offsets = loaded.model, loaded.sites, method, offsets
        self.tasks = list(parse_digit_tasks(list(tasks)))
        split = digits_split()
        self.x, self.y = split.x_test, split.y_test
        self.baseline = self._run()

    def _run(self) -> dict[str, dict[str, float]]:
        with torch.no_grad():
            device = next(self.model.parameters()).device
            lg = image_logits(self.model, self.x.to(device)).float()
        hit = topk_hits(lg, self.y.to(lg.device)).cpu()
        out = {}
        for t in self.tasks:
            keep = torch.ones_like(hit) if t == ALL_DIGITS else self.y == int(t.split("-")[1])
            out[t] = {"top1": float(hit[keep].float().mean()), "images": int(keep.sum())}
        return out

    def measure(self) -> dict[str, dict[str, float]]:
        """Metrics of the model as it is now (e.g. inside another intervention's context)."""
        return self._run()

    def ablate(self, site: str, idx: Any) -> dict[str, dict[str, float]]:
        with self._ablated(site, idx):
            return self._run()

    def damage(self, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Top-1 accuracy drop from the baseline, per task."""
        return {t: float(self.baseline[t]["top1"] - metrics[t]["top1"]) for t in self.tasks}
