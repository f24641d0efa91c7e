"""Sparse expansion on tiny random models: routing to the nearest centroid, the forward against a per-token loop, one
cluster equals plain SparseGPT, each copy equals SparseGPT on its cluster's inputs (layer-sequential), achieved
sparsity and fallbacks, evaluation and recording of an expanded model, the error/W1 comparison, clear errors."""

import numpy as np
import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.models.linear import is_linear, linear_dims, weight_out_in
from neurospec.sparsity import InputHessian, list_linears, make_pattern, prune_weight, save_sparse, sparsify
from neurospec.sparsity.expansion import (
    ExpandedLinear,
    expand,
    expansion_error,
    expansion_memory,
    fit_router,
    mlp_linears,
    route,
)

from tiny import char_tokenizer, tiny_model

MLP = ["layers.{b}.mlp.gate_proj", "layers.{b}.mlp.up_proj", "layers.{b}.mlp.down_proj"]


def ids(n=32, seq=16, seed=0):
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def random_layer(k=4, out=5, inp=6, p=2, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    return ExpandedLinear(torch.randn(k, out, inp, generator=g), torch.randn(out, generator=g) if bias else None,
                          torch.randn(inp, generator=g), torch.randn(p, inp, generator=g),
                          3 * torch.randn(k, p, generator=g))


@pytest.fixture(scope="module")
def expanded():
    """The tiny Llama expanded (2 clusters, every block) and the dense model it came from."""
    model = tiny_model("llama")
    return model, expand(model, ids(), clusters=2, seed=0, batch_size=8)


def test_routing_picks_the_nearest_centroid_and_matches_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    layer = random_layer()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    got = layer.route(x.reshape(5, 10, 6))
    assert got.shape == (5, 10)
    xs, mean, comp, cent = (t.double().numpy() for t in (x, layer.mean, layer.components, layer.centroids))
    for t in range(50):  # brute force: every centroid's distance, one token at a time
        z = (xs[t] - mean) @ comp.T
        assert int(got.reshape(-1)[t]) == int(np.argmin([((z - c) ** 2).sum() for c in cent]))
    # a fitted router routes as scikit-learn's own predict on the fitted PCA and k-means
    data = torch.randn(200, 6, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 7)
    r = fit_router(data, 3, 2, seed=0)
    pca = PCA(n_components=2, random_state=0).fit(data.numpy())
    km = KMeans(n_clusters=3, n_init=1, random_state=0).fit(pca.transform(data.numpy()))
    assert np.array_equal(route(data, r["mean"], r["components"], r["centroids"]).numpy(),
                          km.predict(pca.transform(data.numpy())))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_a_per_token_loop(bias):
    layer = random_layer(bias=bias)
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(3))
    labels = layer.route(x).reshape(-1)
    assert len(set(labels.tolist())) > 1  # several clusters are used
    want = torch.stack([layer.weights[k] @ xt + (layer.bias if bias else 0)
                        for xt, k in zip(x.reshape(-1, 6), labels.tolist(), strict=True)])
    torch.testing.assert_close(layer(x), want.reshape(3, 7, 5), rtol=1e-6, atol=1e-6)
    assert is_linear(layer) and linear_dims(layer) == (6, 5)
    with pytest.raises(NeurospecError, match="one weight per input cluster"):
        weight_out_in(layer)


def test_one_cluster_equals_plain_sparsegpt():
    model = tiny_model("llama")
    names = [n.format(b=b) for b in (0, 1) for n in MLP]
    plain = sparsify(model, "sparsegpt", calibration=ids(8), layers=names, batch_size=4)
    one = expand(model, ids(8), clusters=1, batch_size=4)
    p_lin, e_lin = list_linears(plain.model), list_linears(one.model)
    for n in names:
        assert e_lin[n].module.weights.shape[0] == 1 and one.layers[n].fallbacks == []
        if n.startswith("layers.0."):  # same inputs, same streamed Hessian: bit for bit
            assert torch.equal(e_lin[n].module.weights[0], weight_out_in(p_lin[n].module))
        torch.testing.assert_close(e_lin[n].module.weights[0], weight_out_in(p_lin[n].module), rtol=1e-4, atol=1e-5)
        assert torch.equal(one.layers[n].plain_weight, e_lin[n].module.weights[0])
    with torch.no_grad():
        torch.testing.assert_close(one.model(input_ids=ids(4, seed=5)).logits,
                                   plain.model(input_ids=ids(4, seed=5)).logits, rtol=1e-4, atol=1e-4)


