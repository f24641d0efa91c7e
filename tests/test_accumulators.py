"""Accumulators against brute-force NumPy/SciPy answers on the full data, merge properties and round trips."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage, stats

from neurospec.errors import NeurospecError
from neurospec.record.accumulators import (
    CoMoments,
    NeuronStats,
    Reservoir,
    from_safetensors,
    peak,
    quantiles,
    rebin,
    spearman_from_samples,
    to_safetensors,
)
from neurospec.record.histogram import CELL_LIMIT, MIN_LEVEL, Histogram, cdf, gaussian_smooth, spread

W = 24


def make_batches(
    seed: int, dtype: torch.dtype, sizes=(300, 211, 257), nonfinite: bool = True
) -> list[torch.Tensor]:
    """Batches with varied per-neuron scales and offsets, a large-mean neuron, a constant one and non-finite values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, W, dtype=torch.float64)
    offset = torch.linspace(-3, 3, W, dtype=torch.float64)
    out = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, W, generator=g, dtype=torch.float64) * scale + offset
        x[:, 0] = 100.0 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)  # mean >> std
        x[:, 1] = 0.0  # dead neuron
        x[:, 2] = torch.relu(x[:, 2])  # many exact zeros
        x = x.to(dtype)
        if nonfinite and i > 0:  # the first (calibration) batch stays finite
            x[3, 5] = math.nan
            x[7, 5] = math.inf
            x[11, 6] = -math.inf
            x[:, 7] = math.nan  # a neuron that is all NaN in this batch
            x[0, :] = math.nan  # a whole row
        out.append(x)
    return out


def reference_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    fin = np.isfinite(x)
    xz = np.where(fin, x, 0.0)
    n = fin.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xz.sum(0) / n
        var = np.array([np.var(x[fin[:, j], j]) if n[j] else np.nan for j in range(x.shape[1])])
        return {
            "count": n,
            "nonfinite": (~fin).sum(0).astype(np.float64),
            "mean": mean,
            "var": var,
            "std": np.sqrt(var),
            "rms": np.sqrt((xz**2).sum(0) / n),
            "mean_abs": np.abs(xz).sum(0) / n,
            "mean_sqrt_abs": np.sqrt(np.abs(xz)).sum(0) / n,
            "frac_pos": (xz > 0).sum(0) / n,
            "mean_pos": np.where(xz > 0, xz, 0).sum(0) / n,
            "mean_neg": np.where(xz <= 0, xz, 0).sum(0) / n,
            "min": np.where(fin, x, np.inf).min(0),
            "max": np.where(fin, x, -np.inf).max(0),
        }


def feed(acc, batches):
    for b in batches:
        acc.update(b)
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_neuron_stats_match_brute_force(dtype):
    batches = make_batches(0, dtype)
    got = feed(NeuronStats(W), batches).compute()
    x = torch.cat(batches).double().numpy()
    ref = reference_stats(x)
    for name in ("count", "nonfinite", "frac_pos", "min", "max"):
        np.testing.assert_array_equal(got[name].numpy(), ref[name], err_msg=name)
    for name in ("mean", "rms", "mean_abs", "mean_sqrt_abs", "mean_pos", "mean_neg"):
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=2e-6, atol=1e-7, err_msg=name)
    # Variance relative to itself: the large-mean neuron 0 (mean 100, std 0.01) needs the per-batch centring.
    live = ref["var"] > 0
    np.testing.assert_allclose(got["var"].numpy()[live], ref["var"][live], rtol=1e-4)
    np.testing.assert_allclose(got["std"].numpy()[live], ref["std"][live], rtol=1e-4)
    assert got["var"][1] == 0 and got["mean"][1] == 0 and got["peak"][1] == 0
    assert all(v.dtype == torch.float64 and v.shape == (W,) for v in got.values())


def test_neuron_stats_without_finite_values_are_nan():
    x = torch.randn(50, 4)
    x[:, 3] = math.nan
    got = feed(NeuronStats(4), [x]).compute()
    assert got["count"][3] == 0 and got["nonfinite"][3] == 50
    for name in ("mean", "var", "rms", "frac_pos", "min", "max", "peak"):
        assert torch.isnan(got[name][3]) and torch.isfinite(got[name][:3]).all(), name


