"""The fused CPU kernels against the torch reference path and the full-tensor statistics."""

from __future__ import annotations

import importlib
import math
import os
import signal
import time

import pytest
import torch

from neurospec.record import kernels
from neurospec.record.accumulators import NeuronStats, Reservoir, _fast_partials
from neurospec.record.histogram import MIN_LEVEL, Binner, Grid, fit_grid

pytestmark = pytest.mark.skipif(not kernels.usable(torch.zeros(1, 1)), reason="numba is not available")

BINS = 16


def binner_for(values: torch.Tensor, bins: int = BINS) -> Binner:
    """A Binner on the grid of ``values`` ``[tokens, width]`` (float64)."""
    v = values.double()
    return Binner(fit_grid(Grid.empty(v.shape[1]), v.amin(0), v.amax(0), bins), bins)


def kernel_counts(b: Binner, x: torch.Tensor, keep: torch.Tensor | None = None, step: int = 1) -> torch.Tensor:
    out = torch.zeros(b.width * (b.bins + 2), dtype=torch.int64)
    kernels.histogram_add(out, x, b._scale64, b._shift64, b.bins, keep, step)
    return out


def assert_same_counts(b: Binner, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    ref = b.counts_torch(x, keep)
    got = kernel_counts(b, x, keep)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} slots differ"
    # every kept value lands in exactly one slot
    assert int(got.sum()) == (x.numel() if keep is None else int(keep.sum()))


def adversarial_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (values that fit the grid, values to bin)``, float32 ``[tokens, width]``."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(200, 7, generator=g)
    cases = {}
    cases["random"] = (r, r)
    big = 1e4 + 1e-3 * r
    cases["huge_mean_small_spread"] = (big, big)
    z = r.clone()
    z[::3] = 0.0
    z[1::5] = -0.0
    cases["exact_zeros"] = (z, z)
    # level > 0: a window of width 16 * 2**3, and tiny negative values whose product with 2**-3 rounds to -0
    wide = torch.linspace(-60.0, 60.0, 200)[:, None].repeat(1, 3)
    tiny = torch.tensor([[-1e-45, -1e-38, -1e-30, 1e-45, 0.0, -0.0]]).T.repeat(1, 3)
    cases["negative_near_minus_zero"] = (wide, torch.cat([wide, tiny]))
    # values exactly on the bin edges (multiples of the bin width 2**-2 = 0.25)
    edges = (torch.arange(-8, 9, dtype=torch.float32) * 0.25)[:, None].repeat(1, 4)
    cases["bin_edges"] = (edges[1:-1], edges)
    # values far outside the window (under/overflow slots), up to float32's largest
    out = torch.tensor([[-3e38, -1e6, -1.0, 0.5, 1.0, 2.0, 1e6, 3e38]]).T.repeat(1, 2)
    cases["beyond_window"] = (torch.tensor([[0.0, 0.5], [1.0, 1.0]]), out)
    # a neuron constant at 0 sits on the finest level (2**-126): products overflow float32
    const = torch.zeros(5, 2)
    extra = torch.tensor([[-1.0, 1e30], [-1e-45, 1e-45], [3e38, -3e38]])
    cases["constant_finest_level"] = (const, torch.cat([const, extra]))
    cases["one_row"] = (r[:1], r[:1])
    cases["ragged_rows"] = (r[:199], r[:199])  # not a multiple of the kernel's four rows at a time
    cases["width_one"] = (r[:, :1], r[:, :1])
    return cases


