"""Per-neuron histograms on nested power-of-two grids: choosing the grid, binning a batch, reading modes and quantiles.

A :class:`NeuronStats` histogram has, per neuron, ``bins`` equal bins on ``[lo, hi)`` plus an underflow and an
overflow count, so its counts are ``[width, bins + 2]`` (column 0 = below ``lo``, column ``bins + 1`` = at or above
``hi``).

The grid (see :func:`fit_grid`): a neuron's bins have width ``2**level`` and lie on the absolute grid of that width,
so the bin ("cell") of a value ``v`` is ``floor(v / 2**level)``, an integer, and ``lo = first * 2**level`` for the
window's first cell ``first``. The level is the smallest one (not below ``MIN_LEVEL``) at which all values the
histogram has seen fit into ``bins`` consecutive cells whose indices stay within ``+-CELL_LIMIT``; the window starts
at the cell of the smallest value. When new values do not fit, the level goes up by one (or more): each pair of
cells ``(2k, 2k + 1)`` becomes cell ``k`` of the next level, so no count is ever lost or moved to another value
range. Level and window are functions of the set of values seen (not of their order or of how they were split into
batches), and two histograms merge by moving the finer one to the coarser level: ``merge(A, B)`` equals the
histogram of ``A + B`` exactly, across batches, processes and runs. Every value lands in a regular bin; the
under/overflow columns stay empty (histograms saved by earlier versions with edges fixed from a first batch can
hold mass there: ``NeuronStats.compute()["out_of_range"]`` reports it).

The arithmetic is exact: multiplying a float by a power of two and taking the floor are exact, and the cell
indices (below ``2**24`` in magnitude) are exact in float32, so float32 and float64 binning agree value by value.

Readers see the histogram together with each neuron's exact min and max (a :class:`Histogram`) and treat it as a
piecewise-uniform distribution: underflow mass spread evenly over ``[min, lo]``, each bin's mass over the bin,
overflow mass over ``[hi, max]`` (all clipped to ``[min, max]``). :func:`quantiles` inverts that distribution's
CDF; :func:`peak` re-bins it into coarse bins between min and max and takes the fullest one (or the maximum of a
Gaussian kernel density estimate).

Dimensions: ``width`` neurons, ``bins`` regular bins of the stored histogram, ``q`` requested probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.record import kernels
from neurospec.record.base import scratch

PEAK_ASSIGN = ("overlap", "centre")
PEAK_METHODS = ("histogram", "kde")
MIN_LEVEL = kernels.MIN_LEVEL
"""The finest bin width is ``2**-126`` (the smallest normal float32): it only matters for constant neurons."""
CELL_LIMIT = kernels.CELL_LIMIT
"""Cell indices stay in ``[-CELL_LIMIT, CELL_LIMIT)``, so that window positions are exact float32 integers."""


@dataclass(frozen=True)
class Histogram:
    """A read-only view of per-neuron histograms with the exact extremes of the data.

    ``counts``: ``[width, bins + 2]`` (underflow, ``bins`` regular bins, overflow); ``lo``, ``hi``: ``[width]``
    range of the regular bins (NaN while empty); ``min``, ``max``: ``[width]`` exact extremes of all
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