def grid_reference(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force in float64 per neuron: the smallest level at which the finite values fit into ``bins`` cells of
    width 2**level (cell indices within +-2**23), the window's first cell, and the counts [width, bins + 2]."""
    levels, firsts, counts = [], [], []
    for col in x.T:
        v = col[np.isfinite(col)]
        level = MIN_LEVEL
        while True:
            c = np.floor(v / 2.0**level)
            if len(v) == 0 or (c.max() - c.min() < bins and c.min() >= -CELL_LIMIT and c.max() < CELL_LIMIT):
                break
            level += 1
        first = c.min() if len(v) else np.nan
        counts.append(np.bincount((c - first + 1).astype(int), minlength=bins + 2) if len(v) else np.zeros(bins + 2))
        levels.append(level)
        firsts.append(first)
    return np.array(levels), np.array(firsts), np.stack(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_histogram_equals_brute_force_binning_on_its_grid(dtype):
    batches = make_batches(1, dtype)
    acc = feed(NeuronStats(W, hist_bins=64), batches)
    levels, firsts, want = grid_reference(torch.cat(batches).double().numpy(), 64)
    grid = acc.grid()
    np.testing.assert_array_equal(grid.level.numpy(), levels)
    np.testing.assert_array_equal(grid.first.numpy(), firsts)
    np.testing.assert_array_equal(acc.histogram().counts.numpy(), want)  # exact, value by value
    h = acc.histogram()
    live = ~np.isnan(firsts)
    np.testing.assert_array_equal(h.lo.numpy()[live], firsts[live] * 2.0 ** levels[live])
    np.testing.assert_array_equal(h.hi.numpy()[live], (firsts[live] + 64) * 2.0 ** levels[live])


def test_histogram_sample_every():
    batches = make_batches(2, torch.float32)
    acc = feed(NeuronStats(W, hist_sample_every=3), batches)
    rows = torch.cat([b[::3] for b in batches])
    np.testing.assert_array_equal(acc.histogram().counts.numpy(), grid_reference(rows.double().numpy(), 256)[2])
    assert acc.compute()["count"].sum() == sum(torch.isfinite(b).sum().item() for b in batches)
    assert acc.meta()["hist_sample_every"] == 3


def test_float32_and_float64_binning_agree_and_tiny_negatives_get_cell_minus_one():
    # Neuron 0 spans about 2000, so its level is above 0 and x * 2**-level underflows for the float32 subnormal
    # -1e-45; exactly, that value lies in cell -1 (just below 0) and 0.0 / -0.0 in cell 0.
    x = torch.tensor([[-1e-45, 1.0], [0.0, 1.5], [-0.0, 2.0], [1000.0, -3.0], [-1000.0, 7.0]], dtype=torch.float32)
    a = feed(NeuronStats(2, hist_bins=16), [x[:3], x[3:]])
    b = feed(NeuronStats(2, hist_bins=16), [x.double()])
    assert a.grid().level[0] > 0
    for name, t in a.state_dict().items():
        if name.startswith("hist"):
            assert torch.equal(t, b.state_dict()[name]), name
    np.testing.assert_array_equal(a.histogram().counts.numpy(), grid_reference(x.double().numpy(), 16)[2])


def test_grid_of_constant_huge_tiny_and_empty_neurons():
    x = torch.tensor([[0.0, 5.0, 3e30, 1e-30, math.nan, -2.5]] * 4, dtype=torch.float32)
    x[0, 5] = 2.5
    acc = feed(NeuronStats(6, hist_bins=8), [x[:1], x[1:]])
    h, grid = acc.histogram(), acc.grid()
    got = acc.compute()
    for j in range(4):
        assert h.lo[j] <= x[0, j] < h.hi[j] and got["peak"][j] == x[0, j].double()
    assert grid.level[0] == MIN_LEVEL and h.counts[0, 1] == 4  # a constant 0 sits in the window's first cell
    assert torch.isnan(h.lo[4]) and torch.isnan(got["peak"][4]) and torch.isnan(got["out_of_range"][4])
    # -2.5 (x3) and 2.5: at level 0 cells -3 and 2 fit into 8 bins, at level -1 cells -5 and 4 do not.
    assert (grid.level[5], h.lo[5], h.hi[5]) == (0, -3.0, 5.0) and h.counts[5, 1] == 3 and h.counts[5, 6] == 1
    assert (grid.first[:4].abs() < CELL_LIMIT).all()
    np.testing.assert_array_equal(h.counts.numpy(), grid_reference(x.double().numpy(), 8)[2])


def test_saved_stats_with_an_old_calib_margin_still_load():
    """Earlier versions wrote ``calib_margin`` into a NeuronStats' metadata; such files still load."""
    acc = NeuronStats(3)
    acc.update(torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [10.0, 10.0, 10.0]]))
    again = NeuronStats.from_state_dict(acc.state_dict(), **acc.meta(), calib_margin=0.25)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in acc.state_dict().items())
    assert "calib_margin" not in again.meta()


