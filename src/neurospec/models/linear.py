"""One view of the two linear-layer classes found in Hugging Face transformers.

``nn.Linear`` stores its weight as ``[out, in]``; GPT-2's ``Conv1D`` stores it as ``[in, out]``. Everything in
neurospec that reads or folds into a weight goes through these helpers, so the transposition lives in one place.
"""

from __future__ import annotations

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as ``[in, out]`` (transformers' ``Conv1D``)."""
    return not isinstance(module, nn.Linear) and type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear module."""
    w = module.weight
    if is_transposed(module):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an ``[out, in]`` tensor (a view, no copy): row ``o`` maps the input to output ``o``."""
    w = module.weight
    return w.t() if is_transposed(module) else w
