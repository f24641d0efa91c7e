"""Output-side recording and the W1 entanglement score: against brute-force references and scipy."""

import math

import pytest
import torch
from scipy import stats as ss

from neurospec.errors import NeurospecError
from neurospec.models.linear import weight_out_in
from neurospec.record.accumulators import NeuronStats
from neurospec.sparsity.outputs import (
    CentralMoments,
    MappingDifficulty,
    choose_linears,
    draw_pairs,
    record_outputs,
)
from neurospec.sparsity.wasserstein import score_outputs, w1_exact, w1_from_stats

from tiny import tiny_model


def _planted(n=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    gauss = 2.0 * torch.randn(n, generator=g) + 1.0
    bimodal = torch.where(torch.rand(n, generator=g) < 0.5, -3.0, 3.0) + 0.3 * torch.randn(n, generator=g)
    skewed = torch.randn(n, generator=g).exp()
    return torch.stack([gauss, bimodal, skewed], 1)


def test_w1_of_histogram_matches_exact_integral_and_scipy_on_planted_neurons():
    x = _planted()
    st = NeuronStats(3)
    for part in x.split(1000):
        st.update(part)
    w = w1_from_stats(st)
    exact = w1_exact(x)
    h = st.histogram()
    resolution = ((h.hi - h.lo) / h.bins / x.double().std(0, unbiased=False))
    assert torch.all((w - exact).abs() <= resolution), (w, exact, resolution)
    assert float(w[0]) < 0.05 and float(w[1]) > 0.4  # Gaussian near 0, bimodal far from N(0,1)
    # the brute-force integral itself against scipy's W1 to a large N(0,1) sample
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    ref = torch.randn(400_000, generator=torch.Generator().manual_seed(1)).numpy()
    sp = torch.tensor([ss.wasserstein_distance(z[:, i].numpy(), ref) for i in range(3)], dtype=torch.float64)
    assert torch.allclose(exact, sp, atol=0.01)


def test_w1_without_normalisation_measures_raw_outputs():
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0)).double()
    st = NeuronStats(1)
    st.update(x + 5.0)
    assert float(w1_from_stats(st, normalise="none")[0]) == pytest.approx(5.0, abs=0.05)
    assert float(w1_exact(x + 5.0, normalise="none")[0]) == pytest.approx(5.0, abs=0.05)