def test_merge_stats_keeps_histograms_and_leaves_the_parts_alone():
    """Merged statistics equal those of the concatenated tokens (moments, extremes and now the peak too)."""
    from neurospec.record.accumulators import merge_stats

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(200, 4, generator=g) * (i + 1) + i for i in range(3)]
    parts = []
    for x in xs:
        acc = NeuronStats(4, hist_bins=32)
        acc.update(x)
        parts.append({"s": acc})
    before = [p["s"].state_dict() for p in parts]
    whole = NeuronStats(4, hist_bins=32)
    whole.update(torch.cat(xs))
    got, want = merge_stats(parts)["s"], whole.compute()
    for k in ("count", "min", "max", "peak"):
        assert torch.equal(got[k], want[k]), k
    for k in ("mean", "std", "rms", "mean_abs"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9)  # float32 partial sums per batch
    assert all(torch.equal(b[k], p["s"].state_dict()[k]) for b, p in zip(before, parts, strict=True) for k in b)


# ------------------------------------------------------------------------------------------------- robust mode
def adversarial_batches(seed: int) -> list[torch.Tensor]:
    """A first batch constant near 0, then 40k values per neuron from a skewed distribution with mode 3."""
    g = torch.Generator().manual_seed(seed)
    first = torch.full((64, 3), 0.01) + 1e-4 * torch.randn(64, 3, generator=g)
    gamma = torch.distributions.Gamma(torch.tensor([5.0, 9.0, 3.0]), torch.tensor([4 / 3, 8 / 3, 2 / 3]))
    torch.manual_seed(seed)
    rest = gamma.sample((40_000,))  # modes (k - 1) / rate = 3 for each neuron
    return [first] + list(rest.split(4000))


def test_peak_survives_an_unrepresentative_first_batch():
    batches = adversarial_batches(0)
    acc = feed(NeuronStats(3), batches)
    full = torch.cat(batches).double().numpy()
    got = acc.compute()
    assert (got["out_of_range"] == 0).all()
    for j in range(3):
        coarse = (full[:, j].max() - full[:, j].min()) / 100
        want = numpy_peak(full[:, j])  # the recipe's 100-bin histogram of the full tensor
        assert abs(got["peak"][j].item() - want) <= coarse + 1e-9, (j, got["peak"][j].item(), want)
        assert abs(got["peak"][j].item() - 3.0) < 3 * coarse  # near the distribution's mode


def test_histogram_ignores_order_and_batching_and_merges_exactly():
    batches = adversarial_batches(1)
    x = torch.cat(batches)
    whole = feed(NeuronStats(3, hist_bins=64), batches).state_dict()
    g = torch.Generator().manual_seed(5)
    for size in (401, 1000, 4003):
        rows = x[torch.randperm(x.shape[0], generator=g)]
        shuffled = feed(NeuronStats(3, hist_bins=64), list(rows.split(size)))
        left = feed(NeuronStats(3, hist_bins=64), [rows[:700]])
        right = feed(NeuronStats(3, hist_bins=64), [rows[700:]])
        merged = NeuronStats(3, hist_bins=64).merge(right).merge(left)
        for name in ("hist", "hist_lo", "hist_hi"):
            assert torch.equal(shuffled.state_dict()[name], whole[name]), (size, name)
            assert torch.equal(merged.state_dict()[name], whole[name]), (size, name)


