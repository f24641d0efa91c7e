"""One task's metrics for whatever head a model has, in one schema.

Every analysis that measures a task (``evaluate``, the task map's selectivity, selective pruning's accuracy curve)
calls :func:`task_metrics`, which returns ``{objective, metric, top1, top10, skip_top1, loss, perplexity, tokens,
nonfinite, ...}``. ``top1`` is the accuracy-like number those analyses compare (1 = intact) and ``metric`` names it:

=================  ==========================  ===============================================================
objective          ``metric``                  ``top1`` / ``loss``
=================  ==========================  ===============================================================
``causal``         next-token top-1            next-token top-1 / cross-entropy (:func:`evaluate_lm`)
``masked``         masked-token top-1          the same on a seeded 15% of masked positions
``image-class``    class top-1                 class accuracy of the task's images / cross-entropy
``representation`` representation similarity  mean cosine similarity of the final hidden states to those of
                                               the *unablated* model / its complement, the cosine distance
=================  ==========================  ===============================================================

``representation`` applies to models without an LM or classification head (head-less encoders such as the bundled
``minilm-l6``). It needs the unablated model's final hidden states (:func:`reference_states`), taken before any
ablation: the similarity is 1 for the unablated model and falls as neurons are removed, so it plays the role of
accuracy (top-10, skip top-1 and perplexity do not apply: ``None``).
"""

from __future__ import annotations

from typing import Any

import torch

from neurospec.errors import NeurospecError
from neurospec.evaluate.metrics import (
    METRIC_NAMES,
    evaluate_lm,
    evaluate_representation,
    most_frequent_tokens,
    reference_states,
    target_rank,
    warn_nonfinite,
)


def objective_of(loaded: Any, blocks: torch.Tensor) -> str:
    """The objective :func:`task_metrics` uses for ``blocks`` on ``loaded`` (a key of ``METRIC_NAMES``)."""
    if loaded.head == "causal-lm":
        return "causal"
    if loaded.head == "masked-lm":
        return "masked"
    if loaded.head == "image-classification" and blocks.is_floating_point():
        return "image-class"
    return "representation"


def needs_reference(loaded: Any, blocks: torch.Tensor) -> bool:
    """True when :func:`task_metrics` needs ``reference=`` (the unablated model's :func:`reference_states`)."""
    return objective_of(loaded, blocks) == "representation"


def metric_name(loaded: Any, blocks: torch.Tensor) -> str:
    """What ``top1`` measures for ``blocks`` on ``loaded`` (e.g. ``"next-token top-1"``)."""
    return METRIC_NAMES[objective_of(loaded, blocks)]


def task_references(loaded: Any, blocks: dict[str, torch.Tensor], *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: reference_states}`` of the tasks that need one (none for models with an LM or class head). Call it
    on the unablated model."""
    return {n: reference_states(loaded, b, batch_size=batch_size) for n, b in blocks.items()
            if needs_reference(loaded, b)}


def task_metrics(
    loaded: Any, blocks: torch.Tensor, *, skip_ids: torch.Tensor | None = None, batch_size: int = 8,
    seed: int = 0, label: int | None = None, reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Metrics of one task's evaluation blocks for whatever head ``loaded`` has (see the module docstring).

    ``blocks``: token ids ``LongTensor[n, seq]`` or images. ``skip_ids``: tokens left out of ``skip_top1``.
    ``label``: the class of an image task. ``reference``: for head-less models, :func:`reference_states` of the
    unablated model on the same blocks.
    """
    objective = objective_of(loaded, blocks)
    if objective == "image-class":
        if label is None:
            raise NeurospecError("image classification metrics need the images' class (an image task's label)")
        return classification_metrics(loaded, blocks, label, batch_size=batch_size)
    if objective in ("causal", "masked"):
        return evaluate_lm(loaded, blocks, batch_size=batch_size, skip_ids=skip_ids, seed=seed)
    if reference is None:
        raise NeurospecError(
            f"model {loaded.name} has head {loaded.head!r} (no language-model or class head): its metric is the "
            "representation similarity to the unablated model, so pass reference=reference_states(model, blocks), "
            "taken before ablating"
        )
    r = evaluate_representation(loaded, blocks, reference, batch_size=batch_size)
    return {"objective": objective, "metric": METRIC_NAMES[objective], "top1": r["cosine"], "top10": None,
            "skip_top1": None, "loss": r["cosine_distance"], "perplexity": None, **r}


def classification_metrics(loaded: Any, images: torch.Tensor, label: int, *, batch_size: int = 64) -> dict:
    """Accuracy of an image classifier on images that all belong to class ``label``, in the keys of
    :func:`neurospec.evaluate.evaluate_lm` (``skip_top1`` = ``top1``; ``tokens`` = images). Hits are counted as in
    :func:`~neurospec.evaluate.metrics.target_rank` (ties against the target, non-finite rows never)."""
    correct = top10 = nonfinite = 0
    loss = 0.0
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(loaded.device, loaded.dtype)
            logits = loaded.model(pixel_values=x).logits.double()
            target = torch.full((x.shape[0],), label, device=logits.device)
            rank, finite = target_rank(logits, target)
            correct += int((finite & (rank < 1)).sum())
            top10 += int((finite & (rank < 10)).sum())
            nonfinite += int((~finite).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    n = images.shape[0]
    warn_nonfinite(nonfinite, n, "images")
    return {"objective": "image-class", "metric": METRIC_NAMES["image-class"], "top1": correct / n,
            "top10": top10 / n, "skip_top1": correct / n, "loss": loss / n,
            "perplexity": float(torch.tensor(loss / n).exp()), "tokens": n, "nonfinite": nonfinite}


def skip_ids_for(blocks: torch.Tensor, n: int = 50) -> torch.Tensor | None:
    """The ``n`` most frequent tokens of a task's collection split (left out by the "skip" top-1); ``None`` for
    image tasks."""
    if blocks.is_floating_point():
        return None
    return most_frequent_tokens(blocks, n=n)
