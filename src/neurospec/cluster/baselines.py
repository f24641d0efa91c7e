"""Shuffled baselines of weight graphs: seeded shuffles of the weight matrices a weight graph reads.

METHODS.md section 3: a network's weight graph is compared with the graphs of networks whose layers keep their weights
but in a random order. :func:`shuffle_weights` permutes the entries of every weight matrix the weight graph reads,
independently and seeded (so each matrix keeps its multiset of values, its shape and its scale);
:func:`shuffle_seeds` derives the seeds of a baseline's shuffles. The significance test built on them is
:func:`neurospec.analyze.clusterability.clusterability`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from neurospec.cluster.moefication import model_and_sites


def shuffle_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent seeds derived from one (the shuffles of a baseline)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def shuffle_weights(model: Any, *, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` in which every weight matrix a weight graph reads has its entries permuted.

    Plain MLP stacks: every ``nn.Linear`` weight. Transformers (or a ``LoadedModel``): every MLP's input and output
    projections (biases, attention, norms and embeddings are unchanged). Each matrix gets its own permutation from
    one seeded generator. Memory: a full copy of the model.
    """
    gen = torch.Generator().manual_seed(int(seed))
    slices: list[torch.Tensor] = []  # routed experts: their slices of the fused gate_up_proj and down_proj
    if isinstance(model, nn.Module) and getattr(model, "config", None) is None:
        out = copy.deepcopy(model)
        targets = [m for m in out.modules() if isinstance(m, nn.Linear)]
    else:
        module, sites = model_and_sites(model)
        out = copy.deepcopy(module)
        paths: list[str] = []
        for s in sites.of_kind("mlp"):
            if s.expert is not None:
                experts = out.get_submodule(s.module)
                slices += [experts.gate_up_proj[s.expert], experts.down_proj[s.expert]]
            else:
                paths += [*s.inputs, s.module]
        targets = [out.get_submodule(p) for p in paths]
    with torch.no_grad():
        for w in [m.weight for m in targets] + slices:
            w.copy_(w.reshape(-1)[torch.randperm(w.numel(), generator=gen)].reshape(w.shape))
    return out