def legacy_stats() -> NeuronStats:
    """A state saved by an earlier version: edges [0, 1) fixed from a first batch, 30% of one neuron's mass above."""
    acc = NeuronStats(2, hist_bins=10)
    state = acc.state_dict()
    state["hist"][0, 1:11] = 10
    state["hist"][1, 1:11] = 7
    state["hist"][1, 11] = 30
    state["hist_lo"][:] = 0.0
    state["hist_hi"][:] = 0.95
    state["count"][:] = 100
    state["min"][:], state["max"][:] = 0.0, torch.tensor([0.94, 5.0], dtype=torch.float64)
    acc.load_state_dict(state)
    return acc


def test_out_of_range_mass_of_an_old_histogram_is_reported_and_warned():
    acc = legacy_stats()
    with pytest.warns(UserWarning, match="1 of 2 neurons .* 30.0%"):
        got = acc.compute()
    assert got["out_of_range"].tolist() == [0.0, 0.3]
    with pytest.raises(NeurospecError, match="earlier neurospec version"):
        acc.update(torch.zeros(1, 2))
    with pytest.raises(NeurospecError, match="earlier neurospec version"):
        NeuronStats(2, hist_bins=10).merge(acc)


# ------------------------------------------------------------------------------------------------- merge
def test_merge_equals_sequential_exactly():
    a, b = make_batches(3, torch.float32, sizes=(400, 333))
    whole = feed(NeuronStats(W), [a, b])
    left = feed(NeuronStats(W), [a])
    right = feed(NeuronStats(W), [b])
    merged = left.merge(right)
    for name, t in whole.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name


def test_merge_of_several_batches_matches_up_to_rounding():
    batches = make_batches(4, torch.bfloat16, sizes=(200, 150, 170, 90))
    whole = feed(NeuronStats(W), batches)
    left = feed(NeuronStats(W), batches[:2])
    right = feed(NeuronStats(W), batches[2:])
    merged = left.merge(right).state_dict()
    for name, t in whole.state_dict().items():
        if t.dtype == torch.float64:
            torch.testing.assert_close(merged[name], t, rtol=1e-13, atol=1e-12, equal_nan=True)
        else:
            assert torch.equal(merged[name], t), name


def test_merge_with_empty_is_identity_and_adopts_edges():
    a = make_batches(5, torch.float32, sizes=(100,))[0]
    full = feed(NeuronStats(W), [a])
    before = full.state_dict()
    full.merge(NeuronStats(W))
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    empty = NeuronStats(W).merge(full)
    assert all(torch.equal(before[k], v) for k, v in empty.state_dict().items())
    torch.testing.assert_close(empty.compute(), full.compute(), equal_nan=True, rtol=0, atol=0)


def test_merge_incompatible_raises_and_leaves_state():
    a = make_batches(6, torch.float32, sizes=(100,), nonfinite=False)[0]
    left = feed(NeuronStats(2, hist_bins=10), [a[:, :2]])
    before = left.state_dict()
    with pytest.raises(ValueError, match="earlier neurospec version"):
        left.merge(legacy_stats())
    assert all(torch.equal(before[k], v) for k, v in left.state_dict().items())
    left = feed(NeuronStats(W), [a])
    with pytest.raises(ValueError, match="settings"):
        left.merge(NeuronStats(W + 1))
    with pytest.raises(ValueError, match="settings"):
        left.merge(NeuronStats(W, hist_bins=32))
    with pytest.raises(ValueError, match="cannot merge"):
        left.merge(CoMoments(W))


