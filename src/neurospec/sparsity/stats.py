"""Calibration statistics of a linear layer's inputs, streamed over tokens with float64 state.

- :class:`InputNorms` (Wanda): per input feature ``j``, ``sum_t x_tj^2``; ``compute()`` gives ``||X_j||_2``.
- :class:`InputHessian` (SparseGPT): ``sum_t x_t x_t^T``; ``compute()`` gives ``H = (2/N) sum_t x_t x_t^T``
  and :meth:`InputHessian.second_moment` the unscaled sum (used by the per-neuron output error).

Each ``update(x)`` takes ``x: [tokens, in]`` (any leading dimensions are flattened); the partial sum of one batch
is computed in float32 (float64 when ``x`` is float64) on ``x``'s device and added into float64 state on that
device, so memory does not grow with the number of tokens: ``in`` floats for the norms, ``in x in`` for the
Hessian. ``merge`` adds another accumulator's sums exactly; any subset of tokens (e.g. one cluster's) can be fed.
"""

from __future__ import annotations

import torch

from neurospec.errors import NeurospecError


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _InputStats:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def _add(self, part: torch.Tensor, n: int) -> None:
        part = part.to(torch.float64)
        self.sum = part if self.sum is None else self.sum.add_(part.to(self.sum.device))
        self.count += n

    def merge(self, other: _InputStats) -> _InputStats:
        if type(other) is not type(self):
            raise NeurospecError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.sum is not None:
            self._add(other.sum, other.count)
        return self

    def _check(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise NeurospecError(f"{type(self).__name__} has seen no tokens: feed calibration inputs first")
        return self.sum


class InputNorms(_InputStats):
    """Per-input-feature L2 norm over the calibration tokens (Wanda's ``||X_j||_2``)."""

    def update(self, x: torch.Tensor) -> None:
        x = _flat(x)
        self._add(x.square().sum(0), x.shape[0])

    def compute(self) -> torch.Tensor:
        """``FloatTensor[in]`` (float64)."""
        return self._check().sqrt()


class InputHessian(_InputStats):
    """SparseGPT's layer Hessian ``H = (2/N) sum_t x_t x_t^T`` over ``N`` calibration tokens."""

    def update(self, x: torch.Tensor) -> None:
        x = _flat(x)
        self._add(x.T @ x, x.shape[0])

    def second_moment(self) -> torch.Tensor:
        """``sum_t x_t x_t^T`` (float64 ``[in, in]``)."""
        return self._check()

    def compute(self) -> torch.Tensor:
        """``(2/N) sum_t x_t x_t^T`` (float64 ``[in, in]``)."""
        return self._check() * (2.0 / self.count)
