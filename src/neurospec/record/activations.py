"""Whole activation tensors of small models, for analyses that need every token at once (the digits models).

:func:`image_activations` runs images through a model and keeps each site's input, per token: for the ViT every
position (CLS and 16 patches) of every image counts once, for the MLP every image. The hooks are forward pre-hooks on
the sites' reading modules (as the recorder's), removed afterwards. :func:`accumulate` feeds such tensors to
accumulators; :func:`dead_mask` marks the neurons that never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neurospec.models.digits import image_logits
from neurospec.models.loading import LoadedModel
from neurospec.models.sites import Site
from neurospec.record.comoments import CoMoments


@torch.no_grad()
def image_activations(loaded: LoadedModel, images: torch.Tensor, sites: Any = None, *,
                      batch_size: int = 512) -> dict[str, torch.Tensor]:
    """``{site: float32 [tokens, width]}`` activations of images ``[n, 1, 8, 8]`` at the MLP sites (default all)."""
    chosen = loaded.mlp_sites() if sites is None else tuple(loaded.sites[s] if isinstance(s, str) else s
                                                            for s in sites)
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in chosen}
    handles = []

    def make_hook(site: Site):
        def hook(_m, args):
            parts[site.name].append(args[0].detach().reshape(-1, site.width).float().cpu())

        return hook

    for s in chosen:
        handles.append(loaded.model.get_submodule(s.module).register_forward_pre_hook(make_hook(s)))
    device = next(loaded.model.parameters()).device
    try:
        for i in range(0, images.shape[0], batch_size):
            image_logits(loaded.model, images[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v) for s, v in parts.items()}


def accumulate(acts: Mapping[str, torch.Tensor], accumulator: type) -> dict[str, dict[str, torch.Tensor]]:
    """``accumulator(width)`` fed with each site's ``[tokens, width]`` activations, computed: ``{site: result}``."""
    out = {}
    for s, x in acts.items():
        acc = accumulator(x.shape[1])
        acc.update(x)
        out[s] = acc.compute()
    return out


def comoments_of(acts: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{site: {"mean", "cov", "corr"}}``: the co-moments of each site's ``[tokens, width]`` activations."""
    return accumulate(acts, CoMoments)


def dead_mask(acts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{site: bool [width]}``: True for neurons that are constant on these activations (dead)."""
    return {s: (x.double().std(dim=0) == 0) for s, x in acts.items()}