def test_update_validates_input():
    acc = NeuronStats(4)
    with pytest.raises(ValueError, match=r"\[tokens, 4\]"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="floating"):
        acc.update(torch.zeros(3, 4, dtype=torch.int64))
    acc.update(torch.zeros(2, 3, 4))  # [batch, seq, width] is flattened
    assert acc.compute()["count"].tolist() == [6.0] * 4
    with pytest.raises(ValueError):
        NeuronStats(0)


def test_inference_mode_then_merge_and_save():
    a, b = make_batches(7, torch.float32, sizes=(64, 64))
    with torch.inference_mode():
        left = feed(NeuronStats(W), [a])
        right = feed(NeuronStats(W), [b])
        res = feed(Reservoir(W, 8, seed=1), [a])
    left.merge(right)
    res.merge(feed(Reservoir(W, 8, seed=2), [b]))
    left.state_dict(), res.state_dict()


# ------------------------------------------------------------------------------------------------- peak, quantiles
@functools.lru_cache(maxsize=4)
def bimodal(n: int, seed: int) -> torch.Tensor:
    """Three neurons, each 70% N(2, 0.3) and 30% N(-1, 0.3), scaled and shifted (do not modify the result)."""
    rng = np.random.default_rng(seed)
    k = int(0.7 * n)
    cols = []
    for shift, scale in ((0.0, 1.0), (5.0, 2.0), (-1.0, 0.5)):
        v = np.concatenate([rng.normal(2, 0.3, k), rng.normal(-1, 0.3, n - k)])
        rng.shuffle(v)
        cols.append(v * scale + shift)
    return torch.tensor(np.stack(cols, 1), dtype=torch.float32)


def numpy_peak(v: np.ndarray, bins: int = 100, sigma: float = 0.0) -> float:
    counts, edges = np.histogram(v, bins=bins, range=(v.min(), v.max()))
    if sigma:
        counts = ndimage.gaussian_filter1d(counts.astype(float), sigma, mode="reflect")
    i = int(np.argmax(counts))
    return 0.5 * (edges[i] + edges[i + 1])


@pytest.mark.parametrize("smooth", [0.0, 2.0])
@pytest.mark.parametrize("assign", ["overlap", "centre"])
def test_peak_matches_numpy_mode(smooth, assign):
    # 200k values: enough that the brute-force 100-bin mode is itself stable to about one bin.
    x = bimodal(200_000, 0)
    acc = feed(NeuronStats(3), list(x.split(50_000)))
    got = peak(acc, bins=100, smooth=smooth, assign=assign)
    x64 = x.double().numpy()
    # "centre" re-binning aliases (coarse bins get 1 or 2 stored bins' mass): allow it one more bin.
    slack = 2 if (assign, smooth) == ("centre", 0.0) else 1
    for j, (scale, shift) in enumerate(((1.0, 0.0), (2.0, 5.0), (0.5, -1.0))):
        coarse = (x64[:, j].max() - x64[:, j].min()) / 100
        want = numpy_peak(x64[:, j], sigma=smooth)
        assert abs(got[j].item() - want) <= slack * coarse + 1e-9, (j, got[j].item(), want)
        assert abs(got[j].item() - (2 * scale + shift)) < 3 * coarse  # the mode of the 70% component
    if smooth == 0 and assign == "overlap":
        torch.testing.assert_close(acc.compute()["peak"], got)


def test_kde_peak_matches_scipy_gaussian_kde_argmax():
    # A narrow component (30%, sd 0.1 at -1) and a wide one (70%, sd 1 at 2): a kernel of 0.1 sd keeps the narrow
    # spike highest, one of 0.5 sd flattens it below the wide hump, so the answer depends on the bandwidth rule.
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(-1, 0.1, 3000), rng.normal(2, 1.0, 7000)])
    x = torch.tensor(np.stack([v, 3 * v + 1], 1), dtype=torch.float32)
    acc = feed(NeuronStats(2), list(x.split(3000)))
    x64 = x.double().numpy()
    np.testing.assert_allclose(spread(acc).numpy(), x64.std(0), rtol=1e-3)
    for bw, near in ((0.1, -1.0), (0.5, 2.0)):
        got = peak(acc, method="kde", bandwidth=bw)
        for j in range(2):
            d = x64[:, j]
            grid = np.linspace(d.min(), d.max(), 801)
            want = grid[np.argmax(stats.gaussian_kde(d, bw_method=bw)(grid))]
            coarse = (d.max() - d.min()) / 100
            assert abs(got[j].item() - want) <= coarse, (bw, j, got[j].item(), want)
            assert abs(want - (near if j == 0 else 3 * near + 1)) < 0.2 * (1 + 2 * j)
    with pytest.raises(ValueError, match="smooth"):
        peak(acc, method="kde", smooth=1.0)
    with pytest.raises(ValueError, match="method"):
        peak(acc, method="mode")


