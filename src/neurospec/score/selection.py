"""Choosing neurons by score: the top fraction of each site kind, per site or over all layers at once.

:func:`select` is the one rule of every pipeline (selective pruning, the task map, their tests); tied scores are put
in a seeded random order per model and task by :func:`selection_keys`
(:func:`~neurospec.score.selective.tie_break_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from neurospec.errors import NeurospecError
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.sites import parse_site_name
from neurospec.score.selective import tie_break_keys


def select(scores: Mapping[str, torch.Tensor], frac: float, attn_frac: float, scope: str,
           exclude: NeuronSet | None = None, sites=None, heads: str | None = None,
           keys: Mapping[str, torch.Tensor] | None = None) -> NeuronSet:
    """Top ``frac`` of MLP and ``attn_frac`` of attention neurons by score (excluded neurons never chosen).

    ``heads="mean"`` or ``"median"``: attention is selected as whole heads (``attn_frac`` of all heads), a head
    scored by the mean or median of its neurons' scores. ``keys``: the order used for single neurons instead of the
    scores, e.g. :func:`neurospec.score.selective.tie_break_keys` (the same order, ties broken at random per task).
    """
    parts = []
    for kind, f in (("mlp", frac), ("attn", attn_frac)):
        by_neuron = keys if keys is not None and not (kind == "attn" and heads is not None) else scores
        sc = {s: v.clone() for s, v in by_neuron.items() if parse_site_name(s)[1] == kind}  # experts are MLP sites
        if not sc or f <= 0:
            continue
        if exclude is not None:
            for s in sc:
                if s in exclude.site_names:
                    sc[s][exclude.mask(s)] = -torch.inf
        if kind == "attn" and heads is not None:
            if sites is None:
                raise NeurospecError("selecting whole heads needs the model's sites")
            parts.append(NeuronSet.top_heads(sc, sites, frac=f, reduce=heads, scope=scope))
        else:
            parts.append(NeuronSet.top_k(sc, frac=f, scope=scope, sites=sites))
    if not parts:
        raise NeurospecError("no site of the requested kinds was recorded")
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out


def selection_keys(scores_by_task: Mapping[str, Mapping[str, torch.Tensor]], seed: int, model: str) -> dict[str, dict[str, torch.Tensor]]:
    """Selection keys of each task: its scores' order, ties in a random order seeded per model and task."""
    return {t: tie_break_keys(sc, seed, model=model, task=t) for t, sc in scores_by_task.items()}


def select_kind(scores, frac: float, kind: str, sites):
    """The top ``frac`` of one site kind's neurons, ranked over all layers at once. ``scores``: the selection keys
    of :func:`selection_keys` (raw scores work too, but then ties go to the earlier layer and the lower index)."""
    return select(scores, frac if kind == "mlp" else 0.0, frac if kind == "attn" else 0.0, "global", sites=sites)


def kind_masks(scores, frac: float, kind: str, sites) -> dict[str, torch.Tensor]:
    """``{site: bool [width]}`` of :func:`select_kind`'s neurons, for every site of ``scores`` (all False where none)."""
    ns = select_kind(scores, frac, kind, sites)
    return {s: ns.mask(s) if s in ns.site_names else torch.zeros(v.numel(), dtype=torch.bool)
            for s, v in scores.items()}
