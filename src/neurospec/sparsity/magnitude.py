"""Magnitude pruning: the smallest ``|W_ij|`` go, with one threshold over the whole matrix (unstructured) or the
N smallest of every M consecutive inputs of a row (N:M). No calibration, no weight update."""

from __future__ import annotations

import torch

from neurospec.sparsity.patterns import SparsityPattern, lowest_overall, lowest_per_group
from neurospec.sparsity.registry import LayerResult, PruningMethod, register_method


def magnitude(weight: torch.Tensor, stat: None, pattern: SparsityPattern) -> LayerResult:
    """Prune ``weight [out, in]`` by magnitude: ``int(out * in * sparsity)`` weights under one threshold."""
    score = weight.detach().abs()
    if pattern.structured:
        pruned = lowest_per_group(score, pattern.n, pattern.m)
    else:
        pruned = lowest_overall(score, int(score.numel() * pattern.sparsity))
    return LayerResult(weight.detach().masked_fill(pruned, 0), pruned)


register_method(PruningMethod("magnitude", magnitude, "none", False, "smallest |W| per matrix (one threshold)"))