@pytest.mark.parametrize("name", list(adversarial_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram_kernel_equals_torch_path(name, dtype, threads):
    fit, x = adversarial_cases()[name]
    b = binner_for(fit)
    assert_same_counts(b, x.to(dtype))


def test_histogram_kernel_checks_the_under_minus_zero_case():
    """The -0 case is really exercised: a level above 0 and values that land in cell -1 only through the fix."""
    fit, x = adversarial_cases()["negative_near_minus_zero"]
    b = binner_for(fit)
    assert int(b._scale64.log2().max()) < 0  # level > 0
    assert bool(((x * b._scale64.float()) == 0).logical_and(x < 0).any())  # float32 products that are -0
    assert_same_counts(b, x)


def test_histogram_kernel_float64_products_that_underflow(threads):
    """Float64 input: a tiny negative value times 2**-level rounds to -0 in float64 too; it belongs in cell -1."""
    wide = torch.linspace(-60.0, 60.0, 50, dtype=torch.float64)[:, None].repeat(1, 2)
    tiny = torch.tensor([[-5e-324, -1e-310, 5e-324, -0.0]], dtype=torch.float64).T.repeat(1, 2)
    b = binner_for(wide)
    x = torch.cat([wide, tiny])
    assert bool(((x * b._scale64) == 0).logical_and(x < 0).any())
    assert_same_counts(b, x)


def test_histogram_kernel_non_contiguous_and_keep(threads):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 120, generator=g)
    x = base.T[:, ::2]  # [120, 5], not contiguous
    assert not x.is_contiguous()
    b = binner_for(x)
    assert_same_counts(b, x)
    bad = x.clone()
    bad[3, 1], bad[7, 4], bad[0, 0] = math.nan, math.inf, -math.inf
    keep = torch.isfinite(bad)
    assert_same_counts(b, bad, keep)
    # an arbitrary mask, also on finite entries
    mask = torch.rand(x.shape, generator=g) > 0.3
    assert_same_counts(b, x, mask)


def test_histogram_kernel_rows_step(threads):
    x = torch.randn(101, 6, generator=torch.Generator().manual_seed(3))
    b = binner_for(x)
    for step in (1, 2, 7, 200):
        assert torch.equal(kernel_counts(b, x, step=step), b.counts_torch(x[::step]))


def test_binner_counts_uses_the_kernel_and_falls_back(monkeypatch):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(4))
    b = binner_for(x)
    calls = []
    real = kernels.histogram_add
    monkeypatch.setattr(kernels, "histogram_add", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = b.counts(x)
    assert calls
    monkeypatch.setattr(kernels, "ENABLED", False)
    calls.clear()
    assert torch.equal(b.counts(x), fast) and not calls
    assert not kernels.usable(x)


# ------------------------------------------------------------------------------------------------ moments
def reference_moments(x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    d = x.double()
    shift = d[:: max(1, x.shape[0] // 64)].mean(0)
    c = d - shift
    return {
        "sum_c": c.sum(0),
        "sum_sq_c": (c * c).sum(0),
        "sum_abs": d.abs().sum(0),
        "sum_sqrt": d.abs().sqrt().sum(0),
        "pos": (d > 0).sum(0).double(),
        "min": d.amin(0),
        "max": d.amax(0),
        "shift": shift,
        "smin": d[::step].amin(0),
        "smax": d[::step].amax(0),
    }


@pytest.mark.parametrize("name", ["random", "huge_mean_small_spread", "exact_zeros", "one_row", "ragged_rows",
                                  "width_one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_kernel_against_float64_reference(name, dtype, threads):
    x = adversarial_cases()[name][1].to(dtype)
    step = 3
    got = kernels.moments(x, step)
    ref = reference_moments(x, step)
    assert got.shape == (kernels.MOMENT_ROWS, x.shape[1]) and got.dtype == torch.float64
    sqrt_tol = 1e-6 if dtype == torch.float32 else 1e-13  # sqrt taken in x's dtype
    scale = x.double().abs().sum(0) + 1e-300
    for row, key in enumerate(ref):
        if key in ("min", "max", "smin", "smax", "pos"):
            assert torch.equal(got[row], ref[key]), key
        elif key == "shift":
            torch.testing.assert_close(got[row], ref[key], rtol=1e-15, atol=0.0)
        elif key == "sum_sqrt":
            torch.testing.assert_close(got[row], ref[key], rtol=sqrt_tol, atol=0.0)
        elif key == "sum_sq_c":
            torch.testing.assert_close(got[row], ref[key], rtol=1e-12, atol=1e-300)
        else:
            assert bool(((got[row] - ref[key]).abs() <= 1e-12 * scale).all()), key
    # the torch path's partials (in x's dtype) agree to its own rounding
    fast = _fast_partials(x).double()
    torch.testing.assert_close(got[2:7], fast[2:7], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(got[7], fast[7], rtol=1e-5, atol=1e-5 * float(got[2].max()) / x.shape[0])
    sums = fast[1] + 2 * (fast[7] - got[7]) * fast[0] + x.shape[0] * (fast[7] - got[7]) ** 2  # to the kernel's shift
    torch.testing.assert_close(got[1], sums, rtol=1e-4, atol=1e-4 * float(got[1].max()))


@pytest.mark.parametrize("name", ["random", "huge_mean_small_spread", "one_row", "ragged_rows"])
def test_moments_kernel_higher_power_sums_against_float64_reference(name, threads):
    """``higher=True`` adds sum (x - shift)^3 and ^4 and leaves the other rows exactly as they were."""
    x = adversarial_cases()[name][1].float()
    plain = kernels.moments(x, 2)
    got = kernels.moments(x, 2, higher=True)
    assert got.shape == (kernels.MOMENT_ROWS + 2, x.shape[1])
    assert torch.equal(got[: kernels.MOMENT_ROWS], plain)
    d = x.double() - got[7]
    for row, power in zip(kernels.HIGHER_ROWS, (3, 4), strict=True):
        want = (d**power).sum(0)
        scale = (d.abs() ** power).sum(0) + 1e-300
        assert bool(((got[row] - want).abs() <= 1e-12 * scale).all()), power


def test_moments_kernel_flags_non_finite_input():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    for value in (math.nan, math.inf, -math.inf):
        bad = x.clone()
        bad[17, 2] = value  # not a row of the shift's sample
        got = kernels.moments(bad, 1)
        assert not bool(torch.isfinite(got).all())
        assert bool(torch.isfinite(got[:, [0, 1, 3, 4]]).all())  # only that neuron


# ----------------------------------------------------------------------------------------- end to end
def batches(seed: int) -> list[torch.Tensor]:
    """Batches whose range widens (the grid moves), with a large-mean neuron and non-finite entries in one batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate((64, 1, 130, 77)):
        x = torch.randn(n, 6, generator=g) * (1 + 3 * i)
        x[:, 0] = 5e3 + 1e-2 * x[:, 0]
        x[:, 1] = x[:, 1].clamp(min=0)  # a ReLU-like neuron with exact zeros
        out.append(x)
    out[2][5, 3], out[2][9, 4] = math.nan, math.inf
    out[3] = out[3].T.contiguous().T  # a strided view (column-major)
    assert not out[3].is_contiguous()
    return out


def record(data: list[torch.Tensor], dtype: torch.dtype, **kw) -> NeuronStats:
    s = NeuronStats(6, hist_bins=32, **kw)
    for x in data:
        s.update(x.to(dtype))
    return s


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neuron_stats_with_and_without_kernels(monkeypatch, every, dtype):
    data = batches(6)
    fast = record(data, dtype, hist_sample_every=every)
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = record(data, dtype, hist_sample_every=every)
    a, b = fast.state_dict(), slow.state_dict()
    for key in ("count", "nonfinite", "pos_count", "hist", "min", "max", "hist_lo", "hist_hi"):
        assert torch.equal(a[key], b[key]), key
    # the torch path sums each batch in x's dtype: equal to its rounding, about 1e-7 of the sum of |x|
    for key in ("sum", "sum_sq", "sum_abs", "sum_sqrt_abs", "pos_sum", "neg_sum"):
        size = a["sum_sq"] if key == "sum_sq" else a["sum_abs"]
        assert bool(((a[key] - b[key]).abs() <= 1e-6 * size).all()), key

    # and both equal the statistics of the whole data at once
    full = torch.cat(data).double()
    keep = torch.isfinite(full)
    v = torch.where(keep, full, 0.0)
    n = keep.sum(0).double()
    mean = v.sum(0) / n
    var = (torch.where(keep, full - mean, 0.0) ** 2).sum(0) / n
    got = fast.compute()
    torch.testing.assert_close(got["mean"], mean, rtol=1e-9, atol=1e-12)
    # (compute() takes mean(x^2) - mean^2 in float64: for the large-mean neuron that alone costs ~5e-7)
    torch.testing.assert_close(got["var"], var, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got["mean_sqrt_abs"], v.abs().sqrt().sum(0) / n, rtol=1e-6, atol=0.0)
    assert torch.equal(got["min"], torch.where(keep, full, math.inf).amin(0))
    assert torch.equal(got["max"], torch.where(keep, full, -math.inf).amax(0))
    assert torch.equal(a["pos_count"], (v > 0).sum(0))
    assert torch.equal(a["nonfinite"], (~keep).sum(0))
    # the histogram equals one of the whole (sampled) data on the final grid
    rows = torch.cat([x[::every] for x in data])
    rkeep = torch.isfinite(rows)
    whole = Binner(fast.grid(), 32).counts_torch(rows.to(dtype), rkeep).view(6, 34)
    assert torch.equal(a["hist"], whole)


def test_no_kernels_environment_variable(monkeypatch):
    try:
        monkeypatch.setenv("NEUROSPEC_NO_KERNELS", "1")
        assert importlib.reload(kernels).ENABLED is False
        assert not kernels.usable(torch.zeros(2, 2))
        monkeypatch.delenv("NEUROSPEC_NO_KERNELS")
        assert importlib.reload(kernels).ENABLED is True
    finally:
        monkeypatch.delenv("NEUROSPEC_NO_KERNELS", raising=False)
        importlib.reload(kernels)


def test_kernels_are_not_used_for_other_dtypes_or_devices():
    assert not kernels.usable(torch.zeros(2, 2, dtype=torch.float16))
    assert not kernels.usable(torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match="contiguous int64"):
        kernels.histogram_add(torch.zeros(4, dtype=torch.int32), torch.zeros(1, 1), torch.ones(1),
                              torch.zeros(1), 2)


def test_minimum_level_constant_is_finest():
    """The constant case above really is on the finest level (its products overflow float32)."""
    fit, _ = adversarial_cases()["constant_finest_level"]
    b = binner_for(fit)
    assert int(-b._scale64.log2().max()) == MIN_LEVEL


# ---------------------------------------------------------------------------------------------- reservoir
@pytest.mark.parametrize("k", [1, 7, 64])
def test_reservoir_moves_rows_in_place_like_the_torch_path(monkeypatch, k):
    """Batches before and after the sample is full, larger and smaller than k: the same state bit for bit."""
    g = torch.Generator().manual_seed(8)
    data = [torch.randn(n, 5, generator=g) for n in (3, 50, 1, 130, 40, 40, 200, 2)]

    def feed() -> dict[str, torch.Tensor]:
        r = Reservoir(5, k, seed=3)
        for x in data:
            r.update(x)
        return r.state_dict()

    calls = []
    real = kernels.move_rows
    monkeypatch.setattr(kernels, "move_rows", lambda *a: calls.append(1) or real(*a))
    fast = feed()
    assert calls
    monkeypatch.setattr(kernels, "ENABLED", False)
    slow = feed()
    for key in slow:
        assert torch.equal(fast[key], slow[key]), key
    assert int(fast["filled"]) == k and bool((fast["keys"].diff() > 0).all())


def test_move_rows_rejects_other_buffers():
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.move_rows(torch.zeros(3, 2, dtype=torch.float64), torch.arange(3), 3, torch.zeros(0, 2))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_work_in_a_forked_child(monkeypatch):
    """A child forked after the pool started gets its own pool (the parent's threads do not exist there)."""
    monkeypatch.setattr(kernels, "_MIN_PER_THREAD", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(9))
        expected = kernels.moments(x)  # starts the pool here
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if the kernels answer (and answer the same)
            ok = torch.equal(kernels.moments(x), expected)
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the kernels hung in a forked child")
        assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0
    finally:
        torch.set_num_threads(old)


def test_nan_without_a_mask_lands_in_the_underflow_slot():
    """The kernel never turns a NaN into a slot index outside its neuron's row (NeuronStats always passes a mask
    with non-finite input; a direct caller of histogram_add might not): it counts in the neuron's underflow slot."""
    x = torch.randn(64, 5)
    b = binner_for(x)
    clean = kernel_counts(b, x).view(5, BINS + 2)
    old = b.counts_torch(x[3:4]).view(5, BINS + 2)[2]  # where x[3, 2] counted before
    x[3, 2] = float("nan")
    got = kernel_counts(b, x).view(5, BINS + 2)
    expected = clean.clone()
    expected[2] -= old
    expected[2, 0] += 1
    assert torch.equal(got, expected)


def test_kernel_thread_count_follows_the_setting_not_only_torch(monkeypatch):
    """``NEUROSPEC_KERNEL_THREADS`` (``kernels.THREADS``) sets how many column ranges a call is split into,
    whatever torch's thread count; bad values are clear errors."""
    seen = []

    def fake(out, j_start, j_stop, _out):
        seen.append((j_start, j_stop))

    monkeypatch.setattr(kernels, "_MIN_PER_THREAD", 1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "THREADS", 1)
        kernels._in_parallel(fake, 10, 1000, None, None)
        assert seen == [(0, 10)]
        seen.clear()
        monkeypatch.setattr(kernels, "THREADS", 3)
        kernels._in_parallel(fake, 10, 1000, None, None)
        # first an empty range on the calling thread (the kernel compiled before threads call it at once)
        assert seen[0] == (0, 0) and sorted(seen[1:]) == [(0, 3), (3, 6), (6, 10)]
    finally:
        torch.set_num_threads(old)
    monkeypatch.setenv("NEUROSPEC_KERNEL_THREADS", "4")
    assert kernels._threads_from_env() == 4
    monkeypatch.setenv("NEUROSPEC_KERNEL_THREADS", "")
    assert kernels._threads_from_env() is None
    for bad in ("0", "two"):
        monkeypatch.setenv("NEUROSPEC_KERNEL_THREADS", bad)
        with pytest.warns(UserWarning, match="positive integer"):
            assert kernels._threads_from_env() is None


# ------------------------------------------------------------------------------- fused moments + histogram
def grid_batches(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Batches that move the grids in every way: ranges that grow by many levels at once, a neuron constant at 0
    (finest level) that then jumps, a huge-mean neuron, values near float32's limits, tiny negative values at a
    level above 0, new minima below the window, a single-row batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate((50, 1, 33, 120, 7, 64, 90)):
        x = torch.randn(n, 9, generator=g, dtype=torch.float64)
        x[:, 0] *= 10.0 ** (3 * i - 9)  # from 1e-9 up to 1e9: the level rises batch after batch
        x[:, 1] = 0.0 if i < 3 else x[:, 1] * 1e3  # constant 0 (finest level), then wide
        x[:, 2] = 1e6 + 1e-3 * x[:, 2]  # large mean, small spread
        x[:, 3] = x[:, 3] - 2.0 * i  # new minima below the window in every batch
        x[:, 4] = -1e-45 if i % 2 else x[:, 4] * 100.0  # tiny negatives (-0 products at a coarse level)
        x[:, 5] = x[:, 5].abs() * (3e37 if i == 5 else 1.0)  # one batch near float32's largest values
        x[:, 6] = torch.where(x[:, 6] > 0, x[:, 6], 0.0)  # ReLU-like: exact zeros
        x[:, 7] = torch.floor(x[:, 7] * 4) / 4  # values on bin edges
        x[:, 8] = torch.where(torch.arange(n) % 2 == 0, 0.5, 16.5)  # 17 cells of width 1: one too many for 16
        out.append(x.to(dtype))
    return out


def feed_both_paths(monkeypatch, data: list[torch.Tensor], *, bins: int, every: int) -> NeuronStats:
    """Feed ``data`` batch by batch to a NeuronStats on the kernel path and one on the torch path; after every batch
    their histograms, edges, extremes, counts and grids must be equal bit for bit. Returns the kernel path's."""
    fast = NeuronStats(data[0].shape[1], hist_bins=bins, hist_sample_every=every)
    slow = NeuronStats(data[0].shape[1], hist_bins=bins, hist_sample_every=every)
    for x in data:
        fast.update(x)
        monkeypatch.setattr(kernels, "ENABLED", False)
        slow.update(x)
        monkeypatch.setattr(kernels, "ENABLED", True)
        a, b = fast.state_dict(), slow.state_dict()
        for key in ("hist", "hist_lo", "hist_hi", "min", "max", "count", "nonfinite"):
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=0.0, equal_nan=True, msg=key)
        assert torch.equal(fast.grid().last.nan_to_num(0.5), slow.grid().last.nan_to_num(0.5))
    return fast


@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_histogram_moves_grids_exactly_as_the_torch_path(monkeypatch, every, dtype, threads):
    """The fused kernel fits each neuron's grid, moves its counts and bins the batch itself: the whole state equals
    the torch path's (fit_grid, regrid, Binner.counts_torch) bit for bit, batch after batch."""
    data = grid_batches(11, dtype)
    calls = []
    real = kernels.stats_update
    monkeypatch.setattr(kernels, "stats_update", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = feed_both_paths(monkeypatch, data, bins=16, every=every)
    assert len(calls) == len(data)
    levels = fast.grid().level
    assert int(levels[0]) > 0 and int(levels[4]) > 0  # the grids really moved up
    assert int(levels[8]) == 1 or every > 1  # 0.5 and 16.5 share no 16-cell window below level 1


def test_grid_changed_in_place_by_the_kernel_is_seen_by_the_torch_path(monkeypatch, threads):
    """The kernel moves the live grid in place; a torch-path batch after it (kernels off, or a batch where every
    neuron has a non-finite value) must bin on the moved grid, not on a binner built for the old one. Batches
    alternate between the paths, each one twice (the second time the grid does not move, so only a binner built
    for the moved grid bins it right); the state equals an all-torch-path one bit for bit."""
    data = [x for x in grid_batches(5, torch.float32) for _ in range(2)]
    data[9] = data[9].clone()
    data[9][0, :] = math.nan  # every neuron non-finite in this batch: the kernel bins none of them
    mixed = NeuronStats(9, hist_bins=16)
    slow = NeuronStats(9, hist_bins=16)
    for i, x in enumerate(data):
        monkeypatch.setattr(kernels, "ENABLED", i % 4 in (1, 2))
        mixed.update(x)
        monkeypatch.setattr(kernels, "ENABLED", False)
        slow.update(x)
    a, b = mixed.state_dict(), slow.state_dict()
    for key in ("hist", "hist_lo", "hist_hi", "min", "max", "count", "nonfinite"):
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=0.0, equal_nan=True, msg=key)


def test_reused_kernel_buffers_follow_reset_copies_and_loads(threads):
    """``NeuronStats.update`` reuses numpy views of its state between batches: after ``reset()``, a deep copy, a
    pickle round trip or ``load_state_dict`` the next batch must land in the accumulator's own (new) tensors, and
    a copy's batch must leave the original alone."""
    import copy
    import pickle

    data = grid_batches(21, torch.float32)
    first, second = data[0], data[3]

    def state(acc: NeuronStats) -> dict[str, torch.Tensor]:
        return acc.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=0.0, equal_nan=True, msg=key)

    acc = NeuronStats(9, hist_bins=16)
    acc.update(first)
    acc.reset()
    acc.update(second)
    only = NeuronStats(9, hist_bins=16)
    only.update(second)
    same(state(acc), state(only))

    acc = NeuronStats(9, hist_bins=16)
    acc.update(first)
    before = state(acc)
    both = NeuronStats(9, hist_bins=16)
    both.update(first)
    both.update(second)
    for twin in (copy.deepcopy(acc), pickle.loads(pickle.dumps(acc))):
        twin.update(second)
        same(state(twin), state(both))
        same(state(acc), before)  # the original did not see the copy's batch

    loaded = NeuronStats(9, hist_bins=16)
    loaded.update(second)  # views of its own state, before the load
    loaded.load_state_dict(before)
    loaded.update(second)
    same(state(loaded), state(both))


def test_stats_update_refuses_tensors_it_cannot_read_in_place():
    """The kernel reads the state through raw pointers: a wrong dtype, layout or width is a clear error before any
    memory is touched."""
    g = Grid.empty(4)
    counts = torch.zeros(4, 18, dtype=torch.int64)
    lo, hi = torch.full((4,), math.nan, dtype=torch.float64), torch.full((4,), math.nan, dtype=torch.float64)
    x = torch.randn(8, 4)
    args = [counts, g.level.clone(), g.first.clone(), g.last.clone(), lo, hi]
    for i, bad, what in ((5, hi.float(), "hi must be a contiguous torch.float64"),
                         (0, torch.zeros(18, 4, dtype=torch.int64).T, "counts must be a contiguous"),
                         (4, torch.full((5,), math.nan, dtype=torch.float64), "lo has shape")):
        wrong = list(args)
        wrong[i] = bad
        with pytest.raises(ValueError, match=what):
            kernels.stats_update(x, *wrong, 16, 1, False, kernels.UpdateBuffers())
    with pytest.raises(ValueError, match="a batch of width 3"):
        kernels.stats_update(x[:, :3], *args, 16, 1, False, kernels.UpdateBuffers())
    out, done, moved = kernels.stats_update(x, *args, 16, 1, False, kernels.UpdateBuffers())
    assert bool(done.all()) and moved and int(counts.sum()) == 32  # the same tensors, accepted


def test_fused_histogram_leaves_non_finite_neurons_to_the_caller(threads):
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(12))
    x[5, 1], x[9, 3] = math.nan, math.inf
    counts = torch.zeros(4 * 18, dtype=torch.int64)
    grid = Grid.empty(4)
    level, first, last = grid.level.clone(), grid.first.clone(), grid.last.clone()
    part, done = kernels.moments_histogram(x, counts, level, first, last, 16)
    assert done.tolist() == [True, False, True, False]
    view = counts.view(4, 18)
    assert int(view[1].sum()) == 0 and int(view[3].sum()) == 0 and bool(first[[1, 3]].isnan().all())
    ref = fit_grid(Grid.empty(4), x.double().amin(0), x.double().amax(0), 16)
    for j in (0, 2):
        assert int(level[j]) == int(ref.level[j]) and float(first[j]) == float(ref.first[j])
        want = Binner(Grid(ref.level[[j]], ref.first[[j]], ref.last[[j]]), 16).counts_torch(x[:, [j]])
        assert torch.equal(view[j], want)
    torch.testing.assert_close(part, kernels.moments(x), rtol=0.0, atol=0.0, equal_nan=True)
    with pytest.raises(ValueError, match="level must be a contiguous"):
        kernels.moments_histogram(x, counts, level.double(), first, last, 16)
    with pytest.raises(ValueError, match="do not match"):
        kernels.moments_histogram(x, counts[:-1], level, first, last, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openmp_team_equals_the_python_pool_and_one_thread(monkeypatch, dtype):
    """The moments kernel run by torch's OpenMP team (each thread claiming column ranges) gives exactly what the
    Python pool and a single call give: every column range is done once."""
    if kernels._openmp_team() is None:
        pytest.skip("no OpenMP runtime loaded by torch in this process")
    monkeypatch.setattr(kernels, "_MIN_PER_THREAD", 1)
    old = torch.get_num_threads()
    x = grid_batches(13, dtype)[3]
    x = torch.cat([x, -x * 3, x + 1], dim=1)  # 27 columns over 5 ranges

    def run() -> tuple[torch.Tensor, ...]:
        counts = torch.zeros(27 * 18, dtype=torch.int64)
        grid = Grid.empty(27)
        level, first, last = grid.level.clone(), grid.first.clone(), grid.last.clone()
        part, done = kernels.moments_histogram(x, counts, level, first, last, 16, 2, True)
        return part, done, counts, level, first, last, kernels.moments(x, 3)

    calls = []
    real = kernels._in_parallel
    monkeypatch.setattr(kernels, "_in_parallel", lambda *a: calls.append(1) or real(*a))
    try:
        torch.set_num_threads(5)
        team = run()
        assert not calls  # the team ran it, not the pool
        monkeypatch.setattr(kernels, "_team", False)
        pool = run()
        assert calls
        monkeypatch.setattr(kernels, "THREADS", 1)
        single = run()
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(team, pool, single, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)
        torch.testing.assert_close(a, c, rtol=0.0, atol=0.0, equal_nan=True)
    assert int(team[2].sum()) == 27 * len(range(0, x.shape[0], 2))  # every sampled value binned once


def test_kernels_reject_other_dtypes_and_bin_counts():
    """The team path reads raw memory: any dtype but float32/float64 is refused before it runs."""
    for dtype in (torch.int16, torch.float16, torch.int64):
        with pytest.raises(ValueError, match="float32 or float64"):
            kernels.moments(torch.ones(64, 8, dtype=dtype))
    g = Grid.empty(4)
    with pytest.raises(ValueError, match="bins must be in"):
        kernels.moments_histogram(torch.ones(8, 4), torch.zeros(4 * 3, dtype=torch.int64), g.level.clone(),
                                  g.first.clone(), g.last.clone(), 1)
    with pytest.raises(ValueError, match="hist_bins must be in"):
        NeuronStats(2, hist_bins=1)  # (values on both sides of 0 never fit one bin: the grid search never ends)
    from neurospec.errors import NeurospecError
    from neurospec.record.recorder import RecordConfig
    from neurospec.sparsity.outputs import new_outputs

    for bad in (1, kernels.MAX_BINS + 1):
        with pytest.raises(NeurospecError, match="hist_bins must be in"):
            RecordConfig(hist_bins=bad)
        with pytest.raises(NeurospecError, match="hist_bins must be in"):
            new_outputs("m", 4, hist_bins=bad)


@pytest.mark.parametrize("bins", [2, 3, 12, 17])
@pytest.mark.parametrize("every", [1, 3])
def test_fused_path_with_some_non_finite_neurons_and_any_bin_count(monkeypatch, bins, every):
    """Batches where only some neurons hold NaN or inf (the kernel bins the others, the masked path these), with
    bin counts that are not powers of two: the same state as the torch path, batch after batch."""
    data = grid_batches(14, torch.float32)
    data[2][1, 3], data[3][4, 5], data[3][0, 0] = math.nan, math.inf, -math.inf
    data[5][:, 6] = math.nan  # a neuron with no finite value in a batch
    fast = feed_both_paths(monkeypatch, data, bins=bins, every=every)
    assert int(fast.state_dict()["nonfinite"].sum()) > 3


def test_grid_coarsened_past_the_float64_range_keeps_negative_cells():
    """A grid moved up by more than ~1,074 levels at once: a negative cell's quotient underflows to -0 but still
    belongs to cell -1, so the result does not depend on how the values were split into batches."""
    tiny, huge = torch.tensor([[-1e-300]], dtype=torch.float64), torch.tensor([[1e300]], dtype=torch.float64)
    for enabled in (True, False):
        kernels_on = kernels.ENABLED
        kernels.ENABLED = enabled
        try:
            split = NeuronStats(1, hist_bins=16)
            split.update(tiny)
            split.update(huge)
            once = NeuronStats(1, hist_bins=16)
            once.update(torch.cat([tiny, huge]))
        finally:
            kernels.ENABLED = kernels_on
        a, b = split.state_dict(), once.state_dict()
        for key in ("hist", "hist_lo", "hist_hi"):
            assert torch.equal(a[key], b[key]), (enabled, key)
        assert float(a["hist_lo"][0]) < 0  # the window starts below the negative value


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_fused_kernel_non_finite_at_every_row_position(monkeypatch, rows, value, threads):
    """A non-finite value in each position of a four-row group and in each remainder row, the neuron's true min
    and max in other rows: that neuron is left to the masked path, the others are binned, and the state equals the
    torch path's bit for bit."""
    g = torch.Generator().manual_seed(20)
    for r in range(rows):
        x = torch.randn(rows, 4, generator=g)
        x[:, 1] = torch.arange(rows, dtype=torch.float32) - 2.0  # its min and max in other rows than r
        x[(r + 1) % rows, 2] = -7.0  # a neuron's min right next to its non-finite value
        x[r, 1] = value
        x[r, 2] = value
        counts = torch.zeros(4 * 18, dtype=torch.int64)
        grid = Grid.empty(4)
        part, done = kernels.moments_histogram(x, counts, grid.level.clone(), grid.first.clone(),
                                               grid.last.clone(), 16)
        assert done.tolist() == [True, False, False, True]
        assert not bool(torch.isfinite(part[:2, 1:3]).any())
        assert bool(torch.isfinite(part[:, [0, 3]]).all())
        data = [torch.randn(6, 4, generator=g), x, 3 * torch.randn(5, 4, generator=g)]
        for every in (1, 2):
            feed_both_paths(monkeypatch, data, bins=16, every=every)


@pytest.mark.parametrize(("bins", "width"), [(16, 3100), (1000, 600), (1 << 16, 20)])
def test_fused_kernel_several_column_blocks(monkeypatch, bins, width, threads):
    """Column ranges wider than the kernel's block (1,024 columns at 16 bins, 128 at 1,000, 16 at 2**16 and above):
    each block fits, moves and bins its own neurons exactly as the torch path."""
    g = torch.Generator().manual_seed(21)
    data = [torch.randn(n, width, generator=g) * (1 + 4 * i) for i, n in enumerate((9, 3, 22))]
    data[1][2, width - 5] = math.nan
    for every in (1, 3):
        feed_both_paths(monkeypatch, data, bins=bins, every=every)


def one_read_batches(dtype: torch.dtype) -> list[torch.Tensor]:
    """Batches for binning in the moments' own read: a first batch that gives every neuron but one a grid (neuron
    3 is all NaN: its block must be read twice in the next batch), then batches whose only value off its window
    is one new maximum in a middle group of four rows, one new minimum in a last (remainder) row, a NaN in a
    neuron that has a grid, values inside every window, and a batch that moves most windows at once."""
    g = torch.Generator().manual_seed(40)
    out = []
    for i, n in enumerate((64, 61, 64, 58, 64, 63, 64)):
        x = torch.randn(n, 40, generator=g, dtype=torch.float64) * 0.5
        if i == 0:
            x *= 4.0  # wide windows: the later batches stay inside them unless told otherwise
            x[:, 3] = math.nan
        if i == 2:
            x[29, 7] = 40.0  # a new maximum, alone in its four rows
        if i == 3:
            x[57, 11] = -40.0  # a new minimum in the last of 58 rows (58 = 4 * 14 + 2)
        if i == 4:
            x[10, 13] = math.nan
        if i == 6:
            x *= 1e3  # most windows move
        out.append(x.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [16, 256])
def test_binning_in_the_moments_read_equals_a_second_read(dtype, bins, threads):
    """With ``fuse`` the kernel bins a block in the same read as its moments, on the grids as they stand, and
    then corrects the neurons whose windows moved or that hold a non-finite value; without, it reads the block a
    second time. Counts, grids, ``done`` and partials must be equal bit for bit, batch after batch (the torch
    path equals the second read: the tests above)."""
    data = one_read_batches(dtype)
    width = data[0].shape[1]
    states = []
    for _ in range(2):
        grid = Grid.empty(width)
        states.append((torch.zeros(width * (bins + 2), dtype=torch.int64), grid.level.clone(), grid.first.clone(),
                       grid.last.clone()))
    for i, x in enumerate(data):
        if i == 1:  # end slots that already hold counts (as a histogram of an earlier version's may): kept as they are
            for counts, *_ in states:
                counts.view(width, bins + 2)[:, 0] = 5
                counts.view(width, bins + 2)[:, -1] = 7
        one = kernels.moments_histogram(x, *states[0], bins, 1, True, fuse=True)
        two = kernels.moments_histogram(x, *states[1], bins, 1, True, fuse=False)
        for a, b in zip(one + states[0], two + states[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True, msg=f"batch {i}")
        done = one[1]
        assert done.tolist() == [bool(torch.isfinite(x[:, j]).all()) for j in range(width)]
    counts = states[0][0].view(width, bins + 2)
    assert counts[:, 0].tolist() == [5] * width and counts[:, -1].tolist() == [7] * width  # nothing added there
    finite = [j for j in range(width) if j not in (3, 13)]
    per_neuron = counts.sum(1) - 12
    assert per_neuron[finite].tolist() == [sum(x.shape[0] for x in data)] * len(finite)
    assert int(per_neuron[13]) == sum(x.shape[0] for x in data) - data[4].shape[0]  # that batch: the caller's


def test_neuron_stats_bins_in_the_moments_read_once_few_windows_move(monkeypatch):
    """NeuronStats asks for binning in the moments' read only once it has seen three times the batch's rows (the
    first batches move many windows, where a second read is cheaper); that both reads give the same counts is
    tested above."""
    seen = []
    real = kernels.stats_update
    monkeypatch.setattr(kernels, "stats_update", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    acc = NeuronStats(8, hist_bins=16)
    g = torch.Generator().manual_seed(41)
    for n in (10, 10, 10, 10, 50, 10):
        acc.update(torch.randn(n, 8, generator=g))
    assert seen == [False, False, False, True, False, True]
    acc.reset()
    acc.update(torch.randn(10, 8, generator=g))
    assert seen[-1] is False


def test_add_partials_equals_the_torch_state_update_bit_for_bit():
    """``kernels.add_partials`` (the CPU path's state update) gives the state of ``NeuronStats._add_fast`` exactly,
    batch after batch, for neurons of either sign and of both; partials with a NaN or inf change nothing."""
    g = torch.Generator().manual_seed(30)
    a, b = NeuronStats(6), NeuronStats(6)
    for i in range(4):
        x = torch.randn(37 + i, 6, generator=g) * (1 + 3 * i)
        x[:, 0] = x[:, 0].abs() + 1.0  # positive only
        x[:, 1] = -x[:, 1].abs() - 0.5  # negative only
        x[:, 2] = 1e4 + x[:, 2]  # large mean, small spread
        part = kernels.moments(x, 1)[: kernels.MOMENT_ROWS]
        assert kernels.add_partials(part, x.shape[0], a._state)
        b._add_fast(part, x.shape[0])
        for name in kernels._STATE_SUMS:
            assert torch.equal(a._state[name], b._state[name]), name
    before = {k: a._state[k].clone() for k in kernels._STATE_SUMS}
    for value in (math.nan, math.inf, -math.inf):
        bad = part.clone()
        bad[3, 4] = value
        assert not kernels.add_partials(bad, 40, a._state)
        assert all(torch.equal(before[k], a._state[k]) for k in before)
