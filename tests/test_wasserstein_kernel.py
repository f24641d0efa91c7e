"""The numba W1 kernel against the torch reference path of ``w1_from_stats``."""

from __future__ import annotations

import math

import pytest
import torch

from neurospec.record import kernels
from neurospec.record.accumulators import NeuronStats
from neurospec.sparsity.wasserstein import top_neurons, w1_from_stats

pytestmark = [
    pytest.mark.skipif(not kernels.usable(torch.zeros(1, 1)), reason="numba is not available"),
    pytest.mark.filterwarnings("ignore:.*outside the histogram's bins:UserWarning"),  # the planted under/overflow
]


def _planted_stats(width: int = 150, n: int = 2000, seed: int = 0) -> NeuronStats:
    """Neurons of mixed shapes with random scales and offsets (columns cycle through the kinds below); column 5 is
    constant, columns 6 and 7 get under/overflow mass (as histograms of earlier versions can hold) below and above
    their bins."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, width, generator=g)
    u = torch.rand(n, width, generator=g)
    kinds = [
        r,                                                         # Gaussian
        torch.where(u < 0.3, -2.0, 2.5) + 0.4 * r,                 # bimodal, unequal modes
        r.exp(),                                                   # skewed (log-normal)
        torch.tan(math.pi * (u - 0.5)).clamp(-1e3, 1e3),           # heavy-tailed (Cauchy)
        r.pow(3),                                                  # heavy-tailed, symmetric
    ]
    x = torch.stack([kinds[j % len(kinds)][:, j] for j in range(width)], 1)
    scale = torch.exp(2.0 * torch.randn(width, generator=g))
    x = x * scale + 10.0 * torch.randn(width, generator=g)
    x[:, 5] = 3.25
    st = NeuronStats(width)
    for part in x.split(700):  # several batches, the last one shorter
        st.update(part)
    s = st._state
    for j, col in ((6, 0), (7, -1)):
        s["hist"][j, col] += 300
        s["min"][j] -= 2.0 * scale[j]
        s["max"][j] += 2.0 * scale[j]
    return st


def _both(st: NeuronStats, monkeypatch, chunk: int = 1024, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    got = w1_from_stats(st, **kw)
    monkeypatch.setattr(kernels, "ENABLED", False)
    ref = w1_from_stats(st, chunk=chunk, **kw)
    monkeypatch.setattr(kernels, "ENABLED", True)
    return got, ref


@pytest.mark.parametrize("normalise", ["zscore", "none"])
def test_kernel_equals_torch_path_on_planted_neurons(normalise, threads, monkeypatch):
    st = _planted_stats()
    h = st.histogram()
    assert int(h.counts[6, 0]) > 0 and int(h.counts[7, -1]) > 0  # the under/overflow neurons really have mass
    got, ref = _both(st, monkeypatch, chunk=64, normalise=normalise)  # 150 neurons: the last chunk is partial
    assert math.isnan(float(got[5])) and math.isnan(float(ref[5]))  # the constant neuron
    keep = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), keep) and int(keep.sum()) == st.width - 1
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-12, atol=0.0)
    assert torch.equal(top_neurons(got, 0.2), top_neurons(ref, 0.2))


def test_kernel_keeps_the_top_three_percent_and_nan_rows(monkeypatch):
    """Top 3% of 400 neurons (12): the same set in the same order; a neuron without data and one with a reversed histogram
    range (unsorted knots: scored by the torch code) agree too."""
    st = _planted_stats(width=400, n=600, seed=3)
    s = st._state
    s["hist_lo"][9], s["hist_hi"][9] = s["hist_hi"][9].clone(), s["hist_lo"][9].clone()
    s["hist"][11] = 0  # histogram emptied: the CDF is undefined
    got, ref = _both(st, monkeypatch)
    assert math.isnan(float(got[11])) and math.isnan(float(ref[11]))
    assert math.isfinite(float(ref[9]))
    keep = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), keep)
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-12, atol=0.0)
    assert torch.equal(top_neurons(got, 0.03), top_neurons(ref, 0.03))


def test_location_and_scale_match_the_samples():
    """W1 reads ``NeuronStats.location_scale()`` (mean, population std, min, max without the costly peak of
    ``compute()``): equal to the samples' own statistics; a constant neuron whose variance rounds below zero gets
    std 0, a neuron without data NaN."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 1e-3, 1.0, 1.0]) + 2.0
    x[:, 3] = 1.1  # constant: here sum_sq / n - mean^2 rounds below 0 (to -2e-16)
    st = NeuronStats(5)
    st.update(x)
    got = st.location_scale()
    assert torch.allclose(got["mean"], x.mean(0), rtol=1e-12)
    assert torch.allclose(got["std"][[0, 1, 2, 4]], x.std(0, unbiased=False)[[0, 1, 2, 4]], rtol=1e-6)
    assert 0.0 <= float(got["std"][3]) < 1e-6  # not NaN
    assert torch.equal(got["min"], x.amin(0)) and torch.equal(got["max"], x.amax(0))
    empty = NeuronStats(1)
    empty.update(torch.full((10, 1), math.nan))  # no finite value
    none = empty.location_scale()
    assert all(math.isnan(float(none[k][0])) for k in ("mean", "std", "min", "max")) and float(none["count"][0]) == 0


