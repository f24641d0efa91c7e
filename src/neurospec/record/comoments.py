"""Co-moments of the neurons of one site (mean, covariance, Pearson correlation) and Spearman correlation.

Used to build correlation graphs over neurons (local-specialisation clustering) and co-activation statistics.

Dimensions: ``width`` neurons of the site, ``tokens`` rows of a batch, ``n`` samples.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from neurospec.record.base import Accumulator, as_rows

_DTYPES = {"float64": torch.float64, "float32": torch.float32}

CONSTANT_REL_STD = 1e-6
"""A neuron whose std is at most this fraction of |mean| (or exactly 0) counts as constant: correlation 0."""


def correlation_from_covariance(cov: Tensor, mean: Tensor | None = None) -> Tensor:
    """Pearson correlation ``[width, width]`` from a covariance matrix.

    Constant neurons (variance 0, or std <= ``CONSTANT_REL_STD * |mean|`` when ``mean`` is given) get
    correlation 0 with every neuron, themselves included; other neurons have 1 on the diagonal. Values are
    clipped to [-1, 1].
    """
    var = cov.diagonal().clamp(min=0.0)
    live = var > 0
    if mean is not None:
        live &= var > (CONSTANT_REL_STD * mean) ** 2
    std = torch.where(live, var.sqrt(), 1.0)
    corr = (cov / (std[:, None] * std[None, :])).clamp(-1.0, 1.0)
    both = live[:, None] & live[None, :]
    corr = torch.where(both, corr, 0.0)
    corr.diagonal().copy_(live.to(corr.dtype))
    return corr


class CoMoments(Accumulator):
    """Count, per-neuron sums and the cross-product sum ``sum_t x_t x_t^T`` of one site's activations.

    ``update(x)`` takes ``[tokens, width]`` in any float dtype on any device. Rows with any non-finite value are
    dropped (counted in ``dropped``). ``compute()`` gives ``mean`` ``[width]``, ``cov`` (population)
    ``[width, width]`` and ``corr`` (Pearson; constant neurons get 0, see :func:`correlation_from_covariance`).

    Precision: each batch is centred on its own mean, its product ``w^T w`` is computed in float32 (float64 for
    float64 input) on the input's device, and the exact correction terms and the sums are added in ``dtype``
    (the state dtype, float64 by default) on the CPU. The covariance is then accurate to about 1e-6 relative to
    ``std_i * std_j`` per batch, whatever the means. Cost per batch: one ``[width, tokens] x [tokens, width]``
    product (about 5 GFLOP for 2048 x 1536) and a ``[width, width]`` transfer to the CPU; memory
    ``width^2 * 8`` bytes of state (19 MB for width 1536).

    Saved state: ``count``, ``dropped`` int64 0-d; ``sum`` ``[width]`` and ``sum_outer`` ``[width, width]`` in
    ``dtype``. ``meta()``: ``width``, ``dtype`` (``"float64"`` or ``"float32"``).
    """

    kind: ClassVar[str] = "comoments"
    reductions: ClassVar[dict[str, str]] = {
        "count": "sum",
        "dropped": "sum",
        "sum": "sum",
        "sum_outer": "sum",
    }

    def __init__(self, width: int, *, dtype: torch.dtype | str = torch.float64) -> None:
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"CoMoments: width must be a positive int, got {width!r}")
        names = {v: k for k, v in _DTYPES.items()}
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"CoMoments: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in names:
            raise ValueError(f"CoMoments: dtype must be float64 or float32, got {dtype}")
        self.width, self.dtype = width, dtype
        super().__init__()

    def _initial_state(self) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64),
            "dropped": torch.zeros((), dtype=torch.int64),
            "sum": torch.zeros(self.width, dtype=self.dtype),
            "sum_outer": torch.zeros(self.width, self.width, dtype=self.dtype),
        }

    def meta(self) -> dict[str, Any]:
        return {"width": self.width, "dtype": str(self.dtype).removeprefix("torch.")}

    def update(self, x: Tensor) -> None:
        """Add a batch ``x`` ``[tokens, width]``."""
        x = as_rows(x, self.width, "CoMoments")
        total = x.sum(0)
        if not bool(torch.isfinite(total).all()):
            keep = torch.isfinite(x).all(1)
            self._state["dropped"] += int((~keep).sum())
            x = x[keep]
            total = x.sum(0)
        n = x.shape[0]
        if n == 0:
            return
        shift = total / n
        w = x - shift
        sum_c = w.sum(0)
        gram = w.T @ w
        dt = self.dtype
        shift, sum_c = shift.to("cpu", dt), sum_c.to("cpu", dt)
        s = self._state
        s["count"] += n
        s["sum"] += n * shift + sum_c
        outer = s["sum_outer"]
        outer += gram.to("cpu", dt)
        outer.addr_(shift, sum_c).addr_(sum_c, shift).addr_(shift, shift, alpha=n)

    def compute(self) -> dict[str, Tensor]:
        """``mean`` ``[width]``, ``cov`` and ``corr`` ``[width, width]`` (float64; NaN if nothing was seen)."""
        s = self._state
        n = int(s["count"])
        if n == 0:
            nan = math.nan
            return {
                "mean": torch.full((self.width,), nan, dtype=torch.float64),
                "cov": torch.full((self.width, self.width), nan, dtype=torch.float64),
                "corr": torch.full((self.width, self.width), nan, dtype=torch.float64),
            }
        mean = s["sum"].double() / n
        cov = s["sum_outer"].double() / n - torch.outer(mean, mean)
        cov = 0.5 * (cov + cov.T)
        return {"mean": mean, "cov": cov, "corr": correlation_from_covariance(cov, mean)}


def average_ranks(samples: Tensor) -> Tensor:
    """Ranks (1-based, float64) of each column of ``samples`` ``[n, width]``; tied values share their mean rank."""
    n = samples.shape[0]
    order = torch.argsort(samples, dim=0, stable=True)
    ordered = samples.gather(0, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    pos = torch.arange(n, device=samples.device)[:, None].expand_as(order)
    first = torch.where(starts, pos, 0).cummax(0).values
    last = torch.where(ends, pos, n).flip(0).cummin(0).values.flip(0)
    mean_rank = (first + last).double() / 2 + 1
    return torch.empty_like(mean_rank).scatter_(0, order, mean_rank)


def spearman_from_samples(samples: Tensor) -> Tensor:
    """Spearman rank correlation ``[width, width]`` (float64) between the columns of ``samples`` ``[n, width]``.

    Ranks with ties averaged, then Pearson correlation of the ranks. A constant column gets correlation 0 with
    everything (itself included) instead of NaN. Cost: a sort per column and a ``[width, width]`` product.
    """
    if samples.ndim != 2:
        raise ValueError(
            f"spearman_from_samples expects [n, width] samples, got shape {tuple(samples.shape)}"
        )
    if samples.shape[0] < 2:
        raise ValueError(f"spearman_from_samples needs at least 2 samples, got {samples.shape[0]}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("spearman_from_samples: samples contain NaN or inf; drop those rows first")
    ranks = average_ranks(samples)
    n = ranks.shape[0]
    centred = ranks - (n + 1) / 2  # the mean of average ranks is exactly (n + 1) / 2
    cov = centred.T @ centred / n
    return correlation_from_covariance(cov)
