"""Wanda: score ``|W_ij| * ||X_j||_2`` (``||X_j||`` the norm of input feature ``j`` over the calibration tokens),
compared within each output row: the ``int(in * sparsity)`` lowest of each row are pruned (N:M: the N lowest of
every M consecutive inputs of a row). No weight update."""

from __future__ import annotations

import torch

from neurospec.sparsity.patterns import SparsityPattern, lowest_per_group, lowest_per_row
from neurospec.sparsity.registry import LayerResult, PruningMethod, register_method


def wanda(weight: torch.Tensor, norms: torch.Tensor, pattern: SparsityPattern) -> LayerResult:
    """Prune ``weight [out, in]`` with the input norms ``norms [in]`` (:class:`~neurospec.sparsity.stats.InputNorms`)."""
    w = weight.detach()
    score = w.abs().to(torch.float64) * norms.to(w.device, torch.float64)[None, :]
    if pattern.structured:
        pruned = lowest_per_group(score, pattern.n, pattern.m)
    else:
        pruned = lowest_per_row(score, int(score.shape[1] * pattern.sparsity))
    return LayerResult(w.masked_fill(pruned, 0), pruned)


register_method(PruningMethod("wanda", wanda, "norms", False, "|W| x input norm, per output row"))
