"""Neuron clusters end to end: the CLI JSON contracts and errors, specialization and alignment pipelines, the zoo
models as analysis targets, the prefix-cached evaluator and the figures - all on tiny models built in-process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neurospec.cli import _register, app

from tiny import char_tokenizer, save_tiny_lm, tiny_model, write_corpus

_register()
runner = CliRunner()
CONTRACT = {"method", "labels_file", "n_clusters", "ncut", "seconds"}
REAL_CACHE = os.environ.get("NEUROSPEC_CACHE")  # the real model's cache, before the tiny-model tests redirect it


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args) -> dict:
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def fails(*args, match: str) -> str:
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    assert match in text and "Traceback" not in text, r.output
    return text


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Llama (width 96, 2 layers) on disk, a corpus task, and a run with MLP co-moments."""
    root = tmp_path_factory.mktemp("clusters")
    mp = pytest.MonkeyPatch()
    mp.setenv("NEUROSPEC_CACHE", str(root / "cache"))
    model = root / "tiny"
    save_tiny_lm(model)
    corpus = write_corpus(root / "words.txt")
    words = f"words={corpus}"
    rec = ["record", "--model", model, "--task", words, "--task", "prose", "--tokens", 256, "--eval-tokens", 64,
           "--seq-len", 32, "--batch-size", 4, "--kinds", "mlp", "--reservoir", 0]
    ok_json(*rec, "--comoments", "mlp", "--relu-comoments", "mlp", "--out", root / "ref")
    ok_json(*rec, "--out", root / "ref-plain")
    yield {"root": root, "model": model, "words": words, "ref": root / "ref", "ref_plain": root / "ref-plain"}
    mp.undo()


# ------------------------------------------------------------------------------------------------- cluster


def test_moefication_json_contract_and_files(ws):
    out = ws["root"] / "moe"
    res = ok_json("cluster", "--model", ws["model"], "--method", "moefication", "--experts", 8, "--out", out)
    assert CONTRACT <= set(res)
    assert res["method"] == "moefication" and res["n_clusters"] == 8 and res["ncut"] is None
    labels = load_file(res["labels_file"])
    assert sorted(labels) == ["layers.0.mlp", "layers.1.mlp"]
    for v in labels.values():
        assert v.dtype == torch.int64 and v.shape == (96,)
        assert np.bincount(v.numpy()).tolist() == [12] * 8
    m = json.loads((out / "clusters.json").read_text())
    assert m["fingerprint"] == res["fingerprint"] and m["params"]["experts"] == 8
    assert m["sizes"]["layers.0.mlp"] == [12] * 8 and m["scope"] == "per_layer"


def test_moefication_experts_that_do_not_divide_the_width(ws):
    res = ok_json("cluster", "--model", ws["model"], "--method", "moefication", "--experts", 7, "--projection",
                  "both", "--out", ws["root"] / "moe7")
    m = json.loads((ws["root"] / "moe7" / "clusters.json").read_text())
    assert res["n_clusters"] == 7 and m["extra"]["expert_sizes"]["layers.0.mlp"] == [13, 14]
    assert "one neuron more" in m["extra"]["note"]


