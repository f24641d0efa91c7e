"""Entanglement scores of output neurons: the W1 distance of each neuron's normalised output distribution to N(0, 1).

For neuron ``o`` with outputs ``y`` (see :mod:`neurospec.sparsity.outputs`), ``normalise="zscore"`` maps each output
to ``z = (y - mean) / std`` (population std, as the published follow-up code does); ``"none"`` keeps ``y``. Then::

    W1 = integral |F(z) - Phi(z)| dz

with ``F`` the CDF of the recorded histogram (piecewise linear: each bin's mass spread evenly over the bin, exact
extremes at the ends) and ``Phi`` the standard normal CDF. The integral is split at the neuron's extremes
``[z_min, z_max]``: outside them ``F`` is 0 or 1 and the normal tails integrate in closed form
(``int_{-inf}^a Phi = a Phi(a) + phi(a)``); inside, ``F`` and ``Phi`` are evaluated on ``points`` evenly spaced
positions and ``|F - Phi|`` integrated per segment as a linear function (exact where it changes sign). The score is
exact to within the histogram's resolution (a bin width in z units, about ``(z_max - z_min) / bins``) plus the
sampling of ``Phi`` (second order in ``(z_max - z_min) / points``). A constant neuron gets NaN.

Wasserstein neurons are the top ``fraction`` (default 3%) of each module's neurons by W1 (:func:`top_neurons`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.record import kernels
from neurospec.record.accumulators import NeuronStats
from neurospec.record.comoments import spearman_from_samples
from neurospec.record.histogram import Histogram, cdf
from neurospec.sparsity.outputs import ModuleOutputs

NORMALISE = ("zscore", "none")
_SQRT2 = math.sqrt(2.0)


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _phi_integral(x: Tensor) -> Tensor:
    """``int_{-inf}^x Phi(t) dt = x Phi(x) + phi(x)``."""
    return x * normal_cdf(x) + normal_pdf(x)


def _abs_linear_integral(d0: Tensor, d1: Tensor, h: Tensor) -> Tensor:
    """``int_0^h |d(t)| dt`` for ``d`` linear from ``d0`` to ``d1`` (exact also when it changes sign)."""
    same = (d0 * d1) >= 0
    denom = (d0.abs() + d1.abs()).clamp(min=1e-300)
    return torch.where(same, 0.5 * (d0.abs() + d1.abs()) * h, 0.5 * (d0 * d0 + d1 * d1) / denom * h)


def w1_from_stats(stats: NeuronStats, *, normalise: str = "zscore", points: int = 1024,
                  chunk: int = 1024) -> Tensor:
    """``FloatTensor[width]`` (float64): W1 of each neuron's normalised output histogram to N(0, 1) (module doc).

    On the CPU numba kernels do the work (:func:`neurospec.record.kernels.w1_normal`: per neuron, a pass that
    walks the CDF's knots and one that integrates, torch's ``erf`` between them); the
    torch code (``chunk`` neurons at a time) is the reference and runs on other devices, without numba or with
    ``NEUROSPEC_NO_KERNELS=1``. The two agree to float rounding."""
    if normalise not in NORMALISE:
        raise NeurospecError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    if points < 2:
        raise NeurospecError(f"points must be >= 2, got {points}")
    s = stats.location_scale()  # without the histogram peak of compute(), which costs more than the W1 kernel
    h = stats.histogram()
    if normalise == "zscore":
        mean, std = s["mean"], s["std"]
    else:
        mean, std = torch.zeros_like(s["mean"]), torch.ones_like(s["std"])
    steps = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    if not (kernels.usable(mean) and h.counts.device.type == "cpu"):
        return _w1_torch(s["min"], s["max"], mean, std, h, steps, chunk)
    out = kernels.w1_normal(steps, h.counts, h.lo, h.hi, h.min, h.max, s["min"], s["max"], mean, std)
    # The kernel walks the CDF's knots in order; a histogram whose range is reversed (none of this version's) has
    # unsorted knots: the torch code scores those neurons.
    odd = (h.hi < h.lo).nonzero().flatten().cpu()
    if odd.numel():
        part = Histogram(h.counts[odd], h.lo[odd], h.hi[odd], h.min[odd], h.max[odd])
        out[odd] = _w1_torch(s["min"][odd], s["max"][odd], mean[odd], std[odd], part, steps, chunk)
    return out


def _w1_torch(mn_all: Tensor, mx_all: Tensor, mean: Tensor, std: Tensor, h: Histogram, steps: Tensor,
              chunk: int) -> Tensor:
    """The torch implementation of :func:`w1_from_stats` on the given neurons (``steps``: linspace(0, 1, points))."""
    width = mean.shape[0]
    out = torch.full((width,), math.nan, dtype=torch.float64)
    for lo in range(0, width, chunk):
        sl = slice(lo, lo + chunk)
        mn, mx, m, sd = mn_all[sl], mx_all[sl], mean[sl], std[sl]
        ok = torch.isfinite(mn) & torch.isfinite(mx) & (sd > 0) & (mx > mn)
        # Positions in the neuron's own units, from its min to its max; their z values.
        y = mn[:, None] + (mx - mn)[:, None] * steps
        part = Histogram(h.counts[sl], h.lo[sl], h.hi[sl], h.min[sl], h.max[sl])
        f = cdf(part, y)
        z = (y - m[:, None]) / torch.where(ok, sd, 1.0)[:, None]
        d = f - normal_cdf(z)
        inside = _abs_linear_integral(d[:, :-1], d[:, 1:], z.diff(dim=1)).sum(1)
        z0, z1 = z[:, 0], z[:, -1]
        left = _phi_integral(z0)  # F = 0 below the min
        right = _phi_integral(-z1)  # F = 1 above the max: int_{z1}^inf (1 - Phi) = int_{-inf}^{-z1} Phi
        out[sl] = torch.where(ok, inside + left + right, math.nan)
    return out


def w1_exact(samples: Tensor, *, normalise: str = "zscore") -> Tensor:
    """W1 of the empirical distribution of each column of ``samples`` ``[n, width]`` (normalised as in
    :func:`w1_from_stats`) to N(0, 1), integrated exactly: the ECDF is a step function and ``Phi`` integrates in
    closed form on each step, split where ``Phi`` crosses the step. The reference the histogram score is tested
    against (``O(n log n)`` per neuron; holds all samples)."""
    from scipy.special import ndtri

    x = samples.detach().double()
    if normalise == "zscore":
        x = (x - x.mean(0)) / x.std(0, unbiased=False)
    x, _ = torch.sort(x, dim=0)
    n = x.shape[0]
    c = (torch.arange(1, n, dtype=torch.float64) / n)[:, None].expand(n - 1, x.shape[1])  # F on [x_i, x_{i+1})
    a, b = x[:-1], x[1:]
    star = torch.as_tensor(ndtri(c.numpy()), dtype=torch.float64)  # Phi(star) = c
    p = star.clamp(min=a, max=b)

    def seg(lo: Tensor, hi: Tensor, level: Tensor) -> Tensor:
        # int_lo^hi (level - Phi) dt, signed
        return level * (hi - lo) - (_phi_integral(hi) - _phi_integral(lo))

    # On [a, p]: Phi <= c (Phi increasing, p <= star); on [p, b]: Phi >= c.
    inside = (seg(a, p, c) - seg(p, b, c)).sum(0)
    return inside + _phi_integral(x[0]) + _phi_integral(-x[-1])


def top_neurons(scores: Tensor, fraction: float) -> Tensor:
    """Indices (``LongTensor``, best first) of the ``max(1, round(fraction * width))`` highest finite scores."""
    if not 0 < fraction <= 1:
        raise NeurospecError(f"the top fraction must lie in (0, 1], got {fraction}")
    k = top_count(scores.numel(), fraction)
    s = torch.where(torch.isfinite(scores), scores.double(), -math.inf)
    return torch.argsort(s, descending=True, stable=True)[:k]


def top_count(width: int, fraction: float) -> int:
    """How many neurons of a ``width``-neuron module make its top ``fraction``: ``max(1, round(fraction * width))``."""
    return max(1, min(width, int(round(fraction * width))))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two vectors over the entries where both are finite (NaN under 3 such)."""
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 3:
        return math.nan
    return float(spearman_from_samples(torch.stack([a[keep].double(), b[keep].double()], dim=1))[0, 1])


