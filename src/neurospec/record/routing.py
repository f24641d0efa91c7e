"""Router statistics of a mixture-of-experts layer: which experts a task's tokens go to.

Each routed expert's site records, beside its neuron statistics, an :class:`ExpertRouting` accumulator (name
``"routing"`` in the site's group) that counts the tokens entering the layer, the tokens whose top-k choice includes
this expert, and the sum of the routing weights they gave it. :func:`routing_usage` assembles them per layer:
``fraction[e]`` is the share of the task's tokens routed to expert ``e`` (the fractions of a layer sum to ``k``,
the number of experts each token uses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from neurospec.errors import RunStoreError
from neurospec.models.sites import parse_site_expert, parse_site_name
from neurospec.record.base import Accumulator


class ExpertRouting(Accumulator):
    """Routing counts of one expert: ``tokens`` (all tokens entering its layer), ``routed`` (tokens whose top-k
    includes it), ``weight`` (sum of the routing weights those tokens gave it); float64 ``[1]`` each."""

    kind: ClassVar[str] = "routing"
    reductions: ClassVar[dict[str, str]] = {"tokens": "sum", "routed": "sum", "weight": "sum"}

    def __init__(self, expert: int) -> None:
        if not isinstance(expert, int) or isinstance(expert, bool) or expert < 0:
            raise ValueError(f"ExpertRouting: expert must be an int >= 0, got {expert!r}")
        self.expert = expert
        super().__init__()

    def _initial_state(self) -> dict[str, Tensor]:
        return {k: torch.zeros(1, dtype=torch.float64) for k in self.reductions}

    def update(self, top_k_index: Tensor, top_k_weights: Tensor) -> None:  # type: ignore[override]
        """Add one forward's routing: ``top_k_index`` and ``top_k_weights``, ``[tokens, k]`` each."""
        if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
            raise ValueError(
                f"ExpertRouting: expected top_k_index and top_k_weights of the same shape [tokens, k], got "
                f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
            )
        chosen = top_k_index == self.expert
        s = self._state
        s["tokens"] += top_k_index.shape[0]
        s["routed"] += int(chosen.any(dim=-1).sum())
        s["weight"] += float(top_k_weights.detach().double()[chosen].sum())

    def compute(self) -> dict[str, Tensor]:
        """``tokens``, ``routed``, ``fraction`` (routed / tokens) and ``mean_weight`` (the mean routing weight of the
        routed tokens; NaN when none was routed), float64 ``[1]`` each."""
        s = self._state
        tokens, routed = s["tokens"].clone(), s["routed"].clone()
        nan = torch.full_like(tokens, float("nan"))
        return {
            "tokens": tokens,
            "routed": routed,
            "fraction": torch.where(tokens > 0, routed / tokens.clamp(min=1), nan),
            "mean_weight": torch.where(routed > 0, s["weight"] / routed.clamp(min=1), nan),
        }

    def meta(self) -> dict[str, Any]:
        return {"expert": self.expert}


def routing_usage(accumulators: Mapping[str, Mapping[str, Any]]) -> dict[int, dict[str, Tensor]]:
    """Per mixture-of-experts layer, the routing of one task: ``{layer: {"fraction": Tensor[n_experts],
    "mean_weight": Tensor[n_experts], "tokens": Tensor[1]}}``, from a task's accumulators (``run.accumulators(task)``
    or what :func:`~neurospec.record.recorder.record_task` returns). Experts whose site was not recorded are NaN."""
    per_layer: dict[int, dict[int, dict[str, Tensor]]] = {}
    for site, group in accumulators.items():
        acc = group.get("routing")
        if acc is None:
            continue
        expert = parse_site_expert(site)
        per_layer.setdefault(parse_site_name(site)[0], {})[int(expert)] = acc.compute()
    if not per_layer:
        raise RunStoreError(
            "these recordings hold no router statistics: the model has no mixture-of-experts layer, or its expert "
            "sites (kind 'mlp') were not recorded"
        )
    out: dict[int, dict[str, Tensor]] = {}
    for layer, experts in sorted(per_layer.items()):
        n = 1 + max(experts)
        fraction = torch.full((n,), float("nan"), dtype=torch.float64)
        weight = fraction.clone()
        for e, c in experts.items():
            fraction[e], weight[e] = c["fraction"][0], c["mean_weight"][0]
        out[layer] = {"fraction": fraction, "mean_weight": weight, "tokens": next(iter(experts.values()))["tokens"]}
    return out