def test_spectral_weight_graph_with_clusterability(ws):
    from neurospec.cluster.baselines import shuffle_seeds
    from neurospec.cluster.result import load_clustering
    from neurospec.cluster.spectral import WeightChain, ncut, spectral_clustering, weight_graph
    from neurospec.models.loading import load_model

    out = ws["root"] / "spec-w"
    res = ok_json("cluster", "--model", ws["model"], "--method", "spectral", "--graph", "weights", "--k", 4,
                  "--shuffles", 3, "--layers", "0-1", "--out", out)
    assert CONTRACT <= set(res) and res["n_clusters"] == 4 and res["scope"] == "global"
    cb = res["clusterability"]
    assert set(cb) == {"mean", "std", "z", "pvalue", "ncut"}
    cl = load_clustering(out)
    loaded = load_model(str(ws["model"]))
    g = weight_graph(loaded)
    assert ncut(g.adjacency, np.concatenate(list(cl.labels.values()))) == pytest.approx(res["ncut"])
    # the null distribution redone by hand: the same shuffles, clustered the same way; then the p-value counted
    chain = WeightChain.from_model(loaded, sites=["layers.0.mlp", "layers.1.mlp"], projection="up")
    null = []
    for seed in shuffle_seeds(0, 3):
        adj = chain.shuffled(seed).graph().adjacency
        null.append(ncut(adj, spectral_clustering(adj, 4, n_init=10, seed=0)))
    np.testing.assert_allclose(cl.extra["clusterability"]["null"], null, rtol=1e-9)
    assert cb["mean"] == pytest.approx(np.mean(null)) and cb["std"] == pytest.approx(np.std(null, ddof=1))
    assert cb["z"] == pytest.approx((res["ncut"] - np.mean(null)) / np.std(null, ddof=1))
    assert cb["pvalue"] == pytest.approx((1 + sum(v <= res["ncut"] for v in null)) / (1 + len(null)))


def test_weight_graph_default_top_k_sparsifies_only_large_graphs(ws, monkeypatch):
    """Unset --top-k keeps every edge of a small graph and each neuron's 32 strongest beyond the edge limit; the
    bundled model's 30 layers are beyond it, one or two of its layer pairs are not; --top-k 0 keeps every edge."""
    from neurospec.cluster.spectral import weight_graph
    from neurospec.experiments import clusters as C
    from neurospec.models.loading import load_model

    assert C.weight_graph_top_k(None, [1536] * 30) == 32
    assert C.weight_graph_top_k(None, [1536] * 3) is None and C.weight_graph_top_k(0, [1536] * 30) is None
    assert C.weight_graph_top_k(8, [96, 96]) == 8
    loaded = load_model(str(ws["model"]))
    args = ("cluster", "--model", ws["model"], "--method", "spectral", "--graph", "weights", "--k", 4)
    dense = ok_json(*args, "--out", ws["root"] / "w-dense")
    assert dense["top_k"] is None
    m = json.loads((ws["root"] / "w-dense" / "clusters.json").read_text())
    assert m["extra"]["n_edges"] == weight_graph(loaded).adjacency.nnz // 2 == 96 * 96
    monkeypatch.setattr(C, "DENSE_EDGE_LIMIT", 96 * 96 - 1)
    monkeypatch.setattr(C, "DEFAULT_TOP_K", 5)
    sparse = ok_json(*args, "--out", ws["root"] / "w-sparse")
    m = json.loads((ws["root"] / "w-sparse" / "clusters.json").read_text())
    assert sparse["top_k"] == 5 and m["extra"]["n_edges"] == weight_graph(loaded, top_k=5).adjacency.nnz // 2
    assert m["extra"]["n_edges"] < 96 * 96
    every = ok_json(*args, "--top-k", 0, "--out", ws["root"] / "w-every")
    assert every["top_k"] is None and every["ncut"] == pytest.approx(dense["ncut"])


def test_spectral_correlation_graph_from_reference_run(ws):
    out = ws["root"] / "spec-c"
    res = ok_json("cluster", "--model", ws["model"], "--method", "spectral", "--graph", "correlation",
                  "--reference", ws["ref"], "--task", "prose", "--k", 4, "--out", out)
    m = json.loads((out / "clusters.json").read_text())
    assert m["scope"] == "per_layer" and m["extra"]["reference_tasks"] == ["prose"]
    per_site = m["extra"]["ncut_per_site"]
    assert res["ncut"] == pytest.approx(np.mean(list(per_site.values())))
    moe = ok_json("cluster", "--model", ws["model"], "--method", "moefication", "--graph", "coactivation",
                  "--experts", 6, "--reference", ws["ref"], "--out", ws["root"] / "moe-co")
    assert moe["n_clusters"] == 6