def test_each_copy_is_sparsegpt_on_its_clusters_inputs_from_the_expanded_earlier_block(expanded):
    model, res = expanded
    first = expand(model, ids(), clusters=2, seed=0, layers=[0], batch_size=8)  # block 0 expanded, block 1 dense
    lin, exp_lin = list_linears(first.model), list_linears(res.model)
    batches = {n: [] for n in ("gate_proj", "down_proj")}
    hooks = [lin[f"layers.1.mlp.{n}"].module.register_forward_pre_hook(
        lambda m, a, n=n: batches[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in batches]
    with torch.no_grad():
        for i in range(0, 32, 8):
            first.model(input_ids=ids()[i : i + 8])
    for h in hooks:
        h.remove()
    pat = make_pattern(0.5)
    for n, x in batches.items():
        new = exp_lin[f"layers.1.mlp.{n}"].module
        r = fit_router(torch.cat(x), 2, new.components.shape[0], seed=0)
        torch.testing.assert_close(r["centroids"], new.centroids)
        accs = [InputHessian(), InputHessian()]
        for b in x:
            labels = new.route(b)
            for k in range(2):
                accs[k].update(b[labels == k])
        assert [a.count for a in accs] == res.layers[f"layers.1.mlp.{n}"].cluster_tokens
        assert min(a.count for a in accs) >= new.in_features  # no fallback: each copy is its cluster's own
        for k in range(2):
            want = prune_weight("sparsegpt", weight_out_in(lin[f"layers.1.mlp.{n}"].module), accs[k].compute(), pat)
            torch.testing.assert_close(new.weights[k], want.weight, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(new.weights[0], new.weights[1])


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_achieved_sparsity_per_copy_and_fallbacks(pattern):
    model = tiny_model("llama")
    res = expand(model, ids(), pattern=pattern, clusters=3, layers=[0], batch_size=8)
    for n in (x.format(b=0) for x in MLP):
        info, mod = res.layers[n], list_linears(res.model)[n].module
        assert sum(info.cluster_tokens) == 512 and len(info.sparsity) == 3
        for k in range(3):
            w = mod.weights[k]
            assert float((w == 0).float().mean()) == pytest.approx(info.sparsity[k]) == pytest.approx(0.5)
            if pattern == "2:4":
                assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
            if k in info.fallbacks:
                assert info.cluster_tokens[k] < mod.in_features and torch.equal(w, info.plain_weight)
            else:
                assert info.cluster_tokens[k] >= mod.in_features and not torch.equal(w, info.plain_weight)
    every = expand(model, ids(), clusters=2, layers=[0], min_cluster_tokens=10**6, batch_size=8)
    for n, info in every.layers.items():
        assert info.fallbacks == [0, 1]
        assert all(torch.equal(w, info.plain_weight) for w in list_linears(every.model)[n].module.weights)


def test_caller_unchanged_inplace_and_memory_estimate(expanded):
    model, res = expanded
    assert all(type(list_linears(model)[n.format(b=b)].module) is torch.nn.Linear for b in (0, 1) for n in MLP)
    dense_params = sum(p.numel() for p in model.parameters())
    est = expansion_memory(model, clusters=2)
    assert est["modules"] == 6 and sorted(res.layers) == sorted(mlp_linears(model))
    assert sum(p.numel() for p in res.model.parameters()) - dense_params == est["parameters"]
    assert est["bytes"] == 4 * est["parameters"]
    copy_ = tiny_model("llama")
    out = expand(copy_, ids(), clusters=2, layers=[1], inplace=True, batch_size=8)
    assert out.model is copy_ and isinstance(copy_.model.layers[1].mlp.up_proj, ExpandedLinear)
    assert type(copy_.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_expanded_model_evaluates_and_records(expanded, tmp_path, monkeypatch):
    from neurospec.evaluate import evaluate_lm, task_metrics
    from neurospec.models.loading import from_module
    from neurospec.record.recorder import RecordConfig, record
    from neurospec.record.store import open_run

    from tiny import write_corpus

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    _, res = expanded
    loaded = from_module(res.model, char_tokenizer(), name="tiny-expanded")
    held = ids(6, seed=7)
    got = evaluate_lm(loaded, held, batch_size=3, topk=5)
    with torch.no_grad():
        logits = res.model(input_ids=held).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), held[:, 1:].reshape(-1))
    assert got["loss"] == pytest.approx(float(want), rel=1e-5) and "top5" in got
    assert task_metrics(loaded, held, batch_size=3)["loss"] == pytest.approx(got["loss"], rel=1e-6)
    # the recorder's site hooks sit on the expanded down projections (and see their inputs)
    seen = []
    h = res.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    cfg = RecordConfig(tokens=128, eval_tokens=32, seq_len=16, batch_size=4, hist_bins=16, reservoir=4)
    record(loaded, [f"alpha={write_corpus(tmp_path / 'a.txt')}"], tmp_path / "run", cfg)
    h.remove()
    stats = open_run(tmp_path / "run").stats("alpha")
    assert seen and set(seen) == {96}
    assert int(stats["layers.0.mlp"]["count"][0]) == 128 and int(stats["layers.1.mlp"]["count"][0]) == 128


def test_bert_expands_intermediate_and_output_dense():
    from neurospec.evaluate import evaluate_lm

    model = tiny_model("bert")
    res = expand(model, ids(), clusters=2, layers=[0], batch_size=8)
    assert sorted(res.layers) == ["layers.0.intermediate.dense", "layers.0.output.dense"]
    layer = res.model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, ExpandedLinear) and isinstance(layer.output.dense, ExpandedLinear)
    assert torch.equal(layer.output.dense.bias, model.bert.encoder.layer[0].output.dense.bias)
    got = evaluate_lm(res.model, ids(4, seed=3), mask_token_id=4, special_ids=torch.tensor([2, 3]))
    assert got["objective"] == "masked" and np.isfinite(got["loss"])


def test_expansion_error_equals_direct_outputs_and_one_cluster_equals_plain(expanded):
    from scipy.stats import spearmanr

    from neurospec.sparsity import relative_output_error

    model, res = expanded
    held = ids(8, seed=9)
    w1 = {n: torch.rand(linear_dims(list_linears(model)[n].module)[1], generator=torch.Generator().manual_seed(i),
                        dtype=torch.float64) for i, n in enumerate(res.layers)}
    errs = expansion_error(model, res, held, w1=w1, w1_after=False)
    n = "layers.1.mlp.down_proj"
    xs = []
    h = list_linears(model)[n].module.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        model(input_ids=held)
    h.remove()
    x = torch.cat(xs).double()
    mod = list_linears(res.model)[n].module
    W = weight_out_in(list_linears(model)[n].module).detach().double()
    y = x @ W.t()
    y_exp = torch.stack([mod.weights[k].double() @ xt for xt, k in zip(x, mod.route(x).tolist(), strict=True)])
    want = (y - y_exp).norm(dim=0) / y.norm(dim=0)
    row = errs[n]
    torch.testing.assert_close(row["per_neuron"]["expanded"], want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(row["per_neuron"]["plain"],
                               relative_output_error(W, res.layers[n].plain_weight, x), rtol=1e-6, atol=1e-9)
    red = (row["per_neuron"]["plain"] - want).numpy()
    assert row["spearman"] == pytest.approx(spearmanr(red, w1[n].numpy()).statistic, abs=1e-9)
    top = np.argsort(-w1[n].numpy(), kind="stable")[:2]
    rest = np.setdiff1d(np.arange(64), top)
    assert row["top"] == 2 and row["reduction_top"] == pytest.approx(red[top].mean())
    assert row["reduction_rest"] == pytest.approx(red[rest].mean())
    assert row["error_plain"] == pytest.approx(float(row["per_neuron"]["plain"].mean()))
    one = expand(model, ids(), clusters=1, layers=[0], batch_size=8)
    e1 = expansion_error(model, one, held, w1_after=True)
    for r in e1.values():  # one cluster: the expansion is plain SparseGPT; W1 is scored when not given
        torch.testing.assert_close(r["per_neuron"]["expanded"], r["per_neuron"]["plain"], rtol=1e-9, atol=1e-12)
        assert torch.isfinite(r["per_neuron"]["w1"]).all() and np.isfinite(r["w1_top_after"])


def test_bad_input_is_a_clear_error(expanded, tmp_path):
    model, res = expanded
    cases = [
        (dict(clusters=0), "clusters must be a positive integer"),
        (dict(clusters=2, pca_div=0), "pca_div must be a positive integer"),
        (dict(clusters=2, pca_div=65, layers=[0]), "pca_div 65 is larger than the input width 64"),
        (dict(clusters=600), "600 clusters need at least as many calibration tokens"),
        (dict(clusters=2, layers=["layers.0.self_attn.q_proj"]), "not an MLP linear module"),
        (dict(clusters=2, blocksize=0, nonsense=1), "takes no option ['nonsense']"),
    ]
    for kw, message in cases:
        with pytest.raises(NeurospecError, match=None) as e:
            expand(model, ids(), **kw)
        assert message in str(e.value), (kw, str(e.value))
    with pytest.raises(NeurospecError, match="already expanded"):
        expand(res.model, ids(), clusters=2, layers=[0])
    with pytest.raises(NeurospecError, match="cannot be saved as a Hugging Face model"):
        save_sparse(res.model, tmp_path / "x")
    with pytest.raises(NeurospecError, match="one weight per input cluster"):
        sparsify(res.model, "magnitude", layers=["layers.0.mlp.up_proj"])
