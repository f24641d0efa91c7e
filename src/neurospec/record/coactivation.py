"""Co-moments of the rectified activations ``relu(x)`` of one site: the co-activation graph of MoEfication.

METHODS.md section 6: the co-activation graph weighs the edge between neurons ``i`` and ``j`` by
``sum_t relu(x_ti) relu(x_tj)`` over tokens. The raw co-moments of :class:`~neurospec.record.comoments.CoMoments`
cannot give it for SiLU/GELU activations (the positive parts' products are not a function of the raw moments), so
this accumulator records the co-moments of ``relu(x)`` instead; ``cov + outer(mean, mean)`` of its result is the
mean co-activation ``(1/T) sum_t relu(x_t) relu(x_t)^T``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from neurospec.record.base import as_rows
from neurospec.record.comoments import CoMoments


class ReluCoMoments(CoMoments):
    """:class:`~neurospec.record.comoments.CoMoments` of ``relu(x)``: same state, precision, cost and ``compute()``
    (``mean``, ``cov``, ``corr`` of the rectified activations). Rows of ``x`` with any non-finite value (``-inf``
    included, although its positive part is 0) are dropped, as :class:`CoMoments` drops them.

    :meth:`coactivation` gives the mean co-activation matrix ``E[relu(x_i) relu(x_j)]``.
    """

    kind: ClassVar[str] = "relu_comoments"

    def update(self, x: Tensor) -> None:
        """Add a batch ``x`` ``[tokens, width]`` (raw activations; the accumulator rectifies them)."""
        x = as_rows(x, self.width, "ReluCoMoments")
        # a row with -inf would become finite after the clamp; turn it into NaN so that CoMoments drops it
        r = torch.where(x == float("-inf"), float("nan"), x.clamp(min=0))
        super().update(r)

    def coactivation(self) -> Tensor:
        """``[width, width]`` float64 mean co-activation ``(1/T) sum_t relu(x_t) relu(x_t)^T`` (NaN if empty)."""
        c = self.compute()
        return c["cov"] + torch.outer(c["mean"], c["mean"])