def test_kernel_in_chunks_keeps_each_neurons_score_and_nan(threads, monkeypatch):
    """Chunks of 7 neurons per thread (the last one partial): neurons without a score in later chunks (an emptied histogram,
    a constant neuron) stay NaN, and every other score equals the torch path's, so nothing of one chunk's buffers
    leaks into the next."""
    monkeypatch.setattr(kernels, "W1_CHUNK_POINTS", 7 * 1024)
    st = _planted_stats(width=40, n=900, seed=8)
    s = st._state
    s["hist"][23] = 0
    s["hist"][37] = 0
    x = torch.full((50, 40), 2.0)
    const = NeuronStats(40)
    const.update(x)
    for key in s:  # neuron 30: constant (std 0)
        s[key][30] = const._state[key][30]
    got, ref = _both(st, monkeypatch, chunk=16)
    nan = torch.isnan(ref)
    assert nan[[5, 23, 30, 37]].all() and int(nan.sum()) == 4
    assert torch.equal(torch.isnan(got), nan)
    torch.testing.assert_close(got[~nan], ref[~nan], rtol=1e-12, atol=0.0)


def test_kernel_scores_a_neuron_whose_cdf_rises_over_a_subnormal_gap(threads, monkeypatch):
    """Float64 outputs whose minimum is a negative subnormal: the window's first edge is clipped to it and the
    next edge is 0, so the CDF rises by one count over a gap of 1e-320, whose slope overflows to inf. The kernel
    then interpolates by the fraction of the gap (as the torch code does) instead of returning NaN."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(300, 3, generator=g, dtype=torch.float64)
    x[0, 0] = -1e-320  # the minimum, a subnormal, alone in the cell just below 0
    x[0, 1] = -5e-324  # the smallest subnormal
    st = NeuronStats(3)
    st.update(x)
    got, ref = _both(st, monkeypatch)
    assert bool(torch.isfinite(ref).all())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)


def test_quantile_kernel_equals_the_torch_path_bit_for_bit(threads, monkeypatch):
    """``histogram.quantiles`` on the CPU takes the numba kernel: the same bits as the torch code for neurons of
    every shape, with under/overflow mass, a constant neuron, an emptied histogram and one with NaN edges, at the
    probabilities 0 and 1 and the ones that fall exactly on a knot's mass (where ``searchsorted`` ties)."""
    from neurospec.record.histogram import Histogram, quantiles

    st = _planted_stats(width=120, n=1500, seed=5)
    s = st._state
    s["hist"][11] = 0  # an emptied histogram: NaN
    s["hist_lo"][12] = math.nan  # an unusable window: NaN
    h = st.histogram()
    h = Histogram(h.counts, h.lo, h.hi, h.min, h.max)
    total = float(h.counts[0].sum())
    cums = h.counts[0].double().cumsum(0)
    # a probability whose target mass q * total is exactly the mass of a knot of neuron 0 (searchsorted ties)
    on_knot = next(float(c) / total for c in cums[10:200] if 0 < float(c) < total and float(c) / total * total == c)
    q = torch.tensor([0.0, 1e-4, 0.01, 0.25, 0.5, on_knot, 0.9, 0.999, 1.0], dtype=torch.float64)
    calls = []
    real = kernels.quantiles
    monkeypatch.setattr(kernels, "quantiles", lambda *a: calls.append(1) or real(*a))
    got = quantiles(h, q)
    assert calls  # the kernel path ran
    monkeypatch.setattr(kernels, "ENABLED", False)
    ref = quantiles(h, q)
    assert got.shape == ref.shape == (9, 120)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(ref[:, 11]).all() and torch.isnan(ref[:, 12]).all() and int(torch.isnan(ref).sum()) == 18
    keep = ~torch.isnan(ref)
    assert torch.equal(got[keep], ref[keep])
