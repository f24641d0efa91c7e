"""Stream a labelled task through a prompted model into the skill-neuron accumulators (two passes, sums only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neurospec.data.labelled import LabelledTask
from neurospec.models.sites import Site
from neurospec.skills.predictivity import ExceedCounts, PromptMeans
from neurospec.skills.prompting import Prompt, PromptedModel, capture


def n_positions(task: LabelledTask, prompt: Prompt | None) -> int:
    return 1 if task.kind == "image" else prompt.length


def prompt_statistics(pm: PromptedModel, task: LabelledTask, prompt: Prompt | None, sites: Sequence[Site],
                      *, batch_size: int = 16) -> dict[str, ExceedCounts]:
    """``{site: ExceedCounts}`` of ``task``'s dev split against the training means (module docstring of
    :mod:`neurospec.skills.predictivity`). Cost: one forward pass of the body per train and dev example."""
    P = n_positions(task, prompt)
    model = pm.loaded.model
    means = {s.name: PromptMeans(P, s.width) for s in sites}
    items, _ = task.split("train")
    with torch.inference_mode(), capture(model, sites, lambda: pm.current_positions,
                                         lambda name, x: means[name].update(x)):
        for i in range(0, len(items), batch_size):
            pm.run_body(items[i : i + batch_size], prompt)
    counts = {s.name: ExceedCounts(task.n_classes, P, s.width, means[s.name].compute()["mean"]) for s in sites}
    items, labels = task.split("dev")
    batch_labels: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), capture(model, sites, lambda: pm.current_positions,
                                         lambda name, x: counts[name].update(x, batch_labels["y"])):
        for i in range(0, len(items), batch_size):
            batch_labels["y"] = torch.as_tensor(labels[i : i + batch_size])
            pm.run_body(items[i : i + batch_size], prompt)
    return counts
