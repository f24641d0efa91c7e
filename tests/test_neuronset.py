"""NeuronSet: constructors, set algebra against Python sets, selection against brute force, files."""

import itertools
import math
import pickle

import pytest
import torch

from neurospec.errors import NeuronSetError
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.sites import NeuronId, Site, Sites


def make_sites(n_layers=3, d_mlp=24, d_model=16, n_heads=4) -> Sites:
    out = []
    for i in range(n_layers):
        out.append(Site(f"layers.{i}.mlp", "mlp", i, d_mlp, f"m.{i}.down"))
        out.append(Site(f"layers.{i}.attn", "attn", i, d_model, f"m.{i}.o", n_heads, d_model // n_heads))
    return Sites("test", tuple(out), d_model)


SITES = make_sites()


def as_pyset(ns: NeuronSet) -> set[tuple[str, int]]:
    return {(n.site, n.index) for n in ns}


def random_pyset(seed: int) -> set[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = set()
    for s in SITES:
        keep = torch.rand(s.width, generator=g) < 0.3
        out |= {(s.name, int(i)) for i in keep.nonzero().reshape(-1)}
    return out


def from_pyset(p) -> NeuronSet:
    return NeuronSet.from_ids([f"{s}:{i}" for s, i in p], SITES)


@pytest.mark.parametrize("seed", range(4))
def test_set_ops_match_python_sets(seed):
    a, b = random_pyset(seed), random_pyset(seed + 100)
    A, B = from_pyset(a), from_pyset(b)
    assert as_pyset(A | B) == a | b
    assert as_pyset(A & B) == a & b
    assert as_pyset(A - B) == a - b
    assert as_pyset(A ^ B) == a ^ b
    assert len(A) == len(a)
    for s, i in itertools.islice(itertools.product([x.name for x in SITES], range(24)), 0, None, 7):
        assert (NeuronId(s, i) in A) == ((s, i) in a)
        assert (f"{s}:{i}" in A) == ((s, i) in a)
    counts = A.count_by_site()
    assert list(counts) == [s.name for s in SITES]
    for s in SITES:
        assert counts[s.name] == sum(1 for x in a if x[0] == s.name)
        mask = A.mask(s.name)
        assert mask.shape == (s.width,) and mask.dtype == torch.bool
        assert set(mask.nonzero().reshape(-1).tolist()) == {i for n, i in a if n == s.name}


def test_iteration_order_ids_masks_roundtrip():
    ns = NeuronSet.from_ids(["layers.2.mlp:3", "layers.0.attn:5", "layers.0.mlp:7", "layers.0.mlp:1", "layers.0.mlp:7"],
                            SITES)
    assert ns.to_ids() == ["layers.0.mlp:1", "layers.0.mlp:7", "layers.0.attn:5", "layers.2.mlp:3"]
    assert len(ns) == 4
    masks = {s.name: ns.mask(s.name) for s in SITES}
    assert NeuronSet.from_masks(masks, SITES) == ns
    assert NeuronSet.from_ids(ns, SITES) == ns
    assert hash(NeuronSet.from_ids(ns.to_ids(), SITES)) == hash(ns)
    assert pickle.loads(pickle.dumps(ns)) == ns
    assert ns.of_kind("attn").to_ids() == ["layers.0.attn:5"]
    with pytest.raises(AttributeError):
        ns._idx = {}
    # indices() hands out a copy
    t = ns.indices("layers.0.mlp")
    t[0] = 20
    assert ns.indices("layers.0.mlp").tolist() == [1, 7]


def test_bad_ids_are_rejected_with_site_width():
    with pytest.raises(NeuronSetError, match=r"layers\.1\.attn:16.*width 16"):
        NeuronSet.from_ids(["layers.1.attn:16"], SITES)
    with pytest.raises(NeuronSetError, match="layers.7.mlp"):
        NeuronSet.from_ids(["layers.7.mlp:0"], SITES)
    with pytest.raises(NeuronSetError, match="not a neuron id"):
        NeuronSet.from_ids(["layers.1.mlp-3"], SITES)
    with pytest.raises(NeuronSetError, match=r"width 24"):
        NeuronSet.from_masks({"layers.0.mlp": torch.zeros(25, dtype=torch.bool)}, SITES)
    with pytest.raises(NeuronSetError, match="width 5"):
        NeuronSet({"layers.0.mlp": [5]}, {"layers.0.mlp": 5})
    with pytest.raises(NeuronSetError, match="from_masks"):
        NeuronSet({"layers.0.mlp": torch.ones(5, dtype=torch.bool)}, {"layers.0.mlp": 5})
    other = NeuronSet({"layers.0.mlp": [1]}, {"layers.0.mlp": 30})
    with pytest.raises(NeuronSetError, match="width 24 in one set and 30"):
        NeuronSet.from_ids(["layers.0.mlp:1"], SITES) | other


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_save_load_roundtrip(tmp_path, suffix):
    ns = from_pyset(random_pyset(3))
    path = ns.save(tmp_path / f"set{suffix}")
    back = NeuronSet.load(path, SITES)
    assert back == ns
    assert back.widths == {s.name: s.width for s in SITES}
    if suffix == ".txt":
        body = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
        assert body == ns.to_ids()
    small = make_sites(d_model=8, n_heads=2)
    if suffix == ".json":
        with pytest.raises(NeuronSetError, match="width"):
            NeuronSet.load(path, small)


def test_random_counts_reproducible_and_site_independent():
    a = NeuronSet.random(SITES, frac=0.25, seed=7)
    assert a == NeuronSet.random(SITES, frac=0.25, seed=7)
    assert a != NeuronSet.random(SITES, frac=0.25, seed=8)
    assert a.count_by_site() == {s.name: math.floor(0.25 * s.width) for s in SITES}
    attn_only = NeuronSet.random(SITES.of_kind("attn"), frac=0.25, seed=7)
    assert attn_only == a.of_kind("attn")
    b = NeuronSet.random(SITES.of_kind("mlp"), n=5, seed=1)
    assert set(b.count_by_site().values()) == {5}
    g = NeuronSet.random(SITES, n=17, per_site=False, seed=3)
    assert len(g) == 17 and g == NeuronSet.random(SITES, n=17, per_site=False, seed=3)
    with pytest.raises(NeuronSetError, match="cannot draw 30"):
        NeuronSet.random(SITES, n=30)


@pytest.mark.parametrize("per_site", [True, False])
def test_random_nested_is_nested_and_reproducible(per_site):
    fracs = [0.1 * i for i in range(1, 11)]
    sets = NeuronSet.random_nested(SITES, fracs, per_site=per_site, seed=5)
    assert sets == NeuronSet.random_nested(SITES, fracs, per_site=per_site, seed=5)
    for prev, cur in zip(sets, sets[1:], strict=False):
        assert (prev - cur) == NeuronSet.empty(SITES) and len(cur) >= len(prev)
    if per_site:
        for f, s in zip(fracs, sets, strict=True):
            assert s.count_by_site() == {x.name: math.floor(f * x.width + 1e-9) for x in SITES}
        assert sets[2] == NeuronSet.random(SITES, frac=0.3, seed=5)
    else:
        total = sum(x.width for x in SITES)
        assert [len(s) for s in sets] == [math.floor(f * total + 1e-9) for f in fracs]
    assert len(sets[-1]) == sum(x.width for x in SITES)
    with pytest.raises(NeuronSetError, match="non-decreasing"):
        NeuronSet.random_nested(SITES, [0.2, 0.1])


def scores_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randint(0, 6, (s.width,), generator=g).float() for s in SITES}


def brute_top(scores, names, k):
    units = [(float(scores[n][i]), pos, i, n) for pos, n in enumerate(names) for i in range(scores[n].numel())]
    units.sort(key=lambda u: (-u[0], u[1], u[2]))  # higher score, earlier site, lower index
    return {(n, i) for _, _, i, n in units[:k]}


@pytest.mark.parametrize("seed", range(3))
def test_top_k_global_and_per_site_match_brute_force(seed):
    scores = scores_with_ties(seed)
    order = [s.name for s in SITES]
    for frac in (0.1, 0.25):
        got = NeuronSet.top_k(scores, frac=frac, scope="global", sites=SITES)
        want = set()
        for kind in ("mlp", "attn"):
            names = [n for n in order if n.endswith(kind)]
            total = sum(scores[n].numel() for n in names)
            want |= brute_top(scores, names, math.floor(frac * total))
        assert as_pyset(got) == want
        per = NeuronSet.top_k(scores, frac=frac, scope="per_site")
        want = set()
        for n in order:
            want |= brute_top(scores, [n], math.floor(frac * scores[n].numel()))
        assert as_pyset(per) == want
    got = NeuronSet.top_k(scores, k=7, scope="global")
    assert got.of_kind("mlp").__len__() == 7 and len(got.of_kind("attn")) == 7
    with pytest.raises(NeuronSetError, match="NaN"):
        NeuronSet.top_k({"layers.0.mlp": torch.tensor([1.0, float("nan")])}, k=1)
    with pytest.raises(NeuronSetError, match="exactly one"):
        NeuronSet.top_k(scores, k=1, frac=0.1)


def test_heads_and_top_heads():
    site = SITES["layers.1.attn"]  # 4 heads of 4
    assert NeuronSet.heads(site, [2, 0]).to_ids() == [f"layers.1.attn:{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    with pytest.raises(NeuronSetError, match="4 heads"):
        NeuronSet.heads(site, [4])
    with pytest.raises(NeuronSetError, match="no attention heads"):
        NeuronSet.heads(SITES["layers.1.mlp"], [0])
    g = torch.Generator().manual_seed(0)
    scores = {s.name: torch.randn(s.width, generator=g) for s in SITES.of_kind("attn")}
    # make the median and the mean disagree in one head: a single huge neuron lifts the mean only
    scores["layers.0.attn"][4:8] = torch.tensor([-5.0, -5.0, -5.0, 100.0])
    for reduce in ("mean", "median"):
        got = NeuronSet.top_heads(scores, SITES, k=3, reduce=reduce)
        heads = []
        for name, sc in scores.items():
            per = sc.view(4, 4)
            hs = per.mean(1) if reduce == "mean" else torch.tensor([float(r.double().quantile(0.5)) for r in per])
            heads += [(float(v), name, h) for h, v in enumerate(hs)]
        heads.sort(key=lambda x: -x[0])
        want = NeuronSet.empty(SITES.of_kind("attn"))
        for _, name, h in heads[:3]:
            want = want | NeuronSet.heads(SITES[name], [h])
        assert got == want
        assert ("layers.0.attn:7" in got) == (reduce == "mean")
    per_site = NeuronSet.top_heads(scores, SITES, k=1, scope="per_site")
    assert set(per_site.count_by_site().values()) == {4}
