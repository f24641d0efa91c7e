"""Selective-pruning scorers against hand computations; overlaps and chance baselines by brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from neurospec.analyze.overlap import overlap, overlap_matrix
from neurospec.errors import NeurospecError
from neurospec.score import SCORERS, score_neurons


def _stats(x: torch.Tensor) -> dict:
    """Brute-force per-neuron statistics of x [tokens, width] in float64."""
    x = x.double()
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    return {
        "mean": mean, "std": var.sqrt(), "rms": (x * x).mean(0).sqrt(), "mean_abs": x.abs().mean(0),
        "mean_sqrt_abs": x.abs().sqrt().mean(0), "frac_pos": (x > 0).double().mean(0), "var": var,
    }


@pytest.fixture
def fr():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g) * torch.tensor([1, 2, 3, 0.5, 1, 1]) + torch.tensor([0, 1, -1, 0, 2, 0])
    r = torch.randn(400, 6, generator=g)
    return {"layers.0.mlp": _stats(f)}, {"layers.0.mlp": _stats(r)}, f.double(), r.double()


def test_every_scorer_matches_hand_computation(fr):
    fs, rs, f, r = fr
    eps = 1e-3
    by_hand = {
        "abs": f.abs().mean(0) / (r.abs().mean(0) + eps),
        "sqrt": f.abs().sqrt().mean(0) / (r.abs().sqrt().mean(0) + eps),
        "freq": (f > 0).double().mean(0) / ((r > 0).double().mean(0) + eps),
        "std": f.std(0, unbiased=False) / (r.std(0, unbiased=False) + eps),
        "rms": (f.var(0, unbiased=False) + f.mean(0) ** 2).sqrt() / ((r.var(0, unbiased=False) + r.mean(0) ** 2).sqrt() + eps),
        "mean": (f.mean(0) - r.mean(0)).abs(),
    }
    for name, want in by_hand.items():
        got = score_neurons(name, fs, rs)["layers.0.mlp"]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert set(SCORERS) == {*by_hand, "rand"}


def test_eps_depends_on_site_kind():
    z = {"mean_abs": torch.tensor([1.0]), "mean": torch.zeros(1)}
    zero = {"mean_abs": torch.tensor([0.0]), "mean": torch.zeros(1)}
    s = score_neurons("abs", {"layers.0.mlp": z, "layers.0.attn": z}, {"layers.0.mlp": zero, "layers.0.attn": zero})
    assert s["layers.0.mlp"].item() == pytest.approx(1e3)
    assert s["layers.0.attn"].item() == pytest.approx(1e4)
    s = score_neurons("abs", {"layers.0.mlp": z}, {"layers.0.mlp": zero}, eps={"mlp": 0.5})
    assert s["layers.0.mlp"].item() == pytest.approx(2.0)


def test_rand_is_seeded_and_unknown_score_rejected(fr):
    fs, rs, *_ = fr
    a = score_neurons("rand", fs, rs, seed=1)["layers.0.mlp"]
    assert torch.equal(a, score_neurons("rand", fs, rs, seed=1)["layers.0.mlp"])
    assert not torch.equal(a, score_neurons("rand", fs, rs, seed=2)["layers.0.mlp"])
    with pytest.raises(NeurospecError, match="unknown score"):
        score_neurons("l2", fs, rs)


def test_overlap_and_chance_by_brute_force():
    g = torch.Generator().manual_seed(3)
    widths = {"layers.0.mlp": 7, "layers.1.mlp": 5}
    a = {s: torch.rand(w, generator=g) < 0.4 for s, w in widths.items()}
    b = {s: torch.rand(w, generator=g) < 0.5 for s, w in widths.items()}
    ids_a = {(s, i) for s, m in a.items() for i in range(len(m)) if m[i]}
    ids_b = {(s, i) for s, m in b.items() for i in range(len(m)) if m[i]}
    r = overlap(a, b)
    assert r["overall"] == pytest.approx(len(ids_a & ids_b) / len(ids_a))
    for s in widths:
        sa = {x for x in ids_a if x[0] == s}
        if sa:
            assert r["per_site"][s] == pytest.approx(len(sa & ids_b) / len(sa))
    # chance: the exact expectation over every placement of random sets of the same sizes
    universe = [(s, i) for s, w in widths.items() for i in range(w)]
    total, count = 0.0, 0
    for pick in itertools.combinations(range(len(universe)), len(ids_a)):
        # B is fixed; averaging over A alone gives the same expectation as over A and B
        sel = {universe[k] for k in pick}
        total += len(sel & ids_b) / len(sel)
        count += 1
    assert r["chance_global"] == pytest.approx(total / count)
    # layer-matched chance: A random within each site with its per-site size
    per_site_sets = []
    for s, w in widths.items():
        k = int(a[s].sum())
        per_site_sets.append([{(s, i) for i in c} for c in itertools.combinations(range(w), k)])
    total, count = 0.0, 0
    for combo in itertools.product(*per_site_sets):
        sel = set().union(*combo)
        total += len(sel & ids_b) / len(sel)
        count += 1
    assert r["chance_matched"] == pytest.approx(total / count)


def test_overlap_matrix_diagonal_is_one():
    g = torch.Generator().manual_seed(0)
    sets = [{"layers.0.attn": torch.rand(10, generator=g) < 0.5} for _ in range(3)]
    ov, cg, cm = overlap_matrix(sets)
    assert np.allclose(np.diag(ov), 1.0)
    assert ov.shape == (3, 3) and not math.isnan(cg[0, 1])
    with pytest.raises(ValueError, match="different sites"):
        overlap(sets[0], {"layers.1.attn": sets[1]["layers.0.attn"]})
