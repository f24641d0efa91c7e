"""One view of the two linear-layer classes found in Hugging Face transformers.

``nn.Linear`` stores its weight as ``[out, in]``; GPT-2's ``Conv1D`` stores it as ``[in, out]``. Everything in
neurospec that reads or folds into a weight goes through these helpers, so the transposition lives in one place.

A sparse-expanded layer (``neurospec.sparsity.expansion.ExpandedLinear``, marked by ``is_expanded_linear = True``)
counts as linear (sites, hooks and output recording find it) but has one weight per cluster: ``weight_out_in``
refuses it with an error instead of returning a matrix that does not compute its output.
"""

from __future__ import annotations

import torch
from torch import nn

from neurospec.errors import NeurospecError


def is_expanded(module: nn.Module) -> bool:
    """True for a sparse-expanded linear layer (one weight per input cluster)."""
    return getattr(module, "is_expanded_linear", False) is True


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    if isinstance(module, nn.Linear) or is_expanded(module):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as ``[in, out]`` (transformers' ``Conv1D``)."""
    return not isinstance(module, nn.Linear) and type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear module."""
    if is_expanded(module):
        return int(module.in_features), int(module.out_features)
    w = module.weight
    if is_transposed(module):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an ``[out, in]`` tensor (a view, no copy): row ``o`` maps the input to output ``o``."""
    if is_expanded(module):
        raise NeurospecError(
            f"{type(module).__name__} is a sparse-expanded layer with one weight per input cluster, not one [out, in] "
            "matrix: prune, ablate or compare weights on the model before expansion"
        )
    w = module.weight
    return w.t() if is_transposed(module) else w
