"""neurospec.cluster: balanced k-means, MoEfication, spectral clustering, n-cut, weight graphs, shuffled baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import sparse
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score
from torch import nn

from neurospec.analyze.clusterability import clusterability
from neurospec.cluster.baselines import shuffle_weights
from neurospec.cluster.kmeans import BalancedKMeans, assign_exact, assign_greedy, balanced_sizes
from neurospec.cluster.moefication import (
    coactivation_experts,
    coactivation_graph,
    expert_features,
    install_routing,
    moefy,
    moefy_site,
    relu_coactivation,
    route_topk,
)
from neurospec.cluster.spectral import (
    WeightChain,
    correlation_graph,
    ncut,
    spectral_clustering,
    weight_graph,
)
from neurospec.models.linear import weight_out_in
from neurospec.models.loading import from_module
from neurospec.models.sites import NeuronId, find_sites

# ------------------------------------------------------------------------------------------------ fixtures


def tiny_llama(seed: int = 0, layers: int = 3, width: int = 48, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=16, n_layer=3, n_head=2, n_inner=40, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def sbm(sizes, p_in, p_out, seed):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    p = np.where(truth[:, None] == truth[None, :], p_in, p_out)
    a = np.triu((rng.random(p.shape) < p).astype(float), 1)
    return a + a.T, truth


def ncut_brute(a, labels):
    total = 0.0
    kept = [i for i in range(len(labels)) if labels[i] >= 0]
    for c in sorted({labels[i] for i in kept}):
        cut = vol = 0.0
        for i in kept:
            if labels[i] != c:
                continue
            for j in kept:
                vol += a[i, j]
                if labels[j] != c:
                    cut += a[i, j]
        total += cut / vol if vol > 0 else 0.0
    return total


# ------------------------------------------------------------------------------------------ balanced k-means


@pytest.mark.parametrize("assignment", ["hybrid", "exact", "greedy"])
def test_balanced_kmeans_equal_sizes_and_beats_random_split(assignment):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)) + np.repeat(rng.normal(scale=3, size=(6, 5)), [10, 30, 20, 20, 25, 15], axis=0)
    km = BalancedKMeans(6, assignment=assignment, seed=0).fit(x)
    assert np.bincount(km.labels_, minlength=6).tolist() == [20] * 6
    # inertia_ is consistent with labels_ and cluster_centers_ (the centres are the cluster means)
    for c in range(6):
        np.testing.assert_allclose(km.cluster_centers_[c], x[km.labels_ == c].mean(0))
    assert km.inertia_ == pytest.approx(((x - km.cluster_centers_[km.labels_]) ** 2).sum())
    random_inertias = []
    for s in range(20):
        lab = np.random.default_rng(s).permutation(np.repeat(np.arange(6), 20))
        centers = np.stack([x[lab == c].mean(0) for c in range(6)])
        random_inertias.append(((x - centers[lab]) ** 2).sum())
    assert km.inertia_ < 0.5 * min(random_inertias)


def test_balanced_kmeans_finds_planted_blobs():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=20, size=(8, 10))
    truth = np.repeat(np.arange(8), 25)
    x = centers[truth] + rng.normal(size=(200, 10))
    order = rng.permutation(200)
    km = BalancedKMeans(8, n_init=3, seed=0).fit(x[order])
    assert adjusted_rand_score(truth[order], km.labels_) == pytest.approx(1.0)


@pytest.mark.parametrize("assignment", ["hybrid", "exact", "greedy"])
@pytest.mark.parametrize("n,k", [(103, 10), (50, 7), (9, 9), (10, 1)])
def test_unequal_sizes_differ_by_at_most_one(assignment, n, k):
    x = np.random.default_rng(n).normal(size=(n, 3))
    lab = BalancedKMeans(k, assignment=assignment, seed=2).fit(x).labels_
    q, r = balanced_sizes(n, k)
    sizes = np.bincount(lab, minlength=k)
    assert sorted(sizes.tolist()) == [q] * (k - r) + [q + 1] * r


@pytest.mark.parametrize("n,k", [(6, 3), (7, 3), (8, 3)])
def test_exact_assignment_is_optimal_by_brute_force(n, k):
    dist = np.random.default_rng(n).random((n, k))
    q, r = balanced_sizes(n, k)
    best = np.inf
    for lab in itertools.product(range(k), repeat=n):
        sizes = sorted(np.bincount(lab, minlength=k).tolist())
        if sizes == [q] * (k - r) + [q + 1] * r:
            best = min(best, dist[np.arange(n), lab].sum())
    got = assign_exact(dist)
    assert dist[np.arange(n), got].sum() == pytest.approx(best)
    greedy = assign_greedy(dist)
    assert sorted(np.bincount(greedy, minlength=k).tolist()) == [q] * (k - r) + [q + 1] * r
    assert dist[np.arange(n), greedy].sum() >= best - 1e-12


def test_balanced_kmeans_estimator_contract_and_determinism():
    x = np.random.default_rng(3).normal(size=(60, 4))
    km = BalancedKMeans(5, n_init=2, seed=7)
    assert km.get_params()["n_clusters"] == 5 and not hasattr(km, "labels_")
    assert km.fit(x) is km
    again = clone(km).fit(torch.tensor(x))
    np.testing.assert_array_equal(km.labels_, again.labels_)
    np.testing.assert_array_equal(km.fit_predict(x), km.labels_)
    with pytest.raises(ValueError, match="cannot split"):
        BalancedKMeans(61).fit(x)
    with pytest.raises(ValueError, match="assignment"):
        BalancedKMeans(3, assignment="fast").fit(x)


# ----------------------------------------------------------------------------------------------- spectral


@pytest.mark.parametrize("as_sparse", [False, True])
def test_spectral_recovers_planted_communities(as_sparse):
    a, truth = sbm([30, 40, 50, 60], 0.4, 0.02, seed=0)
    a = sparse.csr_array(a) if as_sparse else a
    # dense_below=10 forces the ARPACK path for the sparse variant
    labels = spectral_clustering(a, 4, seed=0, dense_below=10 if as_sparse else 3000)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert ncut(a, labels) <= ncut(a, np.random.default_rng(0).permutation(labels))


def test_isolated_and_masked_nodes_get_minus_one():
    a, truth = sbm([20, 20, 20], 0.5, 0.01, seed=1)
    n = a.shape[0]
    big = np.zeros((n + 3, n + 3))
    big[:n, :n] = a
    big[n + 1, n + 2] = big[n + 2, n + 1] = 1.0  # a pair joined only to each other...
    mask = np.ones(n + 3, dtype=bool)
    mask[n + 1] = False  # ...whose one member is masked: the other becomes isolated
    mask[0] = False
    labels = spectral_clustering(big, 3, mask=mask, seed=0)
    assert labels[n] == -1 and labels[n + 1] == -1 and labels[n + 2] == -1 and labels[0] == -1
    assert adjusted_rand_score(truth[1:], labels[1:n]) == pytest.approx(1.0)


def test_ncut_matches_brute_force():
    rng = np.random.default_rng(4)
    a = rng.random((12, 12)) * (rng.random((12, 12)) < 0.6)
    a = np.triu(a, 1)
    a = a + a.T
    labels = rng.integers(-1, 3, size=12)
    assert ncut(a, labels) == pytest.approx(ncut_brute(a, labels))
    assert ncut(sparse.csr_array(a), labels) == pytest.approx(ncut_brute(a, labels))
    assert ncut(a, np.zeros(12, dtype=int)) == pytest.approx(0.0)


def test_adjacency_is_validated():
    with pytest.raises(ValueError, match="symmetric"):
        spectral_clustering(np.triu(np.ones((5, 5)), 1), 2)
    with pytest.raises(ValueError, match="non-negative"):
        spectral_clustering(-np.ones((5, 5)), 2)


def test_correlation_graph():
    corr = np.array([[1.0, -0.5, np.nan], [-0.5, 1.0, 0.2], [np.nan, 0.2, 1.0]])
    expected = np.array([[0.0, 0.25, 0.0], [0.25, 0.0, 0.04], [0.0, 0.04, 0.0]])
    np.testing.assert_allclose(correlation_graph(torch.tensor(corr)), expected)


# ---------------------------------------------------------------------------------------------- weight graph


def _brute_weight_graph(model, projection):
    sites = find_sites(model).of_kind("mlp")
    widths = [s.width for s in sites]
    off = np.concatenate([[0], np.cumsum(widths)])
    a = np.zeros((off[-1], off[-1]))
    for li in range(len(sites) - 1):
        w_out = weight_out_in(model.get_submodule(sites[li].module)).detach().double()
        ins = {p.rsplit(".", 1)[-1]: weight_out_in(model.get_submodule(p)).detach().double() for p in sites[li + 1].inputs}
        for i in range(widths[li]):
            for j in range(widths[li + 1]):
                vals = {name: abs(float(w[j] @ w_out[:, i])) for name, w in ins.items()}
                if projection == "up":
                    v = vals.get("up_proj", vals.get("c_fc"))
                elif projection == "gate":
                    v = vals["gate_proj"]
                else:
                    v = max(vals.values())
                a[off[li] + i, off[li + 1] + j] = a[off[li + 1] + j, off[li] + i] = v
    return a


@pytest.mark.parametrize("projection", ["up", "gate", "max"])
def test_weight_graph_matches_brute_force_on_llama(projection):
    model = tiny_llama(layers=3, width=12)
    g = weight_graph(model, projection=projection)
    assert g.sites == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp") and g.widths == (12, 12, 12)
    np.testing.assert_allclose(g.adjacency.toarray(), _brute_weight_graph(model, projection), rtol=1e-5, atol=1e-7)


def test_weight_graph_reads_gpt2_conv1d_weights_the_right_way_round():
    model = tiny_gpt2()
    g = weight_graph(from_module(model))
    np.testing.assert_allclose(g.adjacency.toarray(), _brute_weight_graph(model, "up"), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="non-gated"):
        weight_graph(model, projection="gate")


def test_weight_graph_layers_and_neuron_ids():
    model = tiny_llama(layers=4, width=10)
    g = weight_graph(model, layers=[1, 3])
    assert g.sites == ("layers.1.mlp", "layers.3.mlp") and g.n_nodes == 20
    assert g.neuron(0) == NeuronId("layers.1.mlp", 0) and g.neuron(13) == NeuronId("layers.3.mlp", 3)
    split = g.split(np.arange(20))
    assert split["layers.3.mlp"].tolist() == list(range(10, 20))
    sites = find_sites(model)
    w_in = weight_out_in(model.get_submodule(sites["layers.3.mlp"].inputs[1])).detach().double()
    w_out = weight_out_in(model.get_submodule(sites["layers.1.mlp"].module)).detach().double()
    assert g.adjacency[4, 10 + 7] == pytest.approx(abs(float(w_in[7] @ w_out[:, 4])), rel=1e-5)
    with pytest.raises(ValueError, match="either"):
        weight_graph(model, ["layers.0.mlp"], layers=[0])


def test_weight_graph_of_a_plain_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 6),
                        nn.ReLU(), nn.Linear(6, 2))
    g = weight_graph(mlp)
    assert g.sites == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp") and g.widths == (4, 3, 6)
    a = g.adjacency.toarray()
    expected = np.zeros((13, 13))
    w1, w2 = mlp[3].weight.detach().double().numpy(), mlp[5].weight.detach().double().numpy()
    expected[0:4, 4:7] = np.abs(w1).T
    expected[4:7, 7:13] = np.abs(w2).T
    expected = expected + expected.T
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    assert weight_graph(mlp, layers=[1, 2]).widths == (3, 6)
    with pytest.raises(ValueError, match="consecutive"):
        weight_graph(mlp, layers=[0, 2])


def test_top_k_keeps_each_nodes_strongest_edges():
    model = tiny_llama(layers=3, width=20)
    dense = weight_graph(model).adjacency.toarray()
    sp = weight_graph(model, top_k=3).adjacency.toarray()
    np.testing.assert_allclose(sp, sp.T)
    kept = sp > 0
    assert np.all(sp[kept] == pytest.approx(dense[kept], rel=1e-6))
    for blk in ((slice(0, 20), slice(20, 40)), (slice(20, 40), slice(40, 60))):
        d, s = dense[blk], sp[blk]
        for i in range(20):  # each node's 3 strongest edges to the neighbouring layer survive
            assert set(np.argsort(-d[i])[:3]) <= set(np.flatnonzero(s[i]))
            assert set(np.argsort(-d[:, i])[:3]) <= set(np.flatnonzero(s[:, i]))
        assert (s > 0).sum() <= 2 * 3 * 20


# ------------------------------------------------------------------------------------------------ MoEfication


def test_moefication_gives_equal_experts_per_layer():
    model = tiny_llama(layers=3, width=48)
    experts = moefy(from_module(model), n_experts=8)
    assert list(experts) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    for labels in experts.values():
        assert np.bincount(labels, minlength=8).tolist() == [6] * 8
    for projection in ("gate", "both"):
        lab = moefy_site(model, "layers.1.mlp", 8, projection=projection)
        assert np.bincount(lab, minlength=8).tolist() == [6] * 8
    uneven = moefy_site(model, "layers.0.mlp", 10)
    assert sorted(np.bincount(uneven).tolist()) == [4, 4] + [5] * 8
    with pytest.raises(ValueError, match="between 1 and the MLP width 48"):
        moefy_site(model, "layers.0.mlp", 49)
    with pytest.raises(ValueError, match="between 1"):
        moefy_site(model, "layers.0.mlp", 0)


def test_moefication_groups_neurons_that_read_the_same_direction():
    model = tiny_llama(layers=2, width=48, hidden=16)
    site = find_sites(model)["layers.0.mlp"]
    truth = np.random.default_rng(0).permutation(np.repeat(np.arange(6), 8))
    directions = torch.randn(6, 16)
    up = model.get_submodule(site.inputs[1])
    with torch.no_grad():  # rows of up_proj = one of 6 directions, random scale, a little noise
        up.weight.copy_(directions[truth] * (0.5 + torch.rand(48, 1)) + 0.05 * torch.randn(48, 16))
    feats = expert_features(model, site)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0)
    lab = moefy_site(model, site, 6)
    assert adjusted_rand_score(truth, lab) == pytest.approx(1.0)
    # the gate rows are random: clustering them does not recover the planted groups
    assert adjusted_rand_score(truth, moefy_site(model, site, 6, projection="gate")) < 0.5


def test_moefication_of_a_non_gated_mlp():
    model = tiny_gpt2()
    assert np.bincount(moefy_site(model, "layers.0.mlp", 5)).tolist() == [8] * 5
    with pytest.raises(ValueError, match="non-gated"):
        moefy_site(model, "layers.0.mlp", 5, projection="gate")


def test_coactivation_experts_recover_blocks():
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(4), 10))
    acts = np.maximum(rng.normal(size=(2000, 4)), 0)[:, truth] + 0.05 * rng.random((2000, 40))
    comoment = torch.tensor(acts.T @ acts / len(acts))
    lab = coactivation_experts(comoment, 4)
    assert np.bincount(lab).tolist() == [10] * 4
    assert adjusted_rand_score(truth, lab) == pytest.approx(1.0)
    assert adjusted_rand_score(truth, coactivation_experts(comoment, 4, keep=0.3)) == pytest.approx(1.0)


def brute_coactivation(x: np.ndarray, threshold_sum: float) -> np.ndarray:
    """The published graph written from its definition: edge i-j = sum over tokens of relu(x_ti) * relu(x_tj),
    no self-loops, edges below the threshold dropped (loops, no matrix products)."""
    t, w = x.shape
    a = np.zeros((w, w))
    for i in range(w):
        for j in range(w):
            if i == j:
                continue
            total = 0.0
            for k in range(t):
                total += max(x[k, i], 0.0) * max(x[k, j], 0.0)
            a[i, j] = total if total >= threshold_sum else 0.0
    return a


def test_relu_coactivation_graph_matches_the_definition():
    from neurospec.record.coactivation import ReluCoMoments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 9, generator=g, dtype=torch.float64) + torch.linspace(-1, 1, 9, dtype=torch.float64)
    x[:, 4] = -x[:, 4].abs()  # a neuron that never fires: no edges at all
    t = x.shape[0]
    mean_graph = relu_coactivation(x)
    thr = float(np.median(mean_graph[~np.eye(9, dtype=bool) & (mean_graph > 0)]))
    for threshold in (0.0, thr):
        want = brute_coactivation(x.numpy(), threshold * t)  # the sum over tokens; the threshold scales with it
        got = coactivation_graph(mean_graph, threshold=threshold) * t
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert 0 < np.count_nonzero(coactivation_graph(mean_graph, threshold=thr)) < np.count_nonzero(
        coactivation_graph(mean_graph))
    # streamed in batches, merged, and with a non-finite row that is dropped: the same matrix
    a, b = ReluCoMoments(9), ReluCoMoments(9)
    a.update(x[:25])
    bad = x[25:40].clone()
    bad[3, 2] = float("-inf")
    b.update(bad)
    b.update(x[40:].float())
    a.merge(b)
    kept = torch.cat([x[:25], x[25:40][torch.arange(15) != 3], x[40:].float().double()])
    assert int(a.state_dict()["dropped"]) == 1 and int(a.state_dict()["count"]) == t - 1
    np.testing.assert_allclose(a.coactivation().numpy() * (t - 1), brute_coactivation(kept.numpy(), 0.0)
                               + np.diag((kept.clamp(min=0) ** 2).sum(0).numpy()), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="threshold"):
        coactivation_graph(mean_graph, threshold=-1.0)


def test_relu_and_raw_coactivation_give_different_experts():
    """Negative co-activation links neurons in the raw second moments but not in the published (relu) graph."""
    rng = np.random.default_rng(1)
    fire = [(0, 1, 2, 3), (4, 5, 6, 7)]  # fire together (positive)
    dip = [(0, 1, 4, 5), (2, 3, 6, 7)]  # dip together, strongly negative (SiLU/GELU-like)
    rows = []
    for _ in range(400):
        x = rng.normal(0, 0.05, 8)
        kind = rng.integers(4)
        group = (fire + dip)[kind]
        x[list(group)] += rng.uniform(1, 2) if kind < 2 else -rng.uniform(4, 6)
        rows.append(x)
    x = np.array(rows)
    relu_truth, raw_truth = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 0, 0, 1, 1])
    relu_lab = coactivation_experts(relu_coactivation(x), 2)
    raw_lab = coactivation_experts(x.T @ x / len(x), 2)
    assert adjusted_rand_score(relu_truth, relu_lab) == pytest.approx(1.0)
    assert adjusted_rand_score(raw_truth, raw_lab) == pytest.approx(1.0)


def test_route_topk_matches_a_per_token_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    labels = np.repeat(np.arange(4), 3)
    out = route_topk(x, labels, 2)
    for b in range(2):
        for t in range(5):
            scores = [float(x[b, t, labels == e].sum()) for e in range(4)]
            top = set(np.argsort(scores)[-2:])
            expected = torch.stack([x[b, t, i] if labels[i] in top else torch.tensor(0.0) for i in range(12)])
            torch.testing.assert_close(out[b, t], expected)
    torch.testing.assert_close(route_topk(x, labels, 4), x)
    absed = route_topk(x, labels, 1, score="abs")
    assert ((absed != 0).reshape(10, 4, 3).any(-1).sum(-1) == 1).all()
    with pytest.raises(ValueError, match="k must be"):
        route_topk(x, labels, 5)


def test_install_routing_hooks_the_down_projection_and_cleans_up():
    model = tiny_llama(layers=2, width=24)
    site = find_sites(model)["layers.1.mlp"]
    labels = np.arange(24) % 6
    down = model.get_submodule(site.module)
    seen = []
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        probe = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        base = model(ids).logits
        probe.remove()
        with install_routing(model, site, labels, 2):
            # registered after the routing hook, so it sees the routed input
            probe = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
            routed = model(ids).logits
            probe.remove()
        after = model(ids).logits
    torch.testing.assert_close(seen[1], route_topk(seen[0], labels, 2))
    assert not torch.allclose(routed, base)
    torch.testing.assert_close(after, base)
    assert len(down._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError), install_routing(model, site, labels, 2):
        raise RuntimeError("boom")
    assert len(down._forward_pre_hooks) == 0


# ---------------------------------------------------------------------------------------------- baselines


def test_shuffle_preserves_each_matrix_multiset():
    model = tiny_llama(layers=3, width=16)
    chain = WeightChain.from_model(model, projection="max")
    shuffled = chain.shuffled(seed=1)
    for a, b in zip(chain.matrices(), shuffled.matrices(), strict=True):
        assert a.shape == b.shape and not torch.equal(a, b)
        assert torch.equal(a.reshape(-1).sort().values, b.reshape(-1).sort().values)
    copy = shuffle_weights(model, seed=3)
    sites = find_sites(model).of_kind("mlp")
    for s in sites:
        for path in (*s.inputs, s.module):
            w0, w1 = model.get_submodule(path).weight, copy.get_submodule(path).weight
            assert not torch.equal(w0, w1)
            assert torch.equal(w0.reshape(-1).sort().values, w1.reshape(-1).sort().values)
    assert torch.equal(model.model.embed_tokens.weight, copy.model.embed_tokens.weight)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    smlp = shuffle_weights(mlp, seed=0)
    for i in (0, 2):
        assert torch.equal(mlp[i].weight.reshape(-1).sort().values, smlp[i].weight.reshape(-1).sort().values)


def test_modular_network_is_more_clusterable_than_shuffled():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                        nn.Linear(40, 3))
    block = torch.block_diag(*[torch.ones(10, 10)] * 4)
    with torch.no_grad():  # four modules: strong weights within, weak across
        for i in (2, 4):
            mlp[i].weight.mul_(block * 1.0 + 0.02)
    res = clusterability(mlp, 4, n_shuffles=9, seed=0)
    assert res.null.shape == (9,) and res.pvalue == pytest.approx(0.1)
    assert res.ncut < res.mean and res.z < -3


# ------------------------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_smollm2_moefication_and_weight_graph():
    from neurospec.models.loading import load_model

    loaded = load_model("smollm2-135m")
    experts = moefy(loaded, ["layers.0.mlp", "layers.29.mlp"])
    for lab in experts.values():
        assert np.bincount(lab).tolist() == [16] * 96
    g = weight_graph(loaded, layers=[0, 1], top_k=16)
    assert g.n_nodes == 2 * 1536
    labels = spectral_clustering(g.adjacency, 8, seed=0)
    assert labels.shape == (3072,) and set(np.unique(labels)) <= set(range(-1, 8))