def test_moefication_coactivation_graph_variants_and_threshold(ws):
    """The cluster command partitions the published relu co-activation graph of the reference run (or the raw
    second moments), thresholded as asked: the same labels as the library on the run's recorded matrices."""
    from neurospec.cluster.moefication import coactivation_experts, coactivation_graph
    from neurospec.cluster.result import load_clustering
    from neurospec.record.store import open_run

    run = open_run(ws["ref"])
    site = "layers.1.mlp"

    def recorded(kind):
        parts = [run.accumulators(t)[site][kind] for t in run.tasks]
        for p in parts[1:]:
            parts[0].merge(p)
        c = parts[0].compute()
        return (c["cov"] + torch.outer(c["mean"], c["mean"])).numpy()

    relu, raw = recorded("relu_comoments"), recorded("comoments")
    assert (relu >= -1e-12).all() and (raw < 0).any()  # SiLU MLP: the raw moments have negative entries
    off = ~np.eye(relu.shape[0], dtype=bool)
    thr = float(np.quantile(relu[off], 0.5))
    base = ["cluster", "--model", ws["model"], "--method", "moefication", "--graph", "coactivation", "--experts", 6,
            "--reference", ws["ref"], "--layers", "1"]
    for variant, threshold, matrix in (("relu", thr, relu), ("raw", None, raw)):
        out = ws["root"] / f"moe-co-{variant}"
        extra = ["--coactivation", variant] + ([] if threshold is None else ["--threshold", threshold])
        res = ok_json(*base, *extra, "--out", out)
        assert res["coactivation"] == variant and res["threshold"] == (threshold or 0.0)
        graph = coactivation_graph(matrix, threshold=threshold or 0.0)
        assert res["edges_kept"][site] == pytest.approx(np.count_nonzero(graph) / off.sum())
        want = coactivation_experts(matrix, 6, threshold=threshold or 0.0)
        np.testing.assert_array_equal(load_clustering(out).labels[site], want)
    assert 0.4 < ok_json(*base, "--threshold", thr, "--out", ws["root"] / "moe-co-t")["edges_kept"][site] < 0.6
    default = ok_json(*base, "--out", ws["root"] / "moe-co-default")
    assert default["coactivation"] == "relu" and default["threshold"] == 0.0
    np.testing.assert_array_equal(load_clustering(ws["root"] / "moe-co-default").labels[site],
                                  coactivation_experts(relu, 6))
    fails(*base[:-4], "--reference", ws["ref_plain"], "--out", ws["root"] / "x", match="--relu-comoments mlp")
    fails(*base, "--coactivation", "abs", "--out", ws["root"] / "x", match="--coactivation must be one of relu, raw")
    fails(*base, "--threshold", -1, "--out", ws["root"] / "x", match="--threshold must be")
    fails("cluster", "--model", ws["model"], "--method", "spectral", "--threshold", 0.1, "--out", ws["root"] / "x",
          match="apply to moefication by coactivation")


def test_cluster_errors_are_clear(ws, tmp_path):
    base = ["cluster", "--model", ws["model"], "--out", tmp_path / "x"]
    fails(*base, "--method", "spectral", "--graph", "correlation", "--reference", ws["ref_plain"],
          match="--comoments mlp")
    fails(*base, "--method", "spectral", "--graph", "correlation", match="--reference")
    fails(*base, "--method", "spectral", "--k", 500, match="larger than the number of live neurons")
    fails(*base, "--method", "moefication", "--experts", 200, match="does not fit")
    fails(*base, "--method", "moefication", "--shuffles", 3, match="--shuffles")
    fails(*base, "--method", "kmeans", match="unknown clustering method")
    fails(*base, "--method", "spectral", "--graph", "params", match="reads the graphs")
    fails(*base, "--method", "spectral", "--layers", "0", match="at least two layers")
    fails(*base, "--method", "moefication", "--layers", "5", match="no MLP site at layer")
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    fails("cluster", "--model", other, "--out", tmp_path / "y", "--method", "spectral", "--graph", "correlation",
          "--reference", ws["ref"], match="another model")


