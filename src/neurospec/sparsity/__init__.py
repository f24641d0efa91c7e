"""Weight sparsity: magnitude, Wanda and SparseGPT pruning of a model's linear layers.

- ``patterns``: unstructured or N:M patterns (:func:`make_pattern`);
- ``stats``: calibration statistics streamed over tokens (input norms, Hessian);
- ``registry`` + ``magnitude``, ``wanda``, ``sparsegpt``: the per-layer methods (:func:`methods`);
- ``layer``: :func:`prune_weight`, one matrix or some of its rows;
- ``driver``: :func:`sparsify`, the whole model, block by block on calibration tokens;
- ``error``: per-neuron relative output error; ``save``: a plain Hugging Face directory;
- ``expansion``: sparse expansion (:func:`expand`), one SparseGPT copy of each MLP linear per input cluster.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SparsityPattern": "neurospec.sparsity.patterns",
    "SparsityError": "neurospec.sparsity.patterns",
    "make_pattern": "neurospec.sparsity.patterns",
    "InputNorms": "neurospec.sparsity.stats",
    "InputHessian": "neurospec.sparsity.stats",
    "PruningMethod": "neurospec.sparsity.registry",
    "LayerResult": "neurospec.sparsity.registry",
    "register_method": "neurospec.sparsity.registry",
    "methods": "neurospec.sparsity.registry",
    "get_method": "neurospec.sparsity.registry",
    "prune_weight": "neurospec.sparsity.layer",
    "sparsify": "neurospec.sparsity.driver",
    "SparsifyResult": "neurospec.sparsity.driver",
    "list_linears": "neurospec.sparsity.driver",
    "select_linears": "neurospec.sparsity.driver",
    "relative_output_error": "neurospec.sparsity.error",
    "neuron_output_error": "neurospec.sparsity.error",
    "save_sparse": "neurospec.sparsity.save",
    "ExpandedLinear": "neurospec.sparsity.expansion",
    "ExpansionResult": "neurospec.sparsity.expansion",
    "expand": "neurospec.sparsity.expansion",
    "expansion_error": "neurospec.sparsity.expansion",
    "expansion_memory": "neurospec.sparsity.expansion",
    "mlp_linears": "neurospec.sparsity.expansion",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurospec.sparsity' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