def test_peak_of_constant_and_point_masses():
    x = torch.tensor([[3.0, 0.0], [3.0, 1.0], [3.0, 1.0], [3.0, 1.0], [3.0, 0.5]])
    got = peak(feed(NeuronStats(2), [x]))
    assert got[0] == 3.0
    assert abs(got[1] - (1.0 - 0.5 / 100)) < 1e-9  # the top bin [0.99, 1]


def test_rebin_conserves_mass_and_smoothing_matches_scipy():
    x = bimodal(5000, 1)
    acc = feed(NeuronStats(3, hist_bins=64), [x])
    for assign in ("overlap", "centre"):
        coarse = rebin(acc, 100, assign)
        torch.testing.assert_close(coarse.sum(1), acc.histogram().counts.sum(1).double())
    counts = torch.rand(3, 40, dtype=torch.float64)
    for sigma in (0.7, 3.0, 15.0):
        want = ndimage.gaussian_filter1d(counts.numpy(), sigma, axis=1, mode="reflect")
        np.testing.assert_allclose(gaussian_smooth(counts, sigma).numpy(), want, rtol=1e-12)


def test_quantiles_match_numpy_within_a_bin():
    x = bimodal(20000, 2)
    acc = feed(NeuronStats(3), [x[:10000], x[10000:]])
    h = acc.histogram()
    q = torch.tensor([0.0, 0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999, 1.0])
    got = quantiles(acc, q)
    want = np.quantile(x.double().numpy(), q.numpy(), axis=0)
    bin_width = ((h.hi - h.lo) / h.bins).numpy()
    assert got.shape == (9, 3)
    assert (np.abs(got.numpy() - want) <= bin_width).all()
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[-1].numpy(), want[-1])
    # the CDF at the quantiles gives the probabilities back
    back = cdf(acc, got[1:-1].T.contiguous())
    torch.testing.assert_close(back, q[1:-1].double().expand(3, -1), atol=1e-9, rtol=0)


def test_quantiles_with_out_of_range_mass_are_monotone_and_bounded():
    # A histogram as saved by an earlier version: edges from the first 100 rows, later data far outside them.
    x = bimodal(4000, 3)
    allx = torch.cat([x[:100], x[100:] * 3]).double()
    lo, hi = x[:100].double().amin(0), x[:100].double().amax(0)
    pos = ((allx - lo) / (hi - lo) * 64 + 1).floor().clamp(0, 65).long()
    counts = torch.stack([torch.bincount(pos[:, j], minlength=66) for j in range(3)])
    acc = Histogram(counts, lo, hi, allx.amin(0), allx.amax(0))
    assert (counts[:, 0] + counts[:, -1] > 1000).all()
    q = torch.linspace(0, 1, 101)
    got = quantiles(acc, q)
    assert (got.diff(dim=0) >= 0).all()
    torch.testing.assert_close(got[0], allx.amin(0), rtol=0, atol=0)
    torch.testing.assert_close(got[-1], allx.amax(0), rtol=0, atol=0)
    with pytest.raises(ValueError):
        quantiles(acc, [1.5])


# ------------------------------------------------------------------------------------------------- reservoir
def reservoir_keys(seed: int, sizes) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for n in sizes])


