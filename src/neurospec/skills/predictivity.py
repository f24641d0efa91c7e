"""Skill-neuron predictivity from streaming statistics (METHODS.md section 4), and per-layer top-p selection.

Two passes, each keeping only sums (never an activation tensor):

1. :class:`PromptMeans` over the training split: ``a_bsl[p, i]`` = the mean activation of neuron ``i`` at prompt
   position ``p``;
2. :class:`ExceedCounts` over the dev split: per class ``c``, how many examples have ``a[p, i] > a_bsl[p, i]``.

From those, :func:`subtask_accuracy` gives ``Acc[s, p, i]`` for each binary sub-task ``s``: for a binary task the
one sub-task "class 1 vs class 0", ``Acc = mean over dev of 1[(a > a_bsl) == label]`` (the splits are balanced, so
this is also the mean of the two per-class rates); for ``C > 2`` classes one sub-task per class ``c`` (one vs
rest), made balanced by weighting: ``Acc = (rate_c + 1 - rate_rest) / 2`` where ``rate`` is the fraction of
examples above the baseline, i.e. the accuracy on a sub-task whose "rest" examples are reweighted to as many as
class ``c``. All sub-tasks share the training mean as baseline (over the class-balanced training split this is the
mean of the class means; a per-sub-task baseline would need ``C`` times the dev counts).

:func:`predictivity` = max over prompt positions of ``max(Acc, 1 - Acc)`` ``[S, width]``; the task's score per
neuron reduces sub-tasks by max (a neuron that separates any class; option: mean). :func:`aggregate` combines prompt
runs (seeds) by mean (default) or min. :func:`select_top_p` takes the same fraction of every layer.

Dimensions: ``P`` prompt positions, ``width`` neurons of a site, ``C`` classes, ``S`` sub-tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.record.base import Accumulator

AGGREGATES = ("mean", "min")
CLASS_REDUCE = ("max", "mean")


class PromptMeans(Accumulator):
    """Sum and count of activations ``[batch, P, width]`` per (position, neuron): the baseline ``a_bsl``."""

    kind = "skill_prompt_means"
    reductions = {"sum": "sum", "count": "sum"}

    def __init__(self, positions: int, width: int) -> None:
        self.positions, self.width = int(positions), int(width)
        super().__init__()

    def _initial_state(self) -> dict[str, Tensor]:
        return {"sum": torch.zeros(self.positions, self.width, dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.int64)}

    def _check(self, x: Tensor) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.positions, self.width):
            raise ValueError(f"expected activations [batch, {self.positions}, {self.width}], got {tuple(x.shape)}")

    def update(self, x: Tensor) -> None:
        self._check(x)
        self._state["sum"].add_(x.detach().to(torch.float64).sum(0).cpu())
        self._state["count"].add_(x.shape[0])

    def compute(self) -> dict[str, Tensor]:
        n = int(self._state["count"])
        if n == 0:
            raise NeurospecError("no training example was seen: the baseline mean is undefined")
        return {"mean": self._state["sum"] / n}

    def meta(self) -> dict[str, Any]:
        return {"positions": self.positions, "width": self.width}


class ExceedCounts(Accumulator):
    """Per class, the count of examples with ``a[p, i] > baseline[p, i]``, and the examples per class.

    ``update(x [batch, P, width], labels [batch])``. The baseline is part of the state (rule ``same``: two
    accumulators merge only if their baselines agree).
    """

    kind = "skill_exceed_counts"
    reductions = {"above": "sum", "class_count": "sum", "baseline": "same"}

    def __init__(self, n_classes: int, positions: int, width: int, baseline: Tensor | None = None) -> None:
        self.n_classes, self.positions, self.width = int(n_classes), int(positions), int(width)
        super().__init__()
        if baseline is not None:
            self._state["baseline"].copy_(baseline.to(torch.float64))

    def _initial_state(self) -> dict[str, Tensor]:
        return {"above": torch.zeros(self.n_classes, self.positions, self.width, dtype=torch.int64),
                "class_count": torch.zeros(self.n_classes, dtype=torch.int64),
                "baseline": torch.full((self.positions, self.width), float("nan"), dtype=torch.float64)}

    def update(self, x: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.positions, self.width):
            raise ValueError(f"expected activations [batch, {self.positions}, {self.width}], got {tuple(x.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        base = self._state["baseline"]
        if torch.isnan(base).any():
            raise NeurospecError("ExceedCounts needs the baseline (training means) before counting")
        above = (x.detach().to(torch.float64).cpu() > base).to(torch.int64)
        self._state["above"].index_add_(0, labels, above)
        self._state["class_count"].add_(torch.bincount(labels, minlength=self.n_classes))

    def compute(self) -> dict[str, Tensor]:
        return {"accuracy": subtask_accuracy(self._state["above"], self._state["class_count"])}

    def meta(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "positions": self.positions, "width": self.width}


def subtask_accuracy(above: Tensor, class_count: Tensor) -> Tensor:
    """``Acc [S, P, width]`` from counts ``above [C, P, width]`` and ``class_count [C]`` (module docstring)."""
    n = class_count.to(torch.float64)
    if (n == 0).any():
        missing = (n == 0).nonzero().flatten().tolist()
        raise NeurospecError(f"the dev split has no example of class(es) {missing}: predictivity is undefined")
    rate = above.to(torch.float64) / n[:, None, None]
    if above.shape[0] == 2:
        return (0.5 * (rate[1] + 1.0 - rate[0]))[None]
    total_above = above.to(torch.float64).sum(0)
    rest_rate = (total_above[None] - above.to(torch.float64)) / (n.sum() - n)[:, None, None]
    return 0.5 * (rate + 1.0 - rest_rate)


def predictivity(accuracy: Tensor) -> Tensor:
    """``[S, width]``: max over prompt positions of ``max(Acc, 1 - Acc)``."""
    return torch.maximum(accuracy, 1.0 - accuracy).amax(dim=1)


def task_scores(pred: Tensor, class_reduce: str = "max") -> Tensor:
    """One score per neuron ``[width]`` from the sub-task predictivities ``[S, width]``."""
    if class_reduce not in CLASS_REDUCE:
        raise NeurospecError(f"class_reduce must be one of {CLASS_REDUCE}, got {class_reduce!r}")
    return pred.amax(0) if class_reduce == "max" else pred.mean(0)


def aggregate(runs: Sequence[Tensor], how: str = "mean") -> Tensor:
    """Combine the scores of several prompt runs (seeds): elementwise mean (default) or min."""
    if how not in AGGREGATES:
        raise NeurospecError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if not runs:
        raise NeurospecError("no prompt run to aggregate")
    stacked = torch.stack(list(runs))
    return stacked.mean(0) if how == "mean" else stacked.amin(0)


def seed_of(*parts: Any) -> int:
    """A reproducible 63-bit seed from any parts (sha256; never Python's salted ``hash()``)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def per_layer_count(p: float, width: int) -> int:
    """Neurons taken from a layer of ``width`` at fraction ``p`` (rounded to the nearest integer)."""
    if not 0.0 <= p <= 1.0:
        raise NeurospecError(f"the fraction p must lie in [0, 1], got {p}")
    return int(round(p * width + 1e-9))


def select_top_p(scores: Mapping[str, Tensor], p: float, *, key: str = "") -> dict[str, Tensor]:
    """The top ``p`` of each site's neurons by score (equal fraction per layer): ``{site: sorted indices}``.

    Ties are broken by a seeded order of the neurons (from ``key`` and the site), so the choice is reproducible.
    """
    out = {}
    for site, s in scores.items():
        k = per_layer_count(p, s.numel())
        g = torch.Generator().manual_seed(seed_of("ties", key, site))
        perm = torch.randperm(s.numel(), generator=g)
        order = perm[torch.sort(s.flatten()[perm].double(), descending=True, stable=True).indices]
        out[site] = torch.sort(order[:k]).values
    return out


def random_same_counts(counts: Mapping[str, tuple[int, int]], *, key: str) -> dict[str, Tensor]:
    """A random set with ``k`` of ``width`` neurons per site (``counts: {site: (k, width)}``), seeded by ``key``."""
    out = {}
    for site, (k, width) in counts.items():
        g = torch.Generator().manual_seed(seed_of("random-set", key, site))
        out[site] = torch.sort(torch.randperm(width, generator=g)[:k]).values
    return out
