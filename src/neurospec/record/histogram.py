"""Per-neuron fixed-edge histograms: calibrating the edges, binning a batch, and reading modes and quantiles.

A :class:`NeuronStats` histogram has, per neuron, ``bins`` equal bins on ``[lo, hi)`` plus an underflow and an
overflow count, so its counts are ``[width, bins + 2]`` (column 0 = below ``lo``, column ``bins + 1`` = at or above
``hi``). The edges are fixed from the first batch (see :func:`calibrated_range`), which makes histograms of
different batches, processes and runs addable exactly.

Readers see the histogram together with each neuron's exact min and max (a :class:`Histogram`) and treat it as a
piecewise-uniform distribution: underflow mass spread evenly over ``[min, lo]``, each bin's mass over the bin,
overflow mass over ``[hi, max]`` (all clipped to ``[min, max]``). :func:`quantiles` inverts that distribution's
CDF; :func:`peak` re-bins it into coarse bins between min and max and takes the fullest one.

Dimensions: ``width`` neurons, ``bins`` regular bins of the stored histogram, ``q`` requested probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neurospec.record.base import scratch

PEAK_ASSIGN = ("overlap", "centre")


@dataclass(frozen=True)
class Histogram:
    """A read-only view of per-neuron histograms with the exact extremes of the data.

    ``counts``: ``[width, bins + 2]`` (underflow, ``bins`` regular bins, overflow); ``lo``, ``hi``: ``[width]``
    range of the regular bins (NaN while not calibrated); ``min``, ``max``: ``[width]`` exact extremes of all
    finite values seen (``+inf`` / ``-inf`` when none).
    """

    counts: Tensor
    lo: Tensor
    hi: Tensor
    min: Tensor
    max: Tensor

    @property
    def bins(self) -> int:
        return self.counts.shape[1] - 2


def calibrated_range(lo: Tensor, hi: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Histogram edges from a calibration batch's per-neuron ``[lo, hi]`` (its finite min and max).

    The range is widened by ``margin * (hi - lo)`` on each side. It is then made at least
    ``max(1e-6, 1e-3 * max(|lo|, |hi|))`` wide (around its centre), which covers constant neurons and keeps the
    float32 bin arithmetic accurate to a small fraction of a bin. A neuron without a usable range (no finite
    value: ``lo = +inf``, ``hi = -inf``; or any non-finite bound) gets ``[-1, 1]`` before widening.
    Returns float64 ``(lo, hi)``.
    """
    lo, hi = lo.double(), hi.double()
    empty = ~(torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi))
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    span = hi - lo
    new_lo, new_hi = lo - margin * span, hi + margin * span
    min_span = torch.clamp(1e-3 * torch.maximum(lo.abs(), hi.abs()), min=1e-6)
    narrow = (new_hi - new_lo) < min_span
    centre = 0.5 * (lo + hi)
    new_lo = torch.where(narrow, centre - 0.5 * min_span, new_lo)
    new_hi = torch.where(narrow, centre + 0.5 * min_span, new_hi)
    return new_lo, new_hi


