"""Interventions: neuron sets and ablations (temporary in a ``with`` block, or folded permanently into weights)."""

from neurospec.intervene.ablate import (
    AblationInfo,
    AblationMethod,
    ablated,
    ablation_methods,
    fold_ablation,
    folded_copy,
    get_ablation,
    register_ablation,
)
from neurospec.intervene.neuronset import NeuronSet

__all__ = [
    "AblationInfo",
    "AblationMethod",
    "NeuronSet",
    "ablated",
    "ablation_methods",
    "fold_ablation",
    "folded_copy",
    "get_ablation",
    "register_ablation",
]