@dataclass
class ModuleScores:
    """Per-neuron scores of one linear module, each ``FloatTensor[out]`` (float64)."""

    name: str
    w1: Tensor
    mean: Tensor
    var: Tensor
    kurtosis: Tensor
    bimodality: Tensor
    difficulty: Tensor
    tokens: int
    extra: dict[str, Tensor] = field(default_factory=dict)

    def summary(self, fraction: float = 0.03) -> dict:
        finite = self.w1[torch.isfinite(self.w1)]
        top = top_neurons(self.w1, fraction)
        return {
            "mean": float(finite.mean()) if finite.numel() else math.nan,
            "max": float(finite.max()) if finite.numel() else math.nan,
            "top": [int(i) for i in top],
            "neurons": int(self.w1.numel()),
            "tokens": self.tokens,
            "difficulty_mean": float(self.difficulty[torch.isfinite(self.difficulty)].mean())
            if bool(torch.isfinite(self.difficulty).any()) else math.nan,
            "spearman_w1_difficulty": spearman(self.w1, self.difficulty),
            "kurtosis_mean": float(self.kurtosis[torch.isfinite(self.kurtosis)].mean())
            if bool(torch.isfinite(self.kurtosis).any()) else math.nan,
        }


def score_outputs(outputs: Mapping[str, ModuleOutputs], *, normalise: str = "zscore",
                  min_tokens: int = 4) -> dict[str, ModuleScores]:
    """Scores of every recorded module (W1, mean, variance, excess kurtosis, bimodality, mapping difficulty)."""
    res = {}
    for name, acc in outputs.items():
        n = acc.moments.n
        if n < min_tokens:
            raise NeurospecError(f"{name} saw {n} tokens; the scores need at least {min_tokens}: give more tokens")
        mom = acc.moments.compute()
        res[name] = ModuleScores(name, w1_from_stats(acc.stats, normalise=normalise), mom["mean"], mom["var"],
                                 mom["kurtosis"], mom["bimodality"], acc.difficulty.compute(), n)
    return res