def test_a_model_without_mlp_sites_is_refused():
    from neurospec.errors import ArchitectureError
    from neurospec.experiments.clusters import ClusterConfig, cluster
    from neurospec.models.loading import from_module
    from neurospec.models.sites import Sites

    loaded = from_module(tiny_model("llama"))
    loaded.sites = Sites(loaded.sites.family, loaded.sites.of_kind("attn"), loaded.sites.hidden_size)
    with pytest.raises(ArchitectureError, match="no MLP sites"):
        cluster(loaded, ClusterConfig("moefication", experts=4))


# ---------------------------------------------------------------------------------------- specialization


def test_specialization_json_contract_and_p_values(ws):
    d = ws["root"] / "spec-w"
    if not (d / "clusters.json").exists():
        ok_json("cluster", "--model", ws["model"], "--method", "spectral", "--k", 4, "--out", d)
    n_random = 4
    res = ok_json("specialization", d, "--task", ws["words"], "--task", "prose", "--n-random", n_random,
                  "--tokens", 256, "--eval-tokens", 64, "--seq-len", 32, "--per-layer", 2,
                  "--n-random-coherence", 49)
    assert res["tasks"] == ["words", "prose"] and res["n_units"] == 4
    assert set(res["importance"]) == {"words", "prose"} and res["coherence_correlation"] is None
    assert res["coherence_task"] is not None
    full = json.loads((d / "specialization.json").read_text())
    assert "no reference run" in full["coherence_source"]["correlation"]
    for r in full["rows"]:
        for t in ("words", "prose"):
            p = r["importance"][t]["pvalue"]
            assert p * (n_random + 1) == pytest.approx(round(p * (n_random + 1)))
        assert r["coherence_task"]["top_task"] in ("words", "prose")
    assert full["n_evaluations"] == 1 + 4 * (1 + n_random)


def test_specialization_default_layers_and_ablation_cost():
    from neurospec.experiments.specialization import ablation_cost, evenly_spaced

    assert evenly_spaced(list(range(30)), 4) == (0, 10, 19, 29)
    assert evenly_spaced([3, 7], 4) == (3, 7) and evenly_spaced([0, 1, 2, 3, 4], 4) == (0, 1, 3, 4)
    # 2 units in layer 0 of 30 (full passes) and 1 unit in layer 29 (one block of 30), 1 + 4 evaluations each
    assert ablation_cost({"layers.0.mlp": [1, 2], "layers.29.mlp": [0]}, 4, 30) == pytest.approx(5 * (2 + 1 / 30))


def test_specialization_prints_an_estimate_and_progress_lines(ws, monkeypatch):
    import neurospec.cli.common as common

    d = ws["root"] / "spec-est"
    ok_json("cluster", "--model", ws["model"], "--method", "spectral", "--k", 4, "--out", d)
    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setenv("NEUROSPEC_PROGRESS_EVERY", "1000")
    monkeypatch.setattr(common, "ESTIMATE_ABOVE_S", 0.0)
    r = invoke("specialization", d, "--task", ws["words"], "--task", "prose", "--n-random", 2, "--tokens", 128,
               "--eval-tokens", 64, "--seq-len", 32, "--per-layer", 1, "--n-random-coherence", 9, "--json")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    est = [i for i, x in enumerate(lines) if x.startswith("specialization: this takes about ")]
    assert len(est) == 1 and "6 ablations of 64 tokens per task" in lines[est[0]]
    first = next(i for i, x in enumerate(lines) if x.startswith("ablations: "))
    assert est[0] < first  # said before the ablations start
    assert any(x.startswith("ablations: 6/6 (100%)") and x.endswith("done") for x in lines)
    assert any(x.startswith("prose: ") for x in lines[:est[0]])  # the recording's progress came first
    assert json.loads(r.stdout)["n_units"] == 2


