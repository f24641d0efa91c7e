"""Streaming per-neuron statistics of one site, and the public face of neurospec's accumulators.

:class:`NeuronStats` takes batches of a site's activations ``[tokens, width]`` and keeps, per neuron, float64 sums
(moments, sign counts, |x| and sqrt|x| sums), exact min and max, a non-finite count and a histogram on a
power-of-two grid that widens as needed (:mod:`neurospec.record.histogram`).
All of it merges exactly across batches, processes and runs (see :mod:`neurospec.record.base`).

This module also re-exports the other accumulators and the histogram readers, so that
``from neurospec.record.accumulators import NeuronStats, Reservoir, CoMoments, peak, quantiles`` works.

Where the state lives: always on the CPU, in float64 (sums) and int64 (counts). On the CPU the per-batch work is
one fused kernel call (:mod:`neurospec.record.kernels`: float64 partial sums, the grids widened, histogram counts
added in place) and one more that adds the partials into the state. On other devices (or with ``NEUROSPEC_NO_KERNELS=1``) it runs in torch on the activation's device in
float32 (float64 for float64 input) and its results travel to the CPU once per batch: one ``[8, width]`` tensor of
partial sums and one ``[width * (bins + 2)]`` histogram increment.

Dimensions: ``tokens`` rows of a batch (every position of every sequence), ``width`` neurons of the site,
``bins`` regular histogram bins.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.record import kernels
from neurospec.record.base import (
    Accumulator,
    accumulator_class,
    as_rows,
    from_safetensors,
    scratch,
    to_safetensors,
)
from neurospec.record.comoments import CoMoments, spearman_from_samples
from neurospec.record.histogram import (
    Binner,
    Grid,
    Histogram,
    check_bins,
    fit_grid,
    peak,
    quantiles,
    rebin,
    regrid,
)
from neurospec.record.reservoir import Reservoir

__all__ = [
    "Accumulator",
    "CoMoments",
    "Histogram",
    "NeuronStats",
    "Reservoir",
    "accumulator_class",
    "from_safetensors",
    "peak",
    "quantiles",
    "rebin",
    "spearman_from_samples",
    "to_safetensors",
]

"""``(lo, hi) -> (lo, hi)``: the range agreement of earlier versions; accepted by NeuronStats and not called."""

OUT_OF_RANGE_WARN = 0.01
_LEGACY_META = ("calib_margin",)  # written by earlier versions, no longer used
"""``compute()`` warns when some neuron has more than this fraction of its histogram mass outside the bins."""

# Rows of the per-batch partials computed by _fast_partials.
_SUM_C, _SUM_SQ_C, _SUM_ABS, _SUM_SQRT, _POS_COUNT, _MIN, _MAX, _SHIFT = range(8)
_SHIFT_ROWS = kernels.SHIFT_ROWS  # rows averaged for the per-batch shift


def _raise_to(grid: Grid, level: Tensor, bins: int) -> Grid:
    """``grid`` moved up to at least ``level`` where it is finer, refitted (only upward moves)."""
    up = torch.where(grid.has_data, (level - grid.level).clamp(min=0), 0)
    if not bool(up.any()):
        return grid
    scale = torch.exp2(-up.double())
    moved = Grid(grid.level + up, torch.floor(grid.first * scale), torch.floor(grid.last * scale))
    none = torch.full_like(grid.first, math.inf)
    return fit_grid(moved, none, -none, bins)


def _grid_moved(old: Grid, new: Grid) -> bool:
    """Whether some window changed (level or first cell; NaN, a neuron without values, equals NaN here)."""
    return not (torch.equal(new.level, old.level) and torch.equal(new.first.nan_to_num(0.5), old.first.nan_to_num(0.5)))


def _fast_partials(x: Tensor) -> Tensor:
    """Per-neuron partial results ``[8, width]`` (x's dtype and device) of a batch ``x`` ``[tokens, width]``.

    Rows (see the ``_SUM_C ...`` constants): sum and sum of squares of ``x - c``, sum |x|, sum sqrt|x|, count of
    x > 0, min, max, and the shift ``c``: the mean of about 64 evenly spaced rows of the batch, close enough to the
    mean to keep the variance accurate for neurons whose mean is large compared with their spread. The result
    depends on this batch only, so merged partial states equal sequential ones exactly. Any non-finite input
    makes some partial non-finite, so one cheap check of this small result detects it. Cost: 5 elementwise
    passes, 5 sums, min and max over ``x``, in one reused scratch buffer. (CPU batches use
    :func:`neurospec.record.kernels.moments` instead: the same partials, in float64, in one pass.)
    """
    sample = x[:: max(1, x.shape[0] // _SHIFT_ROWS)]
    shift = sample.sum(0) / sample.shape[0]
    w = scratch("work", tuple(x.shape), x.dtype, x.device)
    torch.sub(x, shift, out=w)
    sum_c = w.sum(0)
    w.mul_(w)
    sum_sq_c = w.sum(0)
    torch.abs(x, out=w)
    sum_abs = w.sum(0)
    w.sqrt_()
    sum_sqrt = w.sum(0)
    torch.gt(x, 0, out=w)
    pos_count = w.sum(0)
    mn, mx = x.amin(0), x.amax(0)  # (torch.aminmax over dim 0 is several times slower than these two)
    return torch.stack([sum_c, sum_sq_c, sum_abs, sum_sqrt, pos_count, mn, mx, shift])


def _signed_sums(total: Tensor, sum_abs: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum max(x, 0), sum min(x, 0))`` from ``sum x`` and ``sum |x|`` (x = pos + neg, |x| = pos - neg).

    Exact for one-signed neurons (decided by the batch's min and max); otherwise accurate to the rounding of the
    two sums, i.e. about 1e-7 of ``sum |x|`` for float32 partials.
    """
    pos = torch.where(mn >= 0, sum_abs, torch.where(mx <= 0, 0.0, 0.5 * (total + sum_abs)))
    neg = torch.where(mn >= 0, 0.0, torch.where(mx <= 0, -sum_abs, 0.5 * (total - sum_abs)))
    return pos, neg


def _masked_partials(x: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """Exact float64 partial results over the entries where ``keep`` is True (the slow path for non-finite input)."""
    x64 = torch.where(keep, x.double(), 0.0)
    a = x64.abs()
    return {
        "count": keep.sum(0),
        "nonfinite": (~keep).sum(0),
        "sum": x64.sum(0),
        "sum_sq": (x64 * x64).sum(0),
        "sum_abs": a.sum(0),
        "sum_sqrt_abs": a.sqrt().sum(0),
        "pos_count": (x64 > 0).sum(0),
        "pos_sum": x64.clamp(min=0).sum(0),
        "neg_sum": x64.clamp(max=0).sum(0),
        "min": torch.where(keep, x64, math.inf).amin(0),
        "max": torch.where(keep, x64, -math.inf).amax(0),
    }


class NeuronStats(Accumulator):
    """Per-neuron statistics of one site, accumulated in float64 over any number of batches.

    ``update(x)`` takes ``x`` ``[tokens, width]`` (or ``[..., width]``) in any float dtype on any device.
    Non-finite values (NaN, +-inf) are counted per neuron in ``nonfinite`` and left out of every other statistic.

    Histogram: ``hist_bins`` equal bins per neuron, plus (always empty) underflow and overflow counts, on a
    power-of-two grid that covers every value the histogram saw and widens by merging pairs of bins when a value
    falls outside (see :mod:`neurospec.record.histogram`). It depends only on the set of values seen, so no
    first batch decides it and histograms of different batches, processes and runs merge exactly.
    ``hist_sample_every = k`` feeds only rows ``0, k, 2k, ...`` of each batch to the histogram (moments always
    use every row). Saved files of earlier versions (whose histograms had edges fixed from the first batch) may
    carry a ``calib_margin`` in their metadata; :meth:`from_state_dict` ignores it.

    Precision: each batch's partial sums are computed in float64 on the CPU (by the kernels; the square roots of
    |x| are added four at a time in x's dtype first) and in float32 (float64 for float64 input) by the torch path, those of moments
    after subtracting a shift near the batch's mean, then added into float64 state:
    relative error about 1e-7 per batch (the variance relative to itself, also for neurons whose mean is much
    larger than their spread), none from accumulation. ``pos_sum`` and ``neg_sum`` come from the batch's sum and
    sum of |x| (exact for neurons of one sign in the batch, else accurate to about 1e-7 of ``sum_abs``).

    Cost (2 CPU threads, ``[2048, 1536]`` float32): a few milliseconds per update; see
    ``benchmarks/accumulator_micro.py``. Memory: ``width * (hist_bins + 2)`` int64 of state; the torch path
    (accelerators, or CPU without the kernels) also needs one batch-sized scratch buffer that all accumulators of
    a thread share on the CPU.

    Saved state (``state_dict()``): ``count, nonfinite, pos_count`` int64 ``[width]``; ``sum, sum_sq, sum_abs,
    sum_sqrt_abs, pos_sum, neg_sum, min, max, hist_lo, hist_hi`` float64 ``[width]`` (the window of the regular
    bins, ``hist_lo = first * 2**level``, ``hist_hi = hist_lo + hist_bins * 2**level``; NaN while the neuron has
    no value); ``hist`` int64 ``[width, hist_bins + 2]``. ``meta()``: ``width, hist_bins, hist_sample_every``.
    """

    kind: ClassVar[str] = "neuron_stats"
    reductions: ClassVar[dict[str, str]] = {
        "count": "sum",
        "nonfinite": "sum",
        "sum": "sum",
        "sum_sq": "sum",
        "sum_abs": "sum",
        "sum_sqrt_abs": "sum",
        "pos_count": "sum",
        "pos_sum": "sum",
        "neg_sum": "sum",
        "min": "min",
        "max": "max",
        "hist": "custom",
        "hist_lo": "custom",
        "hist_hi": "custom",
    }

    def __init__(
        self,
        width: int,
        *,
        hist_bins: int = 256,
        hist_sample_every: int = 1,
    ) -> None:
        for name, value in (
            ("width", width),
            ("hist_bins", hist_bins),
            ("hist_sample_every", hist_sample_every),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NeuronStats: {name} must be a positive int, got {value!r}")
        check_bins(hist_bins)
        self.width = width
        self.hist_bins = hist_bins
        self.hist_sample_every = hist_sample_every
        # derived from the state (None: not derived yet); a fresh state's is Grid.empty (what Grid.from_state
        # would derive from it, without the work)
        self._grid: Grid | None = Grid.empty(width)
        self._binner: Binner | None = None
        self._buffers = kernels.UpdateBuffers()  # what the kernel calls of update reuse
        self._rows_seen = 0  # rows updated since the state was made or replaced (when to bin in the moments' read)
        super().__init__()

    def _initial_state(self) -> dict[str, Tensor]:
        w = self.width

        def f64(fill: float) -> Tensor:
            return torch.full((w,), fill, dtype=torch.float64)

        state = {
            name: f64(0.0) for name in ("sum", "sum_sq", "sum_abs", "sum_sqrt_abs", "pos_sum", "neg_sum")
        }
        state.update(
            {name: torch.zeros(w, dtype=torch.int64) for name in ("count", "nonfinite", "pos_count")}
        )
        state["min"], state["max"] = f64(math.inf), f64(-math.inf)
        state["hist"] = torch.zeros(w, self.hist_bins + 2, dtype=torch.int64)
        state["hist_lo"], state["hist_hi"] = f64(math.nan), f64(math.nan)
        return state

    def meta(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "hist_bins": self.hist_bins,
            "hist_sample_every": self.hist_sample_every,
        }

    def _state_changed(self) -> None:
        self._grid = None
        self._binner = None
        self._rows_seen = 0

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **meta: Any) -> NeuronStats:
        """As :meth:`Accumulator.from_state_dict`; metadata that only earlier versions wrote is ignored."""
        for key in _LEGACY_META:
            meta.pop(key, None)
        return super().from_state_dict(state, **meta)

    def histogram_mergeable(self) -> bool:
        """False for a histogram saved by an earlier version (edges fixed from the first batch): it cannot merge."""
        s = self._state
        return Grid.from_state(s["hist"], s["hist_lo"], s["hist_hi"]) is not None

    def without_histogram(self) -> NeuronStats:
        """A copy whose histogram is empty (so it merges with any other; its ``peak`` is NaN)."""
        state = {k: v.clone() for k, v in self._state.items()}
        state["hist"].zero_()
        state["hist_lo"].fill_(math.nan)
        state["hist_hi"].fill_(math.nan)
        return type(self).from_state_dict(state, **self.meta())

    def grid(self) -> Grid:
        """The histogram's per-neuron grid; ``NeurospecError`` for a histogram saved by an earlier version. It is
        the live grid: a CPU batch's :meth:`update` moves its tensors in place (copy them to keep a snapshot)."""
        if self._grid is None:
            s = self._state
            grid = Grid.from_state(s["hist"], s["hist_lo"], s["hist_hi"])
            if grid is None:
                raise NeurospecError(
                    "this NeuronStats histogram was recorded by an earlier neurospec version (edges fixed from the "
                    "first batch); it can be read but not extended or merged with new ones: record the run again"
                )
            self._grid = grid
        return self._grid

    # --------------------------------------------------------------------------------------------- update
    def update(self, x: Tensor, higher: bool = False) -> Tensor | None:
        """Add a batch ``x`` ``[tokens, width]`` (any float dtype, any device).

        A CPU batch takes one fused kernel call (:func:`neurospec.record.kernels.stats_update`): the float64
        partials, each neuron's grid widened to its new extremes and the histogram of every neuron whose values
        are all finite; a neuron with a NaN or infinite value is binned afterwards, with a mask, by the torch
        path.
        Returns the kernel's partials (with ``higher``, also the 3rd and 4th power sums about the shift, rows
        :data:`~neurospec.record.kernels.HIGHER_ROWS`; a buffer that the next update overwrites: read it at once),
        or None on the torch path (other devices, kernels off)."""
        x = as_rows(x, self.width, "NeuronStats")
        if x.shape[0] == 0:
            return None
        sampled = None  # (min, max) over the rows the histogram sees, when already known
        done = None  # the neurons the kernel binned
        fused = None
        if kernels.usable(x):  # one fused kernel call on the CPU (float64 partials, grid and histogram)
            x = x.contiguous()  # (a copy only for a strided view; the kernel then reads it in place)
            grid, s = self._live_grid(), self._state
            # The grid changes in place and the kernel writes the edges of the windows that move (as _set_grid).
            # Binning in the moments' own read pays off once few windows move per batch: not in the first few
            # batches, whose new extremes move many (the counts are the same either way).
            seen = getattr(self, "_rows_seen", 0)  # (absent from an object pickled by an earlier version)
            fuse = seen >= 3 * x.shape[0]
            self._rows_seen = seen + x.shape[0]
            fused, done_np, moved = kernels.stats_update(
                x, s["hist"], grid.level, grid.first, grid.last, s["hist_lo"], s["hist_hi"], self.hist_bins,
                self.hist_sample_every, higher, self._buffers, fuse)
            if moved:
                self._binner = None
            part = fused[: kernels.MOMENT_ROWS]
            sampled = (part[_SHIFT + 1], part[_SHIFT + 2])
            done = None if done_np.all() else torch.from_numpy(done_np.copy())
        else:
            part = _fast_partials(x).to("cpu", torch.float64)
        keep = None
        if fused is not None and kernels.add_partials(part, x.shape[0], self._state, self._buffers):  # (_add_fast)
            batch_min, batch_max = part[_MIN], part[_MAX]
        elif fused is None and bool(torch.isfinite(part).all()):
            self._add_fast(part, x.shape[0])
            batch_min, batch_max = part[_MIN], part[_MAX]
        else:
            keep = torch.isfinite(x)
            batch_min, batch_max = self._add_exact(_masked_partials(x, keep))
            sampled = None
        if fused is None or done is not None:
            self._add_histogram(x, keep, batch_min, batch_max, sampled, done)
        return fused

    def _live_grid(self) -> Grid:
        """:meth:`grid`, with contiguous tensors of the kernels' dtypes (the kernel changes them in place)."""
        grid = self.grid()
        ok = grid.level.dtype == torch.int64 and grid.first.dtype == grid.last.dtype == torch.float64 and all(
            t.is_contiguous() and t.device.type == "cpu" for t in (grid.level, grid.first, grid.last))
        if not ok:
            grid = Grid(grid.level.to("cpu", torch.int64).contiguous().clone(),
                        grid.first.to("cpu", torch.float64).contiguous().clone(),
                        grid.last.to("cpu", torch.float64).contiguous().clone())
            self._grid = grid
        return grid

    def _set_grid(self, grid: Grid, moved: bool) -> None:
        """Make ``grid`` the histogram's grid (``moved``: some window changed, so the stored edges follow)."""
        if moved:
            lo, hi = grid.edges(self.hist_bins)
            self._state["hist_lo"].copy_(lo)
            self._state["hist_hi"].copy_(hi)
            self._binner = None
        self._grid = grid

    def _add_fast(self, part: Tensor, n: int) -> None:
        s = self._state
        shift, sum_c = part[_SHIFT], part[_SUM_C]
        batch_sum = n * shift + sum_c
        s["sum"] += batch_sum
        s["sum_sq"] += part[_SUM_SQ_C] + 2.0 * shift * sum_c + n * shift * shift
        s["sum_abs"] += part[_SUM_ABS]
        s["sum_sqrt_abs"] += part[_SUM_SQRT]
        pos_sum, neg_sum = _signed_sums(batch_sum, part[_SUM_ABS], part[_MIN], part[_MAX])
        s["pos_sum"] += pos_sum
        s["neg_sum"] += neg_sum
        s["pos_count"] += part[_POS_COUNT].round().long()
        s["count"] += n
        torch.minimum(s["min"], part[_MIN], out=s["min"])
        torch.maximum(s["max"], part[_MAX], out=s["max"])

    def _add_exact(self, part: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Add exact partials (any device); returns the batch's (min, max) on the CPU."""
        s = self._state
        names = list(part)
        moved = torch.stack([part[name].double() for name in names]).cpu()  # one transfer
        for name, value in zip(names, moved, strict=True):
            rule = self.reductions[name]
            if rule == "sum":
                s[name] += value.to(s[name].dtype)
            elif rule == "min":
                torch.minimum(s[name], value, out=s[name])
            else:
                torch.maximum(s[name], value, out=s[name])
        return moved[names.index("min")], moved[names.index("max")]

    def _add_histogram(
        self,
        x: Tensor,
        keep: Tensor | None,
        batch_min: Tensor,
        batch_max: Tensor,
        sampled: tuple[Tensor, Tensor] | None = None,
        done: Tensor | None = None,
    ) -> None:
        """Widen the grid to the extremes of the rows the histogram sees (``sampled``, when known), then bin those
        rows, of every neuron but those ``done`` already (binned by the fused kernel on their unchanged grid)."""
        k = self.hist_sample_every
        if k > 1 and sampled is not None:
            batch_min, batch_max = sampled
        elif k > 1:
            xs = x[::k]
            if keep is None:
                batch_min, batch_max = xs.amin(0), xs.amax(0)
            else:
                ks = keep[::k]
                batch_min = torch.where(ks, xs, math.inf).amin(0)
                batch_max = torch.where(ks, xs, -math.inf).amax(0)
            both = torch.stack([batch_min, batch_max]).to("cpu", torch.float64)  # one transfer
            batch_min, batch_max = both[0], both[1]
        if done is not None:  # the neurons the kernel binned keep their grid
            batch_min = torch.where(done, math.inf, batch_min)
            batch_max = torch.where(done, -math.inf, batch_max)
        old = self.grid()
        new = fit_grid(old, batch_min, batch_max, self.hist_bins)
        s = self._state
        moved = _grid_moved(old, new)
        if moved:
            regrid(s["hist"], old, new, inplace=True)
        self._set_grid(new, moved)
        todo = None if done is None else (~done).nonzero().squeeze(1)
        if todo is None or todo.numel() == self.width:
            if self._binner is None:
                self._binner = Binner(new, self.hist_bins)
            self._binner.add_to(s["hist"].view(-1), x, keep, k)
            return
        # Only the neurons left: their columns of the sampled rows, binned on their part of the grid.
        rows = x[::k] if k > 1 else x
        kept = None if keep is None else (keep[::k] if k > 1 else keep)[:, todo.to(x.device)]
        sub = Binner(Grid(new.level[todo], new.first[todo], new.last[todo]), self.hist_bins)
        counts = torch.zeros(todo.numel() * (self.hist_bins + 2), dtype=torch.int64)
        sub.add_to(counts, rows[:, todo.to(x.device)], kept)
        s["hist"].index_add_(0, todo, counts.view(todo.numel(), self.hist_bins + 2))

    # --------------------------------------------------------------------------------------------- merge
    @classmethod
    def _check_states(cls, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        for side in (a, b):
            if Grid.from_state(side["hist"], side["hist_lo"], side["hist_hi"]) is None:
                raise NeurospecError(
                    "cannot merge a NeuronStats histogram recorded by an earlier neurospec version (edges fixed "
                    "from the first batch): record the run again"
                )

    def _merge_custom(self, other: Mapping[str, Tensor]) -> None:
        """Merge the histograms: both move to the grid of their values together, then add."""
        theirs = Grid.from_state(other["hist"], other["hist_lo"], other["hist_hi"])
        mine = self.grid()
        assert theirs is not None  # checked by _check_states
        # The other side's extremes, as values on the lower edges of its first and last cells (same cells).
        step = torch.exp2(theirs.level.double())
        vmin = torch.where(theirs.has_data, theirs.first * step, math.inf)
        vmax = torch.where(theirs.has_data, theirs.last * step, -math.inf)
        # Raise my level to theirs first, so that their cells are whole cells of the result.
        joint = fit_grid(mine, vmin, vmax, self.hist_bins)
        joint = _raise_to(joint, theirs.level, self.hist_bins)
        s = self._state
        total = regrid(s["hist"], mine, joint) + regrid(other["hist"].to(s["hist"].device), theirs, joint)
        s["hist"].copy_(total)
        lo, hi = joint.edges(self.hist_bins)
        s["hist_lo"].copy_(lo)
        s["hist_hi"].copy_(hi)
        self._grid = joint
        self._binner = None

    # --------------------------------------------------------------------------------------------- read
    def histogram(self) -> Histogram:
        """The histogram with its edges and the exact extremes (views of the state: do not modify)."""
        s = self._state
        return Histogram(counts=s["hist"], lo=s["hist_lo"], hi=s["hist_hi"], min=s["min"], max=s["max"])

    def compute(self) -> dict[str, Tensor]:
        """Per-neuron statistics, each float64 ``[width]``; NaN for a neuron without finite values.

        ``count, nonfinite, mean, var`` (population), ``std``, ``rms`` (sqrt of the mean of x^2, which equals
        sqrt(var + mean^2)), ``mean_abs, mean_sqrt_abs, frac_pos`` (fraction of x > 0), ``mean_pos`` (mean of
        x * 1[x > 0]), ``mean_neg`` (mean of x * 1[x <= 0]), ``min, max``, ``peak`` (the mode: 100 bins between
        min and max, see :func:`~neurospec.record.histogram.peak`), and ``out_of_range``: the fraction of the
        neuron's histogram mass in the under/overflow counts, i.e. located only as "below lo" / "above hi" (0 for
        histograms of this version, which widen instead; histograms saved by earlier versions, whose edges came
        from the first batch, can have some). A ``UserWarning`` says when some neuron has more than
        ``OUT_OF_RANGE_WARN`` (1%) of its mass out of range, as its peak and quantiles are then unreliable.
        """
        s = self._state
        base = self.location_scale()
        count = base["count"]
        has = count > 0
        n = torch.where(has, count, 1.0)

        def mean_of(name: str) -> Tensor:
            return torch.where(has, s[name] / n, math.nan)

        return {
            "count": count,
            "nonfinite": s["nonfinite"].double(),
            "mean": base["mean"],
            "var": base["var"],
            "std": base["std"],
            "rms": base["rms"],
            "mean_abs": mean_of("sum_abs"),
            "mean_sqrt_abs": mean_of("sum_sqrt_abs"),
            "frac_pos": torch.where(has, s["pos_count"].double() / n, math.nan),
            "mean_pos": mean_of("pos_sum"),
            "mean_neg": mean_of("neg_sum"),
            "min": base["min"],
            "max": base["max"],
            "peak": peak(self),
            "out_of_range": self._out_of_range(),
        }

    def location_scale(self) -> dict[str, Tensor]:
        """``count, mean, var, std, rms, min, max`` as :meth:`compute` gives them, from the sums and extremes alone
        (no histogram work: the peak costs more than, e.g., a W1 score from the histogram)."""
        s = self._state
        count = s["count"].double()
        has = count > 0
        n = torch.where(has, count, 1.0)
        mean = torch.where(has, s["sum"] / n, math.nan)
        mean_sq = torch.where(has, s["sum_sq"] / n, math.nan)
        var = (mean_sq - mean * mean).clamp(min=0.0)
        return {"count": count, "mean": mean, "var": var, "std": var.sqrt(), "rms": mean_sq.sqrt(),
                "min": torch.where(has, s["min"], math.nan), "max": torch.where(has, s["max"], math.nan)}

    def _out_of_range(self) -> Tensor:
        counts = self._state["hist"]
        total = counts.sum(1).double()
        frac = torch.where(total > 0, (counts[:, 0] + counts[:, -1]).double() / total.clamp(min=1.0), math.nan)
        bad = frac > OUT_OF_RANGE_WARN
        if bool(bad.any()):
            warnings.warn(
                f"{int(bad.sum())} of {self.width} neurons have more than {OUT_OF_RANGE_WARN:.0%} of their histogram "
                f"mass outside the histogram's bins (at most {float(frac[bad].max()):.1%}; histograms recorded by an "
                "earlier neurospec version): their peaks and quantiles are unreliable; record the run again",
                stacklevel=3,
            )
        return frac


def merge_stats(parts: Sequence[Mapping[str, NeuronStats]]) -> dict[str, dict[str, Tensor]]:
    """Computed statistics (:meth:`NeuronStats.compute`) of the union of several token sets, ``{site: stats}``, from
    each set's ``{site: NeuronStats}``, by exact merging; the inputs are not changed.

    Moments and extremes are exact. Histograms merge exactly too, so the result's ``peak`` is that of the union; when
    some part holds a histogram of an earlier version (which cannot merge), every histogram is dropped and ``peak``
    is NaN.
    """
    if not parts:
        raise NeurospecError("no statistics to merge")
    keep = all(st.histogram_mergeable() for part in parts for st in part.values())
    merged: dict[str, NeuronStats] = {}
    for part in parts:
        for s, st in part.items():
            st = st if keep else st.without_histogram()
            if s in merged:
                merged[s].merge(st)
            else:
                merged[s] = type(st).from_state_dict({k: v.clone() for k, v in st.state_dict().items()}, **st.meta())
    return {s: st.compute() for s, st in merged.items()}