def test_reservoir_keeps_rows_with_smallest_keys():
    x = torch.randn(500, 6)
    sizes = (120, 7, 300, 73)
    r = feed(Reservoir(6, 50, seed=11), list(x.split(sizes)))
    keys = reservoir_keys(11, sizes)
    want = x[torch.argsort(keys)[:50]]
    assert torch.equal(r.compute()["samples"], want)
    assert int(r.state_dict()["seen"]) == 500
    small = feed(Reservoir(6, 50, seed=3), [x[:20], x[20:30]])
    samples = small.compute()["samples"]
    assert samples.shape == (30, 6)
    assert sorted(map(tuple, samples.tolist())) == sorted(map(tuple, x[:30].tolist()))


def test_reservoir_merge_equals_smallest_keys_of_union():
    x = torch.randn(700, 5, dtype=torch.bfloat16)
    a = feed(Reservoir(5, 64, seed=1), [x[:300], x[300:400]])
    b = feed(Reservoir(5, 64, seed=2), [x[400:]])
    keys = torch.cat([reservoir_keys(1, (300, 100)), reservoir_keys(2, (300,))])
    want = x[torch.argsort(keys)[:64]].float()
    merged = a.merge(b)
    assert torch.equal(merged.compute()["samples"], want)
    assert int(merged.state_dict()["seen"]) == 700
    with pytest.raises(ValueError, match="same seed"):
        feed(Reservoir(5, 64, seed=1), [x[:10]]).merge(feed(Reservoir(5, 64, seed=1), [x[10:20]]))
    feed(Reservoir(5, 64, seed=1), [x[:10]]).merge(Reservoir(5, 64, seed=1))  # an empty part is harmless