class Binner:
    """Maps values to flat histogram slots: ``slot = neuron * (bins + 2) + bin``.

    ``bin = floor(x * scale + bias)`` clipped to ``[0, bins + 1]``, with ``scale = bins / (hi - lo)`` and
    ``bias = 1 - lo * scale``, evaluated in the batch's compute dtype (float32, or float64 for float64 input).
    So the regular bins are half-open ``[e_i, e_{i+1})`` and a value equal to ``hi`` counts as overflow.
    The per-device, per-dtype constants are cached.
    """

    def __init__(self, lo: Tensor, hi: Tensor, bins: int) -> None:
        self.bins = bins
        self.width = lo.shape[0]
        scale = bins / (hi - lo)
        self._scale64, self._bias64 = scale, 1.0 - lo * scale
        self._cache: dict[tuple[Any, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            offsets = torch.arange(self.width, dtype=torch.int32) * (self.bins + 2)
            self._cache[key] = (
                self._scale64.to(device, dtype),
                self._bias64.to(device, dtype),
                offsets.to(device),
            )
        return self._cache[key]

    def counts(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Histogram of ``x`` ``[tokens, width]`` (float32 or float64) as int64 ``[width * (bins + 2)]`` on x's device.

        ``keep`` (bool, same shape) excludes the entries where it is False; without it every entry must be finite.
        Cost: four elementwise passes over ``x`` (in a reused scratch buffer) and one ``bincount``.
        """
        scale, bias, offsets = self._constants(x.device, x.dtype)
        slots = self.width * (self.bins + 2)
        t = scratch("work", tuple(x.shape), x.dtype, x.device)
        torch.addcmul(bias, x, scale, out=t)
        if keep is not None:
            t.masked_fill_(~keep, 0.0)
        t.clamp_(0.0, float(self.bins + 1))
        # Convert in place (same element size, each element read then written at its own position), so the
        # histogram needs no second batch-sized buffer; t >= 0, so the truncating conversion is floor.
        idx = t.view(torch.int32) if t.dtype == torch.float32 else torch.empty_like(t, dtype=torch.int32)
        idx.copy_(t)
        idx.add_(offsets)
        if keep is not None:
            idx.masked_fill_(~keep, slots)  # a dump slot, dropped below
            return torch.bincount(idx.view(-1), minlength=slots + 1)[:slots]
        return torch.bincount(idx.view(-1), minlength=slots)


# --------------------------------------------------------------------------------------------------- reading
def as_histogram(stats_or_hist: Any) -> Histogram:
    """A :class:`Histogram`, or anything with a ``histogram()`` method returning one (e.g. ``NeuronStats``)."""
    if isinstance(stats_or_hist, Histogram):
        return stats_or_hist
    getter = getattr(stats_or_hist, "histogram", None)
    if getter is None:
        raise TypeError(f"expected a Histogram or NeuronStats, got {type(stats_or_hist).__name__}")
    return getter()


def _cdf_knots(h: Histogram) -> tuple[Tensor, Tensor, Tensor]:
    """Knot positions ``[width, bins + 3]``, cumulative mass at each knot, and a ``[width]`` validity mask.

    Knots: min, lo, the regular edges up to hi, max, all clipped to ``[min, max]`` (so they are sorted).
    """
    counts = h.counts.double()
    bins = counts.shape[1] - 2
    lo, hi, mn, mx = h.lo.double(), h.hi.double(), h.min.double(), h.max.double()
    total = counts.sum(1)
    valid = (total > 0) & (mn <= mx) & torch.isfinite(lo) & torch.isfinite(hi)
    # Replace unusable rows by a harmless [0, 1] so that the arithmetic stays finite; they are set to NaN at the end.
    lo, hi = torch.where(valid, lo, 0.0), torch.where(valid, hi, 1.0)
    mn, mx = torch.where(valid, mn, 0.0), torch.where(valid, mx, 1.0)
    steps = torch.arange(bins + 1, dtype=torch.float64, device=lo.device) / bins
    edges = lo[:, None] + (hi - lo)[:, None] * steps
    knots = torch.cat([mn[:, None], edges, mx[:, None]], dim=1)
    knots = torch.minimum(torch.maximum(knots, mn[:, None]), mx[:, None])
    cum = torch.cat([torch.zeros_like(total)[:, None], counts.cumsum(1)], dim=1)
    return knots, cum, valid


def cdf(stats_or_hist: Any, x: Tensor) -> Tensor:
    """The piecewise-linear CDF (a fraction in [0, 1]) at points ``x`` ``[width, n]``; NaN for neurons without data."""
    h = as_histogram(stats_or_hist)
    knots, cum, valid = _cdf_knots(h)
    x = x.to(knots.dtype)
    k = knots.shape[1]
    j = torch.searchsorted(knots, x.contiguous(), right=True)  # first knot > x
    hi_i = j.clamp(max=k - 1)
    lo_i = (j - 1).clamp(min=0)
    p0, p1 = knots.gather(1, lo_i), knots.gather(1, hi_i)
    c0, c1 = cum.gather(1, lo_i), cum.gather(1, hi_i)
    gap = p1 - p0
    frac = torch.where(gap > 0, (x - p0) / torch.where(gap > 0, gap, 1.0), 0.0).clamp(0.0, 1.0)
    mass = c0 + (c1 - c0) * frac
    mass = torch.where(j == 0, 0.0, torch.where(j >= k, cum[:, -1:], mass))
    out = mass / cum[:, -1:].clamp(min=1.0)
    return torch.where(valid[:, None], out, math.nan)


def quantiles(stats_or_hist: Any, q: Tensor | float | list[float]) -> Tensor:
    """Per-neuron quantiles ``[len(q), width]`` (float64) from the histogram, by linear interpolation of its CDF.

    Underflow mass counts as spread evenly over ``[min, lo]``, overflow mass over ``[hi, max]``. ``q = 0`` gives
    the exact min, ``q = 1`` the exact max; other quantiles are exact to within one histogram bin when the data
    stayed inside the calibrated range. NaN for neurons without data.
    """
    h = as_histogram(stats_or_hist)
    q = torch.as_tensor(q, dtype=torch.float64, device=h.counts.device).reshape(-1)
    if ((q < 0) | (q > 1)).any() or torch.isnan(q).any():
        raise ValueError(f"quantile probabilities must lie in [0, 1], got {q.tolist()}")
    knots, cum, valid = _cdf_knots(h)
    k = knots.shape[1]
    target = (q[None, :] * cum[:, -1:]).contiguous()  # [width, q]
    j = torch.searchsorted(cum, target, side="left").clamp(max=k - 1)  # first knot whose mass >= target
    lo_i = (j - 1).clamp(min=0)
    p0, p1 = knots.gather(1, lo_i), knots.gather(1, j)
    c0, c1 = cum.gather(1, lo_i), cum.gather(1, j)
    gain = c1 - c0
    frac = torch.where(gain > 0, (target - c0) / torch.where(gain > 0, gain, 1.0), 1.0)
    out = torch.where(j == 0, knots[:, :1], p0 + (p1 - p0) * frac)
    return torch.where(valid[:, None], out, math.nan).T.contiguous()


def rebin(stats_or_hist: Any, bins: int = 100, assign: str = "overlap") -> Tensor:
    """Counts ``[width, bins]`` (float64) of ``bins`` equal bins between each neuron's exact min and max.

    ``assign="overlap"`` splits each stored bin's mass over the coarse bins it overlaps, in proportion to the
    overlap (the piecewise-uniform reading; under/overflow mass spread over ``[min, lo]`` / ``[hi, max]``).
    ``assign="centre"`` puts each stored bin's whole mass into the coarse bin holding its centre, and
    under/overflow mass into the first/last coarse bin; it is the literal recipe, but when the stored bins are
    not much finer than the coarse ones it aliases (coarse bins alternately get one or two stored bins).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if assign not in PEAK_ASSIGN:
        raise ValueError(f"assign must be one of {PEAK_ASSIGN}, got {assign!r}")
    h = as_histogram(stats_or_hist)
    counts = h.counts.double()
    mn, mx = h.min.double(), h.max.double()
    if assign == "overlap":
        knots, cum, valid = _cdf_knots(h)
        steps = torch.arange(bins + 1, dtype=torch.float64, device=counts.device) / bins
        span = torch.where(valid, mx - mn, 0.0)
        edges = torch.where(valid, mn, 0.0)[:, None] + span[:, None] * steps
        mass = cdf(h, edges) * cum[:, -1:]
        mass[:, -1] = cum[:, -1]  # the last coarse bin is closed: it holds the mass at max
        mass[:, 0] = 0.0
        out = mass.diff(dim=1)
        return torch.where(valid[:, None], out, 0.0)
    nbins = counts.shape[1] - 2
    lo, hi = h.lo.double(), h.hi.double()
    centres = lo[:, None] + (hi - lo)[:, None] * (torch.arange(nbins, dtype=torch.float64) + 0.5) / nbins
    width = (mx - mn) / bins
    pos = (centres - mn[:, None]) / torch.where(width > 0, width, 1.0)[:, None]
    pos = torch.where(torch.isfinite(pos), pos, 0.0).clamp(0, bins - 1)
    out = torch.zeros(counts.shape[0], bins, dtype=torch.float64)
    out.scatter_add_(1, pos.long(), counts[:, 1 : nbins + 1])
    out[:, 0] += counts[:, 0]
    out[:, -1] += counts[:, -1]
    return out


def gaussian_smooth(counts: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Gaussian smoothing along the last axis with ``sigma`` (in bins), mirror-reflecting at both ends.

    Same kernel and boundary rule as ``scipy.ndimage.gaussian_filter1d(..., mode="reflect", truncate=4.0)``.
    """
    if sigma <= 0:
        return counts.clone()
    n = counts.shape[-1]
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pos = torch.arange(-radius, n + radius) % (2 * n)
    pos = torch.where(pos >= n, 2 * n - 1 - pos, pos)  # ... c b a | a b c ... d | d c b ...
    padded = counts.double()[..., pos]
    return padded.unfold(-1, 2 * radius + 1, 1) @ kernel.to(padded.device)


def peak(stats_or_hist: Any, bins: int = 100, smooth: float = 0.0, assign: str = "overlap") -> Tensor:
    """Per-neuron mode ``[width]`` (float64) of the activation distribution, as used by peak ablation.

    Re-bins each neuron's distribution into ``bins`` equal bins between its exact min and max (see :func:`rebin`
    for ``assign``), optionally smooths the counts with a Gaussian of ``smooth`` bins, and returns
    ``min + (max - min) / bins * (argmax + 0.5)`` (the first fullest bin on ties). A constant neuron gives its
    value; a neuron without data gives NaN.
    """
    h = as_histogram(stats_or_hist)
    coarse = rebin(h, bins, assign)
    if smooth > 0:
        coarse = gaussian_smooth(coarse, smooth)
    arg = coarse.argmax(dim=1).double()
    mn, mx = h.min.double(), h.max.double()
    out = mn + (mx - mn) / bins * (arg + 0.5)
    has_data = (h.counts.sum(1) > 0) & (mn <= mx)
    return torch.where(has_data, out, math.nan)