def test_central_moments_stream_and_merge_like_one_pass_and_match_scipy():
    x = _planted().double()
    one = CentralMoments(3)
    one.update(x)
    parts = [CentralMoments(3) for _ in range(3)]
    for acc, chunk in zip(parts, x.split([100, 2500, 3400]), strict=True):
        for piece in chunk.split(333):
            acc.update(piece)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    a, b = one.compute(), merged.compute()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12), k
    xn = x.numpy()
    assert torch.allclose(a["kurtosis"], torch.tensor(ss.kurtosis(xn, axis=0)), rtol=1e-6)
    assert torch.allclose(a["skewness"], torch.tensor(ss.skew(xn, axis=0)), rtol=1e-6)
    n = x.shape[0]
    g1, g2 = ss.skew(xn, axis=0, bias=False), ss.kurtosis(xn, axis=0, bias=False)
    bc = (g1**2 + 1) / (g2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    assert torch.allclose(a["bimodality"], torch.tensor(bc), rtol=1e-6)
    assert float(a["bimodality"][1]) > 5 / 9 > float(a["bimodality"][0])


@pytest.mark.parametrize("kernels_on", [True, False])
def test_module_outputs_moments_match_scipy_on_adversarial_batches(kernels_on, monkeypatch):
    """The CPU path takes the 3rd/4th moments from the fused kernel's power sums about a per-batch shift, the
    reference path from torch; both must match scipy over all tokens, also for neurons whose mean is 1e4 times
    their spread, a constant-then-jumping neuron, a heavy tail, and batches of very different sizes and scales."""
    from neurospec.record import kernels
    from neurospec.sparsity.outputs import new_outputs

    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    g = torch.Generator().manual_seed(5)
    n = 3000
    cols = [1e4 + 0.5 * torch.randn(n, generator=g),                       # mean far above the spread
            torch.cat([torch.zeros(n // 2), 7.0 + torch.randn(n - n // 2, generator=g)]),  # first half constant
            torch.randn(n, generator=g).pow(3) * 50,                           # heavy tail
            -3.0 + 1e-3 * torch.randn(n, generator=g)]                        # tiny spread below zero
    y = torch.stack(cols, 1).float()
    acc = new_outputs("m", 4)
    sizes = [1, 7, 500, 2, 1490, 1000]  # including a one-token batch
    start = 0
    for k in sizes:
        acc.update(torch.randn(k, 3), y[start : start + k])
        start += k
    assert start == n
    got = acc.moments.compute()
    yn = y.double().numpy()
    # float64 sums on the kernel path; the torch path sums each batch in float32 (documented): looser there
    tol = 1e-9 if kernels_on else 1e-4
    for key, want in (("mean", yn.mean(0)), ("var", yn.var(0)), ("skewness", ss.skew(yn, axis=0)),
                      ("kurtosis", ss.kurtosis(yn, axis=0))):
        err = ((got[key] - torch.tensor(want)).abs() / torch.tensor(want).abs().clamp(min=1e-3)).max()
        assert float(err) < tol, (key, float(err))


def test_central_moments_kernel_combines_like_the_torch_code(monkeypatch):
    """The CPU kernel (``kernels.central_add``) and the torch code of ``add_shifted`` give the same running state
    (to float rounding) from the same power sums, over batches whose means jump far from the running mean; a
    batch whose moments are not finite is refused by both, and leaves the state as it was."""
    from neurospec.record import kernels

    if not kernels.usable(torch.zeros(1)):
        pytest.skip("numba is not importable")
    g = torch.Generator().manual_seed(11)
    accs = {on: CentralMoments(5) for on in (True, False)}
    for k, (n, loc, scale) in enumerate([(1, 0.0, 1.0), (37, 5.0, 0.1), (500, -200.0, 30.0), (2, 1e4, 1e-3),
                                         (1000, 0.0, 1.0)]):
        y = (loc + scale * torch.randn(n, 5, generator=g).pow(3)).double()
        shift = y[: max(1, n // 3)].mean(0) + 0.01 * k
        d = y - shift
        sums = torch.stack([d.sum(0), d.pow(2).sum(0), d.pow(3).sum(0), d.pow(4).sum(0)])
        for on, acc in accs.items():
            monkeypatch.setattr(kernels, "ENABLED", on)
            acc.add_shifted(n, shift, sums)
    a, b = accs[True], accs[False]
    assert a.n == b.n == 1540
    for name in ("mean", "m2", "m3", "m4"):
        want = getattr(b, name)
        err = ((getattr(a, name) - want).abs() / want.abs().clamp(min=1e-300)).max()
        assert float(err) < 1e-12, (name, float(err))
    bad = torch.ones(4, 5, dtype=torch.float64)
    bad[3, 2] = math.inf
    for on, acc in accs.items():
        monkeypatch.setattr(kernels, "ENABLED", on)
        before = [t.clone() for t in (acc.mean, acc.m2, acc.m3, acc.m4)]
        with pytest.raises(NeurospecError, match="NaN or inf"):
            acc.add_shifted(3, torch.zeros(5, dtype=torch.float64), bad)
        assert acc.n == 1540
        assert all(torch.equal(t, u) for t, u in zip(before, (acc.mean, acc.m2, acc.m3, acc.m4), strict=True))


def test_mapping_difficulty_kernel_equals_the_torch_path(monkeypatch):
    """The CPU kernel (``kernels.pair_distances``, its pair distances written into a buffer) and the torch path give
    the same pairs, the same histogram of pair distances (counts and extremes exactly: ``|y_a - y_b|`` in y's dtype
    on both), the same pair count, and the same ``dy / dx`` sums and largest ``dx`` to float32 rounding; also across
    flushes of the buffer, a batch of float64 outputs among float32 ones, a pair of equal tokens (``dx = 0``, left
    out), more pairs per batch than ``FLUSH_ROWS``, and a merge."""
    from neurospec.record import kernels

    if not kernels.usable(torch.zeros(1)):
        pytest.skip("numba is not importable")
    monkeypatch.setattr(MappingDifficulty, "FLUSH_ROWS", 48)
    g = torch.Generator().manual_seed(4)
    batches = []
    for k, n in enumerate([30, 2, 41, 50, 64, 9, 33]):
        x = torch.randn(n, 7, generator=g)
        if k == 3:
            x[n // 2 :] = x[0]  # a quarter of the pairs have dx = 0
        y = (x @ torch.randn(7, 6, generator=g)).pow(3)
        batches.append((x, y.double() if k == 5 else y))
    for pairs in (20, 60):
        accs = {}
        for on in (True, False):
            monkeypatch.setattr(kernels, "ENABLED", on)
            acc = MappingDifficulty(6, pairs=pairs, seed=2)
            for x, y in batches:
                acc.update(x, y)
            other = MappingDifficulty(6, pairs=pairs, seed=3)
            other.update(*batches[0])
            accs[on] = acc.merge(other)
        a, b = accs[True], accs[False]
        assert a.n == b.n and a.n > 0
        assert a.max_dx == pytest.approx(b.max_dx, rel=1e-6)
        assert torch.allclose(a.ratio_sum, b.ratio_sum, rtol=1e-5)
        ha, hb = a.dy.histogram(), b.dy.histogram()
        assert torch.equal(ha.counts, hb.counts) and torch.equal(ha.min, hb.min) and torch.equal(ha.max, hb.max)
        assert int(a.dy.state_dict()["count"][0]) == a.n
        assert torch.allclose(a.compute(), b.compute(), rtol=1e-5)


def test_mapping_difficulty_switching_paths_and_a_larger_flush_lose_no_pair(monkeypatch):
    """Batches alternating between the torch path and the CPU kernel (rows pending in the torch path's list when
    the kernel's buffer is first used, and the other way round), and FLUSH_ROWS raised after the kernel's buffer
    exists (a new, larger buffer; nothing written past the old one's end), give the histogram of pair distances
    and the sums of one torch-path accumulator."""
    from neurospec.record import kernels

    if not kernels.usable(torch.zeros(1)):
        pytest.skip("numba is not importable")
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(40, 5, generator=g), torch.randn(40, 6, generator=g)) for _ in range(10)]
    monkeypatch.setattr(MappingDifficulty, "FLUSH_ROWS", 32)
    mixed = MappingDifficulty(6, pairs=12, seed=1)
    ref = MappingDifficulty(6, pairs=12, seed=1)
    for k, (x, y) in enumerate(batches):
        if k == 5:
            monkeypatch.setattr(MappingDifficulty, "FLUSH_ROWS", 100)  # the kernel's buffer (32 rows) is too small
        monkeypatch.setattr(kernels, "ENABLED", k not in (0, 4))  # batch 3: 24 rows pending, 12 more do not fit
        mixed.update(x, y)
        monkeypatch.setattr(kernels, "ENABLED", False)
        ref.update(x, y)
    monkeypatch.setattr(kernels, "ENABLED", True)
    assert mixed.n == ref.n == 120
    ha, hb = mixed.dy.histogram(), ref.dy.histogram()
    assert torch.equal(ha.counts, hb.counts) and torch.equal(ha.min, hb.min) and torch.equal(ha.max, hb.max)
    assert int(mixed.dy.state_dict()["count"][0]) == 120
    assert torch.allclose(mixed.ratio_sum, ref.ratio_sum, rtol=1e-5)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_mapping_difficulty_matches_a_brute_force_loop_over_the_same_pairs(kernels_on, monkeypatch):
    from neurospec.record import kernels

    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(5, 4)
    batches = [torch.randn(40, 5, generator=g) for _ in range(3)]
    acc = MappingDifficulty(4, pairs=50, seed=7)
    for xb in batches:
        acc.update(xb, lin(xb).detach())
    got = acc.compute()
    gen = torch.Generator().manual_seed(7)
    dys, dxs = [], []
    for xb in batches:
        y = lin(xb).detach().double()
        a, b = draw_pairs(xb.shape[0], 50, gen)
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            dxs.append(float((xb[i].double() - xb[j].double()).norm()))
            dys.append((y[i] - y[j]).abs())
    dy, dx = torch.stack(dys), torch.tensor(dxs, dtype=torch.float64)
    med = dy.median(0).values
    want = torch.zeros(4, dtype=torch.float64)
    for p in range(len(dxs)):
        want += (dy[p] / med) / (dx[p] / dx.max())
    want /= len(dxs)
    assert torch.allclose(got, want, rtol=0.03)  # the median comes from a histogram (one bin of resolution)


def _blocks(n=6, seq=16, seed=0):
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recorded_outputs_equal_the_full_output_tensor(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = _blocks()
    outs = record_outputs(model, blocks, batch_size=2)
    mods = choose_linears(model)
    assert list(outs) == list(mods)
    name, ref = next(iter(mods.items()))
    full = []
    h = ref.module.register_forward_hook(lambda m, a, o: full.append(o.detach().reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(input_ids=blocks)
    h.remove()
    y = full[0].double()
    w = weight_out_in(ref.module)
    assert y.shape[1] == w.shape[0]  # rows = neurons
    mom = outs[name].moments.compute()
    assert torch.allclose(mom["mean"], y.mean(0), atol=1e-6)
    assert torch.allclose(mom["var"], y.var(0, unbiased=False), rtol=1e-5)
    assert torch.allclose(mom["kurtosis"], torch.tensor(ss.kurtosis(y.numpy(), axis=0)), rtol=1e-4, atol=1e-5)
    st = NeuronStats(y.shape[1])
    st.update(y.float())
    assert torch.equal(outs[name].stats.histogram().counts, st.histogram().counts)
    sc = score_outputs(outs)[name]
    assert torch.allclose(sc.w1, w1_from_stats(st), atol=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_merge_of_two_recordings_equals_one_pass():
    model = tiny_model("llama")
    blocks = _blocks(8)
    one = record_outputs(model, blocks, batch_size=4, layers=["layers.1.mlp.up_proj"])
    a = record_outputs(model, blocks[:4], batch_size=4, layers=["layers.1.mlp.up_proj"])
    b = record_outputs(model, blocks[4:], batch_size=4, layers=["layers.1.mlp.up_proj"])
    name = "layers.1.mlp.up_proj"
    a[name].stats.merge(b[name].stats)
    a[name].moments.merge(b[name].moments)
    assert torch.equal(a[name].stats.histogram().counts, one[name].stats.histogram().counts)
    assert torch.allclose(w1_from_stats(a[name].stats), w1_from_stats(one[name].stats), atol=1e-9)
    for k, v in one[name].moments.compute().items():
        assert torch.allclose(a[name].moments.compute()[k], v, rtol=1e-7, atol=1e-10), k


def test_module_choice_default_all_and_named():
    assert list(choose_linears(tiny_model("bert"))) == ["layers.0.intermediate.dense", "layers.1.intermediate.dense"]
    llama = tiny_model("llama")
    assert list(choose_linears(llama, [1])) == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    assert len(choose_linears(llama, [1], scope="all")) == 7
    assert list(choose_linears(llama, ["layers.0.self_attn.q_proj"])) == ["layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("layers, message", [
    (["layers.0.mlp.act_fn"], "not a linear module"),
    (["layers.0.mlp.nope"], "no linear module"),
    (["7"], "block 7 does not exist"),
])
def test_bad_layers_are_clear_errors(layers, message):
    with pytest.raises(NeurospecError, match=message):
        record_outputs(tiny_model("llama"), _blocks(2), layers=layers)


def test_too_few_tokens_is_a_clear_error():
    from neurospec.experiments.wasserstein import wasserstein_scores

    with pytest.raises(NeurospecError, match="at least 16 tokens"):
        wasserstein_scores(tiny_model("llama"), _blocks(1, 8))
    outs = record_outputs(tiny_model("llama"), _blocks(1, 3), layers=[0])
    with pytest.raises(NeurospecError, match="at least 4"):
        score_outputs(outs)


def test_constant_neuron_gets_nan_not_an_error():
    st = NeuronStats(2)
    x = torch.stack([torch.ones(100), torch.randn(100)], 1)
    st.update(x)
    w = w1_from_stats(st)
    assert math.isnan(float(w[0])) and math.isfinite(float(w[1]))


def test_hist_every_scores_the_sampled_tokens_with_moments_of_all_tokens():
    """``hist_every = 4``: the histogram holds rows 0, 4, 8, ... of each batch, the z-scoring uses the moments of
    every token; W1 equals the exact integral over exactly those rows, z-scored by the full mean and std, within
    the histogram's resolution."""
    from neurospec.sparsity.outputs import new_outputs

    x = _planted(4000)
    acc, acc1 = new_outputs("m", 3, hist_every=4), new_outputs("m", 3)
    sampled = []
    for part in x.split(1000):  # batches of 1000 rows: rows 0, 4, ... of each
        acc.update(torch.zeros(part.shape[0], 2), part)
        acc1.update(torch.zeros(part.shape[0], 2), part)
        sampled.append(part[::4])
    sub = torch.cat(sampled).double()
    assert int(acc.stats.histogram().counts.sum()) == sub.shape[0] * 3
    full = x.double()
    z = (sub - full.mean(0)) / full.std(0, unbiased=False)
    want = w1_exact(z, normalise="none")
    got = w1_from_stats(acc.stats)
    h = acc.stats.histogram()
    resolution = (h.hi - h.lo) / h.bins / full.std(0, unbiased=False)
    assert torch.all((got - want).abs() <= resolution), (got, want, resolution)
    # the moments are those of every token, as without sampling
    for k, v in acc1.moments.compute().items():
        assert torch.allclose(acc.moments.compute()[k], v, rtol=1e-12, equal_nan=True), k
    with pytest.raises(NeurospecError, match="hist_every"):
        new_outputs("m", 3, hist_every=0)
