"""Write a sparsified model as a plain Hugging Face model directory (safetensors) that any loader reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from neurospec.errors import NeurospecError
from neurospec.models.linear import is_expanded


def save_sparse(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """``model.save_pretrained(directory)`` with safetensors, and the tokenizer beside it when given. The zeros are
    stored densely: the directory loads with ``load_model`` or ``from_pretrained`` like the original."""
    if any(is_expanded(m) for m in model.modules()):
        raise NeurospecError(
            "a sparse-expanded model cannot be saved as a Hugging Face model: its expanded layers hold one weight per "
            "input cluster and a router, which no transformers class loads; save the plain SparseGPT model instead, "
            "or keep the expanded model in memory"
        )
    if not hasattr(model, "save_pretrained"):
        raise NeurospecError(f"{type(model).__name__} is not a Hugging Face model: it cannot be saved as one")
    directory = Path(directory)
    try:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
    except OSError as e:
        raise NeurospecError(f"cannot write the model to {directory}: {e}") from None
    return directory