@pytest.mark.parametrize("split", [False, True])
def test_reservoir_is_uniform(split):
    n, k, blocks, runs = 1000, 50, 10, 200
    x = torch.arange(n, dtype=torch.float32)[:, None]
    hits = np.zeros(blocks)
    for seed in range(runs):
        if split:  # two halves recorded apart, then merged
            r = feed(Reservoir(1, k, seed=2 * seed), [x[:600]]).merge(
                feed(Reservoir(1, k, seed=2 * seed + 1), [x[600:]])
            )
        else:
            r = feed(Reservoir(1, k, seed=seed), list(x.split(128)))
        rows = r.compute()["samples"][:, 0].long()
        assert rows.unique().numel() == k
        hits += np.bincount((rows // (n // blocks)).numpy(), minlength=blocks)
    expected = runs * k / blocks
    chi2 = ((hits - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 degrees of freedom: P(chi2 > 30) ~ 4e-4


def test_reservoir_resume_continues_the_key_stream(tmp_path):
    x = torch.randn(300, 4)
    whole = feed(Reservoir(4, 20, seed=5), [x[:100], x[100:]])
    first = feed(Reservoir(4, 20, seed=5), [x[:100]])
    save_file(first.state_dict(), tmp_path / "r.safetensors")
    resumed = Reservoir.from_state_dict(load_file(tmp_path / "r.safetensors"), **first.meta())
    resumed.update(x[100:])
    assert torch.equal(resumed.compute()["samples"], whole.compute()["samples"])


# ------------------------------------------------------------------------------------------------- co-moments
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_comoments_match_numpy(dtype):
    g = torch.Generator().manual_seed(8)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    batches = []
    for n in (300, 200, 250):
        x = torch.randn(n, 6, generator=g, dtype=torch.float64) @ mix + torch.tensor([50.0, 0, 1, -2, 0, 3])
        x[:, 4] = 7.0  # constant neuron
        batches.append(x.to(dtype))
    batches[1][5, 2] = math.nan  # a dropped row
    acc = feed(CoMoments(6), batches)
    x = torch.cat(batches).double()
    x = x[torch.isfinite(x).all(1)].numpy()
    got = acc.compute()
    assert int(acc.state_dict()["dropped"]) == 1 and int(acc.state_dict()["count"]) == len(x)
    np.testing.assert_allclose(got["mean"].numpy(), x.mean(0), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(got["cov"].numpy(), np.cov(x.T, bias=True), rtol=1e-5, atol=1e-5)
    live = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(got["corr"].numpy()[np.ix_(live, live)], np.corrcoef(x[:, live].T), atol=1e-6)
    assert (got["corr"][4] == 0).all() and (got["corr"][:, 4] == 0).all()
    assert torch.equal(got["corr"], got["corr"].T)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(9)
    base = rng.normal(size=(80, 1))
    x = np.concatenate([base + rng.normal(size=(80, 4)), np.round(rng.normal(size=(80, 2)) * 2)], axis=1)
    x[:, 5] = np.round(base[:, 0])  # ties, correlated
    got = spearman_from_samples(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, stats.spearmanr(x).statistic, atol=1e-12)
    const = spearman_from_samples(torch.tensor(np.concatenate([x, np.ones((80, 1))], 1)))
    assert (const[-1] == 0).all() and const[0, 0] == 1
    with pytest.raises(ValueError):
        spearman_from_samples(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))


# ------------------------------------------------------------------------------------------------- persistence
def all_accumulators():
    batches = make_batches(10, torch.float32, sizes=(100, 80))
    return [
        feed(NeuronStats(W, hist_bins=32, hist_sample_every=2), batches),
        feed(Reservoir(W, 30, seed=4), batches),
        feed(CoMoments(W), [b.nan_to_num() for b in batches]),
        NeuronStats(W),  # never updated
    ]


@pytest.mark.parametrize("i", range(4))
def test_state_dict_round_trip_through_safetensors(tmp_path, i):
    acc = all_accumulators()[i]
    save_file(acc.state_dict(), tmp_path / "a.safetensors")
    meta = json.loads(json.dumps(acc.meta()))
    back = type(acc).from_state_dict(load_file(tmp_path / "a.safetensors"), **meta)
    torch.testing.assert_close(back.compute(), acc.compute(), rtol=0, atol=0, equal_nan=True)
    tensors, metadata = to_safetensors(acc)
    save_file(tensors, tmp_path / "b.safetensors", metadata=metadata)
    from safetensors import safe_open

    with safe_open(tmp_path / "b.safetensors", framework="pt") as f:
        again = from_safetensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    torch.testing.assert_close(again.compute(), acc.compute(), rtol=0, atol=0, equal_nan=True)


def test_load_state_dict_rejects_other_shapes():
    state = NeuronStats(W).state_dict()
    with pytest.raises(ValueError, match="hist"):
        NeuronStats(W, hist_bins=8).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        NeuronStats(W).load_state_dict({k: v for k, v in state.items() if k != "sum"})


def test_registry_tags_and_unknown_kind():
    from neurospec.record.base import Accumulator, accumulator_class

    assert accumulator_class("neuron_stats") is NeuronStats
    assert accumulator_class("reservoir") is Reservoir and accumulator_class("comoments") is CoMoments
    with pytest.raises(ValueError, match="unknown accumulator kind"):
        accumulator_class("nope")
    with pytest.raises(TypeError, match="already used"):

        class Twin(Accumulator):
            kind = "neuron_stats"

    with pytest.raises(TypeError, match="unknown rules"):

        class Odd(Accumulator):
            reductions = {"x": "mean"}


def test_fresh_neuronstats_grid_is_the_one_its_state_gives():
    """A fresh NeuronStats starts from ``Grid.empty`` instead of deriving the grid from its empty state: the two
    agree, and so do they after the state is reloaded."""
    from neurospec.record.histogram import Grid

    st = NeuronStats(7, hist_bins=16)
    derived = Grid.from_state(st._state["hist"], st._state["hist_lo"], st._state["hist_hi"])
    for got, want in zip((st.grid().level, st.grid().first, st.grid().last),
                         (derived.level, derived.first, derived.last), strict=True):
        assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5)) and got.dtype == want.dtype
    st.update(torch.randn(9, 7, generator=torch.Generator().manual_seed(3)))
    again = NeuronStats.from_state_dict(st.state_dict(), **st.meta())
    for got, want in zip((st.grid().level, st.grid().first, st.grid().last),
                         (again.grid().level, again.grid().first, again.grid().last), strict=True):
        assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5))
