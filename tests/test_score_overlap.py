"""Selective-pruning scorers against hand computations; overlaps and chance baselines by brute force."""

import hashlib
import itertools
import math

import numpy as np
import pytest
import torch

from neurospec.analyze.overlap import overlap, overlap_matrix
from neurospec.errors import NeurospecError
from neurospec.score import SCORERS, score_neurons
from neurospec.score.selective import derive_seed, tie_break_keys


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
    # per task and per model: two tasks (or two models) scored with the same seed draw different scores
    a_t = score_neurons("rand", fs, rs, seed=1, model="fp0", task="a")["layers.0.mlp"]
    assert torch.equal(a_t, score_neurons("rand", fs, rs, seed=1, model="fp0", task="a")["layers.0.mlp"])
    assert not torch.equal(a_t, score_neurons("rand", fs, rs, seed=1, model="fp0", task="b")["layers.0.mlp"])
    assert not torch.equal(a_t, score_neurons("rand", fs, rs, seed=1, model="fp1", task="a")["layers.0.mlp"])
    with pytest.raises(NeurospecError, match="unknown score"):
        score_neurons("l2", fs, rs)


def test_derive_seed_is_sha256_of_labelled_parts():
    """Stable across processes (no hash()); labels keep a model and a task of the same name apart; with the site
    alone it is the per-site seed of earlier versions, so results without model and task do not move."""

    def sha(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)

    assert derive_seed(3, site="layers.1.mlp") == sha("3:layers.1.mlp")
    assert derive_seed(3, model="fp", task="de", site="layers.1.mlp") == sha("3:model=fp:task=de:layers.1.mlp")
    assert derive_seed(3, model="x") != derive_seed(3, task="x")


def _chosen(keys: dict, k: int) -> set:
    flat = sorted(((float(v[i]), s, i) for s, v in keys.items() for i in range(v.numel())), reverse=True)
    return {(s, i) for _, s, i in flat[:k]}


def test_tie_break_keys_random_per_task_and_order_preserving():
    from neurospec.experiments.taskmap import TaskMapConfig
    from neurospec.score.selection import kind_masks, selection_keys

    g = torch.Generator().manual_seed(0)
    widths = {"layers.0.mlp": 60, "layers.1.mlp": 40}
    # many ties: 5 distinct values, 20 neurons each on average, with the levels mixed over both layers
    scores = {s: torch.randint(0, 5, (w,), generator=g).double() for s, w in widths.items()}
    scores["layers.1.mlp"][:3] = 7.0  # three strictly highest scores, in the *later* layer
    k = 30
    by_seed = {}
    for task in ("de", "fr"):
        keys = tie_break_keys(scores, 0, model="fp", task=task)
        # strict order kept everywhere: a higher score always has a higher key
        allv = torch.cat([scores[s] for s in widths])
        allk = torch.cat([keys[s] for s in widths])
        hi = allv[:, None] > allv[None, :]
        assert bool((allk[:, None] > allk[None, :])[hi].all())
        assert len(set(allk.tolist())) == allk.numel()  # no ties left
        assert torch.equal(keys["layers.0.mlp"], tie_break_keys(scores, 0, model="fp", task=task)["layers.0.mlp"])
        by_seed[task] = _chosen(keys, k)
    # selected sets: same seed -> same set; two tasks -> different tied neurons, never a lower score
    assert by_seed["de"] != by_seed["fr"]
    for chosen in by_seed.values():
        picked = [float(scores[s][i]) for s, i in chosen]
        left = [float(scores[s][i]) for s in widths for i in range(widths[s]) if (s, i) not in chosen]
        assert min(picked) >= max(left)
        assert {("layers.1.mlp", i) for i in range(3)} <= chosen
    # through the task map's own selection (global top fraction of MLP neurons over both layers)
    cfg = TaskMapConfig(score="freq")
    keys = selection_keys({"de": scores, "fr": scores}, cfg.seed, "fp")
    masks = {t: kind_masks(keys[t], 0.3, "mlp", None) for t in ("de", "fr")}
    sets = {t: {(s, i) for s, m in masks[t].items() for i in torch.nonzero(m).flatten().tolist()} for t in masks}
    assert all(len(v) == k for v in sets.values())
    assert sets["de"] != sets["fr"]
    assert sets == {t: _chosen(keys[t], k) for t in keys}
    again = selection_keys({"de": scores}, cfg.seed, "fp")["de"]
    assert all(torch.equal(again[s], keys["de"][s]) for s in widths)


def test_tie_break_keys_keep_nan_and_infinities():
    scores = {"layers.0.mlp": torch.tensor([1.0, float("nan"), -float("inf"), float("inf"), 1.0])}
    k = tie_break_keys(scores, 0)["layers.0.mlp"]
    assert math.isnan(k[1]) and k[3] > k[0] > k[2] and k[3] > k[4] > k[2] and k[0] != k[4]


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


def test_overlap_matrix_every_entry_by_brute_force():
    g = torch.Generator().manual_seed(0)
    widths = {"layers.0.attn": 10, "layers.1.attn": 6}
    sets = [{s: torch.rand(w, generator=g) < p for s, w in widths.items()} for p in (0.3, 0.5, 0.7)]
    ids = [{(s, i) for s, m in x.items() for i in range(len(m)) if m[i]} for x in sets]
    n = sum(widths.values())
    ov, cg, cm = overlap_matrix(sets)
    assert ov.shape == cg.shape == cm.shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert ov[i, j] == pytest.approx(len(ids[i] & ids[j]) / len(ids[i]))
        assert cg[i, j] == pytest.approx(len(ids[j]) / n)
        per_site = [(sum(x[0] == s for x in ids[i]), sum(x[0] == s for x in ids[j]), w) for s, w in widths.items()]
        assert cm[i, j] == pytest.approx(sum(a * b / w for a, b, w in per_site) / len(ids[i]))
    assert not np.allclose(ov, ov.T)  # asymmetric: |A∩B|/|A| != |A∩B|/|B| for sets of different sizes
    with pytest.raises(ValueError, match="different sites"):
        overlap(sets[0], {"layers.1.attn": sets[1]["layers.0.attn"]})
