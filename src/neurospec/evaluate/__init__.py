"""Evaluation: next-token / masked-token metrics of language models, class accuracy of image classifiers and
representation change of head-less encoders, with one definition of a top-k hit (:func:`target_rank`)."""

from neurospec.evaluate.metrics import (
    METRIC_NAMES,
    evaluate_lm,
    evaluate_representation,
    has_lm_head,
    mlm_positions,
    most_frequent_tokens,
    reference_states,
    target_rank,
    topk_hits,
    unwrap_model,
)
from neurospec.evaluate.tasks import (
    classification_metrics,
    metric_name,
    needs_reference,
    objective_of,
    task_metrics,
    task_references,
)

__all__ = [
    "METRIC_NAMES",
    "classification_metrics",
    "evaluate_lm",
    "evaluate_representation",
    "has_lm_head",
    "metric_name",
    "mlm_positions",
    "most_frequent_tokens",
    "needs_reference",
    "objective_of",
    "reference_states",
    "target_rank",
    "task_metrics",
    "task_references",
    "topk_hits",
    "unwrap_model",
]
