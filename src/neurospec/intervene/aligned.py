"""Position-aligned reference activations for resample ablation (METHODS.md section 2: "position-aligned or not").

A run's reservoir keeps token rows in a random order, so the position of each row is lost. Position-aligned
resampling needs the activations of whole reference sequences: :func:`position_aligned_samples` runs the unablated
model on reference blocks and keeps each site's input ``[n_seq, seq, width]``, the 3-D form that
:func:`neurospec.intervene.ablate.ablated` reads as "take position ``p`` of a random reference sequence".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from neurospec.errors import NeurospecError
from neurospec.evaluate.metrics import unwrap_model
from neurospec.models.sites import Site, Sites, find_sites


@torch.no_grad()
def position_aligned_samples(
    model: Any, blocks: torch.Tensor, *, sites: Sites | None = None, site_names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``{site: float32 [n_seq, seq, width]}``: each site's input on the token blocks ``blocks`` ``[n_seq, seq]``.

    ``model``: a ``LoadedModel`` or a transformers model; ``sites``: its sites (default: found from the model);
    ``site_names``: the sites to keep (default all). Memory: ``n_seq * seq * width * 4`` bytes per site, on the CPU.
    The model is not changed (forward pre-hooks, removed on exit).
    """
    module, _ = unwrap_model(model)
    if sites is None:
        sites = getattr(model, "sites", None)
        sites = find_sites(module) if sites is None else sites
    blocks = torch.as_tensor(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        raise NeurospecError(f"reference blocks must be a non-empty [n_seq, seq] tensor, got {tuple(blocks.shape)}")
    chosen: list[Site] = [sites[n] for n in site_names] if site_names is not None else list(sites.sites)
    routed = [s.name for s in chosen if s.expert is not None]
    if routed:
        raise NeurospecError(
            f"position-aligned samples need whole sequences, but the routed expert site {routed[0]} sees only the "
            "tokens routed to it; resample experts from token rows (a run's reservoir) instead"
        )
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in chosen}

    def make_hook(site: Site):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            parts[site.name].append(x.detach().reshape(x.shape[0], -1, site.width).float().cpu())

        return hook

    handles = [module.get_submodule(s.module).register_forward_pre_hook(make_hook(s), with_kwargs=True)
               for s in chosen]
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    device = emb.weight.device if emb is not None else next(module.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            module(input_ids=blocks[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in parts.items()}