def test_specialization_uses_the_reference_for_correlation_coherence(ws):
    d = ws["root"] / "spec-c"
    if not (d / "clusters.json").exists():
        test_spectral_correlation_graph_from_reference_run(ws)
    res = ok_json("specialization", d, "--task", "prose", "--n-random", 2, "--tokens", 128, "--eval-tokens", 64,
                  "--seq-len", 32, "--per-layer", 1, "--ablation", "mean", "--n-random-coherence", 19)
    assert res["coherence_correlation"] is not None and res["coherence_task"] is None  # one task: no selectivity
    fails("specialization", d, "--n-random", 2, match="at least one task")


def test_selected_units_and_the_null_pool():
    from neurospec.experiments.specialization import tested_labels

    lab = np.array([0, 0, 0, 1, 1, 2, -1, 2, 2, 2])
    out = tested_labels(lab, [2])
    assert (out[lab == 2] == 2).all() and (out == -1).sum() == 1
    others = out[(lab >= 0) & (lab != 2)]
    assert len(set(others.tolist())) == others.size and others.min() > 2


def test_merged_moments_equal_the_statistics_of_the_union():
    from neurospec.record.accumulators import NeuronStats, merge_stats

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) * 3 + 1
    parts = []
    for x in (a, b):
        acc = NeuronStats(5)
        acc.update(x)
        parts.append({"s": acc})
    whole = NeuronStats(5)
    whole.update(torch.cat([a, b]))
    want, got = whole.compute(), merge_stats(parts)["s"]
    for k in ("mean", "var", "std", "rms", "mean_abs", "mean_sqrt_abs", "frac_pos", "mean_pos", "mean_neg", "min",
              "max", "count"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_cache_gives_the_full_forward_result(family):
    from neurospec.evaluate.site_ablation import LMEvaluator, block_list
    from neurospec.models.loading import from_module
    from neurospec.runtime import limited_threads

    loaded = from_module(tiny_model(family))
    before = list(block_list(loaded.model, loaded.sites))
    g = torch.Generator().manual_seed(0)
    blocks = {"a": torch.randint(2, 128, (5, 16), generator=g), "b": torch.randint(2, 128, (3, 16), generator=g)}
    with limited_threads(1):
        fast = LMEvaluator(loaded, blocks, layers=[0, 1], batch_size=2)
        slow = LMEvaluator(loaded, blocks, batch_size=2, prefix_cache=False)
        assert fast.blocks is not None and 0 in fast._cache and slow.blocks is None
        for site in ("layers.1.mlp", "layers.0.mlp"):
            a, b = fast.ablate(site, [1, 5, 7]), slow.ablate(site, [1, 5, 7])
            for t in blocks:
                assert a[t]["loss"] == pytest.approx(b[t]["loss"], abs=1e-6) and a[t]["top1"] == b[t]["top1"]
                assert a[t]["loss"] != fast.baseline[t]["loss"]
        empty = fast.ablate("layers.1.mlp", [])
    assert empty["a"]["loss"] == pytest.approx(fast.baseline["a"]["loss"], abs=1e-6)
    assert list(fast.blocks) == before  # every block put back


# ---------------------------------------------------------------------------------------------- alignment


def test_align_json_and_task_masks_match_the_task_map(ws):
    from neurospec.experiments.taskmap import task_masks

    tm_dir = ws["root"] / "map"
    r = invoke("taskmap", "--model", ws["model"], "--task", ws["words"], "--task", "prose", "--tokens", 256,
               "--eval-tokens", 64, "--seq-len", 32, "--batch-size", 4, "--select-frac", 0.1, "--fractions", "0.1",
               "--no-random-init", "--out", tm_dir, "--json")
    assert r.exit_code == 0, r.output
    masks, tm = task_masks(tm_dir)
    for t in ("words", "prose"):
        assert {s: int(m.sum()) for s, m in masks[t].items()} == tm["layer_counts"]["0.1"][t]
    moe = ws["root"] / "moe"
    if not (moe / "clusters.json").exists():
        ok_json("cluster", "--model", ws["model"], "--method", "moefication", "--experts", 8, "--out", moe)
    res = ok_json("align", moe, tm_dir, "--n-perm", 99)
    assert res["tasks"] == ["words", "prose"] and set(res["per_task"]) == {"words", "prose"}
    assert any(row["pvalue_entropy"] is not None for row in res["layers"])
    assert (moe / "alignment.json").is_file()
    written = json.loads((moe / "alignment.json").read_text())["config"]
    assert written == {"type": "AlignConfig", "version": 1, "n_perm": 99, "frac": None, "alpha": 0.05, "seed": 0}
    # planted clusters: in layer 0 the task's neurons form one cluster (entropy 0: no random set is as concentrated,
    # so p is at its minimum 1/(n_perm+1)); in layer 1 each task neuron has a cluster of its own (maximal entropy:
    # every random set is at most as spread, so p is 1)
    from neurospec.cluster.result import Clustering
    from neurospec.models.loading import load_model

    task = next(t for t in ("words", "prose") if all(int(m.sum()) >= 2 for m in masks[t].values()))
    m0, m1 = (masks[task][s].numpy().astype(bool) for s in ("layers.0.mlp", "layers.1.mlp"))
    lab0 = np.zeros(96, dtype=np.int64)
    lab0[~m0] = 1 + np.arange((~m0).sum()) % 7
    k1 = max(int(m1.sum()), 8)
    lab1 = np.arange(96, dtype=np.int64) % k1
    lab1[m1] = np.arange(m1.sum())
    target = load_model(str(ws["model"]))
    Clustering({"layers.0.mlp": lab0, "layers.1.mlp": lab1}, "moefication", "params", "per_layer",
               target.describe(), target.spec).save(ws["root"] / "planted")
    planted = ok_json("align", ws["root"] / "planted", tm_dir, "--n-perm", 99)
    rows = {r["layer"]: r for r in planted["layers"] if r["task"] == task}
    assert rows[0]["n_clusters_hit"] == 1 and rows[0]["entropy"] == pytest.approx(0.0)
    assert rows[0]["pvalue_entropy"] == pytest.approx(1 / 100) and rows[0]["pvalue_clusters"] == pytest.approx(1 / 100)
    assert rows[1]["n_clusters_hit"] == int(m1.sum()) and rows[1]["entropy"] == pytest.approx(np.log(m1.sum()))
    assert rows[1]["pvalue_entropy"] > 0.9 and rows[1]["pvalue_clusters"] == pytest.approx(1.0)
    assert planted["per_task"][task]["layers_significant"] == [0]
    other = ws["root"] / "moe-other"
    m2 = ws["root"] / "tiny2"
    tiny_model("llama", seed=2).save_pretrained(m2)
    char_tokenizer().save_pretrained(m2)
    ok_json("cluster", "--model", m2, "--experts", 8, "--out", other)
    fails("align", other, tm_dir, match="different models")
    fails("align", moe, ws["root"], match="taskmap")


# ------------------------------------------------------------------------------------------------------ zoo


def test_zoo_mlp_as_analysis_target(tmp_path):
    res = ok_json("zoo", "train", "digits-mlp", "--epochs", 3, "--out", tmp_path / "mlp")
    assert res["kind"] == "digits-mlp" and 0.5 < res["test_accuracy"] <= 1
    c = ok_json("cluster", "--model", tmp_path / "mlp", "--method", "spectral", "--k", 6, "--shuffles", 2,
                "--out", tmp_path / "c")
    assert c["n_sites"] == 3 and c["clusterability"] is not None
    # excluded = the neurons that are constant (dead) on the training images, found here by brute force
    from neurospec.cluster.result import load_clustering
    from neurospec.data.digits import digits_split
    from neurospec.models.loading import load_model
    from neurospec.record.activations import image_activations

    acts = image_activations(load_model(str(tmp_path / "mlp")), digits_split().x_train)
    labels = load_clustering(tmp_path / "c").labels
    dead = {name: (x.max(0).values == x.min(0).values).numpy() for name, x in acts.items()}
    assert c["n_excluded"] == sum(int(d.sum()) for d in dead.values())
    for name, d in dead.items():
        np.testing.assert_array_equal(labels[name] == -1, d)
    s = ok_json("specialization", tmp_path / "c", "--task", "all", "--task", "digit-3", "--n-random", 3,
                "--per-layer", 1, "--n-random-coherence", 19)
    assert s["metric"] == "top-1 accuracy drop" and s["tasks"] == ["all", "digit-3"] and s["n_units"] == 3
    assert s["coherence_correlation"] is not None and s["coherence_task"] is not None
    full = json.loads((tmp_path / "c" / "specialization.json").read_text())
    assert full["rows"][0]["coherence_task"]["top_task"].startswith("digit-")
    fails("specialization", tmp_path / "c", "--task", "python", match="unknown task")
    moe = ok_json("cluster", "--model", tmp_path / "mlp", "--method", "moefication", "--experts", 16, "--out",
                  tmp_path / "moe")
    assert moe["n_clusters"] == 16
    fails("zoo", "train", "digits-cnn", "--out", tmp_path / "z", match="unknown zoo model")


def test_zoo_vit_as_analysis_target(tmp_path):
    ok_json("zoo", "train", "digits-vit", "--epochs", 1, "--out", tmp_path / "vit")
    c = ok_json("cluster", "--model", tmp_path / "vit", "--method", "spectral", "--graph", "correlation", "--k", 4,
                "--layers", "0-1", "--out", tmp_path / "c")
    assert c["scope"] == "global" and c["n_sites"] == 2
    s = ok_json("specialization", tmp_path / "c", "--task", "all", "--n-random", 2, "--per-layer", 1,
                "--n-random-coherence", 9)
    assert s["n_units"] == 2 and s["coherence_correlation"] is not None


def test_digit_tasks():
    from neurospec.data import digits as zoo

    assert zoo.parse_digit_tasks(None) == zoo.DIGIT_TASKS
    x, y = zoo.task_images("digit-4", "train")
    assert (y == 4).all() and x.shape[1:] == (1, 8, 8)
    batches = zoo.class_batches("test")
    assert sum(v.shape[0] for v in batches.values()) == 450
    with pytest.raises(ValueError, match="more than once"):
        zoo.parse_digit_tasks(["all", "all"])


# -------------------------------------------------------------------------------------------------- figures


def test_cluster_sections_draw_every_figure(ws, tmp_path):
    from neurospec.report.cluster_figures import cluster_sections

    d = ws["root"] / "spec-w"
    if not (d / "specialization.json").exists():
        test_specialization_json_contract_and_p_values(ws)
    al = {"tasks": ["a"], "method": "spectral", "graph": "weights", "frac": 0.1, "alpha": 0.05,
          "per_task": {"a": {"n_layers_tested": 2, "layers_significant": [0], "fisher": {"pvalue": 0.01}}},
          "rows": [{"task": "a", "layer": i, "entropy_deficit": 0.1 * i, "pvalue_entropy": 0.02 + 0.5 * i}
                   for i in range(2)]}
    (d / "alignment.json").write_text(json.dumps(al))
    sections = cluster_sections(d, tmp_path / "figs")
    text = "".join(sections)
    assert len(sections) == 4 and "Clusterability" in text and "data:image/png;base64" in text
    for name in ("clusters_sizes", "clusters_ncut_shuffled", "clusters_importance_coherence", "clusters_alignment"):
        assert (tmp_path / "figs" / f"{name}.png").is_file() and (tmp_path / "figs" / f"{name}.svg").is_file()
    (d / "alignment.json").unlink()
    assert len(cluster_sections(ws["root"], tmp_path / "figs2")) >= 3  # finds cluster directories one level down


def test_route_top_k_experts(ws):
    moe = ws["root"] / "moe"
    if not (moe / "clusters.json").exists():
        ok_json("cluster", "--model", ws["model"], "--method", "moefication", "--experts", 8, "--out", moe)
    res = ok_json("route", moe, "--task", "prose", "--k", "1,8", "--eval-tokens", 64, "--seq-len", 32)
    assert res["n_experts"] == 8 and [r["k"] for r in res["rows"]] == [1, 8]
    full, base = res["rows"][1]["metrics"]["prose"], res["baseline"]["prose"]
    assert full["loss"] == pytest.approx(base["loss"], abs=1e-6)  # keeping every expert changes nothing
    assert res["rows"][0]["metrics"]["prose"]["loss"] != base["loss"]
    written = json.loads((moe / "routing.json").read_text())["config"]
    assert written["type"] == "RoutingConfig" and written["ks"] == [1, 8] and written["tasks"] == ["prose"]
    assert (written["eval_tokens"], written["seq_len"], written["score"]) == (64, 32, "sum")
    fails("route", moe, "--task", "prose", "--k", 9, match="between 1 and the number of experts 8")
    fails("route", moe, "--task", "prose", "--k", "0,2", match="each k must be an integer >= 1")
    spec = ws["root"] / "route-spec"
    ok_json("cluster", "--model", ws["model"], "--method", "spectral", "--k", 4, "--out", spec)
    fails("route", spec, "--task", "prose", match="needs MoE experts")


# --------------------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_smollm2_cluster_json_and_prefix_cache(tmp_path, monkeypatch):
    from neurospec.evaluate.site_ablation import LMEvaluator
    from neurospec.models.loading import load_model
    from neurospec.runtime import limited_threads

    if REAL_CACHE is None:
        monkeypatch.delenv("NEUROSPEC_CACHE", raising=False)
    else:
        monkeypatch.setenv("NEUROSPEC_CACHE", REAL_CACHE)
    res = ok_json("cluster", "--model", "smollm2-135m", "--method", "moefication", "--layers", "0,29", "--out",
                  tmp_path / "moe")
    assert CONTRACT <= set(res) and res["n_clusters"] == 96 and res["n_neurons"] == 2 * 1536
    res = ok_json("cluster", "--model", "smollm2-135m", "--method", "spectral", "--layers", "0-1", "--top-k", 16,
                  "--k", 8, "--shuffles", 1, "--out", tmp_path / "w")
    assert res["n_clusters"] == 8 and 0 < res["ncut"] < 8
    from neurospec.cluster.result import load_clustering

    null = load_clustering(tmp_path / "w").extra["clusterability"]["null"]
    assert len(null) == 1 and res["clusterability"]["mean"] == pytest.approx(null[0])
    assert res["clusterability"]["pvalue"] == pytest.approx((1 + (null[0] <= res["ncut"])) / 2)
    loaded = load_model("smollm2-135m")
    blocks = {"t": torch.randint(0, 40000, (1, 24), generator=torch.Generator().manual_seed(0))}
    with limited_threads(1):
        fast = LMEvaluator(loaded, blocks, layers=[20])
        slow = LMEvaluator(loaded, blocks, prefix_cache=False)
        a, b = fast.ablate("layers.20.mlp", list(range(0, 1536, 3))), slow.ablate("layers.20.mlp", list(range(0, 1536, 3)))
    assert a["t"]["loss"] == pytest.approx(b["t"]["loss"], abs=1e-5) and a["t"]["loss"] != fast.baseline["t"]["loss"]


def test_specialization_notes_units_that_fill_their_layer(ws, tmp_path):
    from neurospec.cluster.result import Clustering
    from neurospec.experiments.specialization import SpecializationConfig, specialization
    from neurospec.models.loading import load_model

    target = load_model(str(ws["model"]))
    lab = np.r_[np.zeros(80, dtype=np.int64), np.ones(16, dtype=np.int64)]
    Clustering({"layers.0.mlp": lab, "layers.1.mlp": lab}, "spectral", "weights", "global", target.describe(),
               target.spec).save(tmp_path / "c")
    res = specialization(tmp_path / "c", SpecializationConfig(tasks=("prose",), n_random=2, tokens=128, eval_tokens=64,
                                                              seq_len=32, n_random_coherence=9), target=target)
    assert len(res["rows"]) == 4 and len(res["notes"]) == 2 and "80 of the layer's 96" in res["notes"][0]