# --------------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Grid:
    """Per-neuron grid of a histogram: ``level`` int64 ``[width]``, and float64 ``[width]`` integer cell indices
    ``first`` (the window's first cell, that of the smallest value seen) and ``last`` (the cell of the largest);
    ``first`` and ``last`` are NaN for a neuron without values."""

    level: Tensor
    first: Tensor
    last: Tensor

    @property
    def has_data(self) -> Tensor:
        return ~torch.isnan(self.first)

    @staticmethod
    def empty(width: int) -> Grid:
        nan = torch.full((width,), math.nan, dtype=torch.float64)
        return Grid(torch.full((width,), MIN_LEVEL, dtype=torch.int64), nan, nan.clone())

    def edges(self, bins: int) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` float64 ``[width]`` of the windows (exact); NaN for neurons without values."""
        step = torch.exp2(self.level.double())
        return self.first * step, (self.first + bins) * step

    @staticmethod
    def from_state(counts: Tensor, lo: Tensor, hi: Tensor) -> Grid | None:
        """The grid of a stored histogram, or None if its edges are not on a power-of-two grid (saved by an
        earlier version that fixed the edges from a first batch)."""
        bins = counts.shape[1] - 2
        lo, hi = lo.double(), hi.double()
        has = ~torch.isnan(lo)
        mantissa, exponent = torch.frexp(torch.where(has, (hi - lo) / bins, 1.0))
        level = torch.where(has, exponent.long() - 1, MIN_LEVEL)
        first = torch.where(has, lo / torch.exp2(level.double()), math.nan)
        ok = (mantissa == 0.5) & (first == torch.floor(first)) & (first >= -CELL_LIMIT) & (first < CELL_LIMIT)
        if not bool(ok[has].all()) or bool(counts[has][:, [0, -1]].any()):
            return None
        regular = counts[:, 1:-1] > 0
        top = bins - 1 - regular.flip(1).int().argmax(1)  # last non-empty regular bin (0 for none)
        last = torch.where(has, first + top.double(), math.nan)
        return Grid(level, first, last)


def cells(v: Tensor, level: Tensor) -> Tensor:
    """The cells ``floor(v / 2**level)`` (float64) of float64 values ``v`` (exact; a negative value whose quotient
    underflows to -0 still gets cell -1)."""
    c = torch.floor(v * torch.exp2(-level.double()))
    return torch.where((c == 0) & (v < 0), -1.0, c)


def _coarsen(c: Tensor, steps: Tensor) -> Tensor:
    """Cell indices ``c`` moved up ``steps`` (>= 0) levels: ``floor(c / 2**steps)``, i.e. the cells of the values
    ``c`` at level ``steps`` (exact; a negative cell whose quotient underflows to -0, over more than about 1,050
    levels, still goes to cell -1)."""
    return cells(c, steps)


def check_bins(bins: object) -> int:
    """``bins`` if it is a usable bin count per neuron, else a :class:`NeurospecError` (a ``ValueError``)."""
    if not isinstance(bins, int) or isinstance(bins, bool) or not 2 <= bins <= kernels.MAX_BINS:
        raise NeurospecError(f"hist_bins must be in [2, {kernels.MAX_BINS}] (one bin cannot hold values on both "
                             f"sides of 0 at any level), got {bins!r}")
    return bins


def fit_grid(grid: Grid, vmin: Tensor, vmax: Tensor, bins: int) -> Grid:
    """The grid of the values behind ``grid`` together with new values whose per-neuron extremes are ``vmin``,
    ``vmax`` (float64 ``[width]``; ``+inf`` / ``-inf`` for neurons without new values).

    The level is the smallest one at or above ``grid.level`` (and ``MIN_LEVEL``) at which the cells from the
    smallest to the largest value are at most ``bins`` and all lie in ``[-CELL_LIMIT, CELL_LIMIT)``; both conditions
    only get easier one level up (cells pair up), so this is the smallest level for all values together, whatever
    the order they came in.
    """
    new = vmin <= vmax
    old = grid.has_data
    vmin = torch.where(new, vmin, 0.0)
    vmax = torch.where(new, vmax, 0.0)
    # The usual case: the new values lie inside the current windows.
    lo_cell, hi_cell = cells(vmin, grid.level), cells(vmax, grid.level)
    inside = (lo_cell >= grid.first) & (hi_cell < grid.first + bins) & (hi_cell < CELL_LIMIT)
    if bool((inside | ~new).all()):
        return Grid(grid.level, grid.first, torch.where(new, torch.maximum(grid.last, hi_cell), grid.last))
    # A start at or below the answer, so that few single steps remain: the cell indices must stay below 2**23
    # (level >= log2|v| - 23) and the spread must fit into the bins (level >= log2(spread / bins)).
    mag = torch.maximum(vmin.abs(), vmax.abs())
    by_mag = torch.floor(torch.log2(mag)) - 25
    by_spread = torch.floor(torch.log2(0.5 * vmax - 0.5 * vmin)) - math.ceil(math.log2(bins))  # no overflow
    bound = torch.maximum(by_mag, by_spread).nan_to_num(nan=-math.inf).clamp(MIN_LEVEL, 1100)
    level = torch.where(new, torch.maximum(grid.level, bound.long()), grid.level)
    up = level - grid.level
    old_first = torch.where(old, _coarsen(grid.first, up), math.inf)
    old_last = torch.where(old, _coarsen(grid.last, up), -math.inf)
    first = torch.minimum(old_first, torch.where(new, cells(vmin, level), math.inf))
    last = torch.maximum(old_last, torch.where(new, cells(vmax, level), -math.inf))
    has = old | new
    first = torch.where(has, first, 0.0)
    last = torch.where(has, last, 0.0)
    while True:
        bad = has & ((last - first >= bins) | (first < -CELL_LIMIT) | (last >= CELL_LIMIT))
        if not bool(bad.any()):
            break
        level = level + bad.long()
        first = torch.where(bad, torch.floor(first / 2), first)
        last = torch.where(bad, torch.floor(last / 2), last)
    return Grid(level, torch.where(has, first, math.nan), torch.where(has, last, math.nan))


def regrid(counts: Tensor, old: Grid, new: Grid, *, inplace: bool = False) -> Tensor:
    """Counts ``[width, bins + 2]`` on grid ``old`` moved to the coarser (or equal) grid ``new`` (a new tensor, or
    ``counts`` itself with ``inplace``: only the rows whose window moved are rewritten).

    Regular bin ``i`` of a neuron is cell ``old.first + i``; it goes to cell ``floor((old.first + i) /
    2**(new.level - old.level))`` of the new grid. Under/overflow counts stay where they are.
    """
    bins = counts.shape[1] - 2
    out = counts if inplace else counts.clone()
    moved = old.has_data & ((new.level != old.level) | (new.first != old.first))
    if not bool(moved.any()):
        return out
    rows = moved.nonzero().squeeze(1)
    up = (new.level - old.level)[rows]
    old_cells = old.first[rows, None] + torch.arange(bins, dtype=torch.float64)
    target = _coarsen(old_cells, up[:, None]) - new.first[rows, None] + 1
    body_counts = counts[rows, 1 : bins + 1]
    outside = (target < 1) | (target > bins)  # allowed for the empty bins after the last value only
    if bool((outside & (body_counts != 0)).any()):
        raise AssertionError("regrid: counts fall outside the new window")  # the grids are not nested
    target = target.clamp(1, bins)
    body = torch.zeros(rows.numel(), bins + 2, dtype=counts.dtype)
    body.scatter_add_(1, target.long(), body_counts)
    body[:, 0], body[:, -1] = counts[rows, 0], counts[rows, -1]
    out[rows] = body
    return out


class Binner:
    """Maps values to flat histogram slots: ``slot = neuron * (bins + 2) + 1 + cell - first`` on a :class:`Grid`.

    ``cell = floor(x * 2**-level)``, exact in float32 (float64 for float64 input), clipped to the window (under/
    overflow slots), so the regular bins are half-open ``[e_i, e_{i+1})``. Non-finite entries must be excluded
    with ``keep``. The per-device, per-dtype constants are cached.
    """

    def __init__(self, grid: Grid, bins: int) -> None:
        self.bins = bins
        self.width = grid.level.shape[0]
        level = torch.where(grid.has_data, grid.level, 0)
        self._scale64 = torch.exp2(-level.double())
        self._shift64 = torch.where(grid.has_data, grid.first, 0.0) - 1.0  # slot = cell - shift
        self._underflow = bool((level > 0).any())  # a tiny negative x * scale can round to -0
        self._cache: dict[tuple[Any, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            offsets = torch.arange(self.width, dtype=torch.int32) * (self.bins + 2)
            self._cache[key] = (
                self._scale64.to(device, dtype),
                self._shift64.to(device, dtype),
                offsets.to(device, torch.int32 if dtype == torch.float32 else torch.int64),
            )
        return self._cache[key]

    def add_to(self, hist: Tensor, x: Tensor, keep: Tensor | None = None, step: int = 1) -> None:
        """Add the histogram of the rows ``0, step, 2 * step, ...`` of ``x`` to ``hist`` (int64 ``[width * (bins +
        2)]``, contiguous, on the CPU) in place; ``keep`` as in :meth:`counts`.

        A CPU batch goes through the fused kernel (:mod:`neurospec.record.kernels`: one pass, no scratch buffer);
        other devices, or kernels switched off, through :meth:`counts`.
        """
        if kernels.usable(x) and hist.device.type == "cpu" and hist.is_contiguous():
            kernels.histogram_add(hist, x, self._scale64, self._shift64, self.bins, keep, step)
            return
        if step > 1:
            x = x[::step]
            keep = None if keep is None else keep[::step]
        hist.add_(self.counts(x, keep).to(hist.device))

    def counts(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Histogram of ``x`` ``[tokens, width]`` (float32 or float64) as int64 ``[width * (bins + 2)]`` on x's device.

        ``keep`` (bool, same shape) excludes the entries where it is False; without it every entry must be finite.
        A CPU batch goes through the fused kernel (see :meth:`add_to`); otherwise :meth:`counts_torch`.
        """
        if kernels.usable(x):
            out = torch.zeros(self.width * (self.bins + 2), dtype=torch.int64)
            kernels.histogram_add(out, x, self._scale64, self._shift64, self.bins, keep)
            return out
        return self.counts_torch(x, keep)

    def counts_torch(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """:meth:`counts` in torch operations (any device; the reference for the kernel).

        Cost: six elementwise passes over ``x`` (in a reused scratch buffer; two more when some level is above 0)
        and one ``bincount``.
        """
        scale, shift, offsets = self._constants(x.device, x.dtype)
        slots = self.width * (self.bins + 2)
        t = scratch("work", tuple(x.shape), x.dtype, x.device)
        torch.mul(x, scale, out=t)
        t.floor_()
        if self._underflow:
            t.sub_(((t == 0) & (x < 0)).to(t.dtype))
        t.sub_(shift)
        if keep is not None:
            t.masked_fill_(~keep, 0.0)
        t.clamp_(0.0, float(self.bins + 1))
        # Convert in place (same element size, each element read then written at its own position), so the
        # histogram needs no second batch-sized buffer; t holds whole numbers >= 0.
        idx = t.view(offsets.dtype)
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
    if (kernels.usable(h.lo) and h.counts.device.type == "cpu" and not h.counts.is_floating_point()
            and h.counts.dim() == 2 and h.counts.shape[1] >= 3):
        return kernels.quantiles(q, h.counts, h.lo, h.hi, h.min, h.max)  # (one pass per neuron, the same bits)
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


def spread(stats_or_hist: Any) -> Tensor:
    """Per-neuron standard deviation ``[width]`` (float64) of the histogram's piecewise-uniform distribution (each
    segment's mass spread evenly over it); NaN for neurons without data."""
    h = as_histogram(stats_or_hist)
    knots, cum, valid = _cdf_knots(h)
    mass = cum.diff(dim=1) / cum[:, -1:].clamp(min=1.0)
    a, b = knots[:, :-1], knots[:, 1:]
    mean = (mass * 0.5 * (a + b)).sum(1, keepdim=True)
    a, b = a - mean, b - mean  # centred, for accuracy
    var = (mass * (a * a + a * b + b * b) / 3.0).sum(1).clamp(min=0.0)
    return torch.where(valid, var.sqrt(), math.nan)


def _kde_on_bins(coarse: Tensor, sigma: Tensor, chunk: int = 128) -> Tensor:
    """Sum of Gaussians of ``sigma[j]`` bins (no reflection at the ends) centred on each bin, weighted by its
    count, evaluated at every bin centre: ``[width, bins]`` (float64)."""
    bins = coarse.shape[1]
    pos = torch.arange(bins, dtype=torch.float64)
    offset = pos[None, :, None] - pos[None, None, :]  # [1, at, from]
    out = torch.empty_like(coarse)
    for i in range(0, coarse.shape[0], chunk):
        s = sigma[i : i + chunk, None, None]
        kernel = torch.exp(-0.5 * (offset / s) ** 2)
        out[i : i + chunk] = (kernel @ coarse[i : i + chunk, :, None]).squeeze(2)
    return out


def peak(
    stats_or_hist: Any,
    bins: int = 100,
    smooth: float = 0.0,
    assign: str = "overlap",
    method: str = "histogram",
    bandwidth: float = 0.1,
) -> Tensor:
    """Per-neuron mode ``[width]`` (float64) of the activation distribution, as used by peak ablation.

    Re-bins each neuron's distribution into ``bins`` equal bins between its exact min and max (see :func:`rebin`
    for ``assign``) and returns the centre of the best bin, ``min + (max - min) / bins * (argmax + 0.5)`` (the
    first one on ties). ``method="histogram"``: the fullest bin, after optionally smoothing the counts with a
    Gaussian of ``smooth`` bins (mirrored at the ends). ``method="kde"``: the maximum of a Gaussian kernel density
    estimate whose kernel's standard deviation is ``bandwidth`` times the neuron's standard deviation (the
    convention of ``scipy.stats.gaussian_kde(data, bw_method=bandwidth)``), computed from the re-binned counts
    (so exact to about a bin) and evaluated at the bin centres. A constant neuron gives its value; a neuron
    without data gives NaN.
    """
    if method not in PEAK_METHODS:
        raise ValueError(f"peak method must be one of {PEAK_METHODS}, got {method!r}")
    if method == "kde" and smooth > 0:
        raise ValueError("smooth applies to method='histogram'; method='kde' smooths by its bandwidth")
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    h = as_histogram(stats_or_hist)
    coarse = rebin(h, bins, assign)
    mn, mx = h.min.double(), h.max.double()
    if method == "kde":
        width = (mx - mn) / bins
        sigma = bandwidth * spread(h) / torch.where(width > 0, width, 1.0)
        sigma = torch.where(torch.isfinite(sigma) & (sigma > 0), sigma, 1.0)  # constant / empty: any kernel
        coarse = _kde_on_bins(coarse, sigma)
    elif smooth > 0:
        coarse = gaussian_smooth(coarse, smooth)
    arg = coarse.argmax(dim=1).double()
    out = mn + (mx - mn) / bins * (arg + 0.5)
    has_data = (h.counts.sum(1) > 0) & (mn <= mx)
    return torch.where(has_data, out, math.nan)
