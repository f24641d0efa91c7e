"""Evaluation: next-token / masked-token metrics of language models and representation change of encoders."""

from neurospec.evaluate.metrics import (
    evaluate_lm,
    evaluate_representation,
    has_lm_head,
    mlm_positions,
    most_frequent_tokens,
    reference_states,
    unwrap_model,
)

__all__ = [
    "evaluate_lm",
    "evaluate_representation",
    "has_lm_head",
    "mlm_positions",
    "most_frequent_tokens",
    "reference_states",
    "unwrap_model",
]
