"""Task-specific neurons: a planted neuron is found and pruning it hurts only its task; pipelines and contracts."""

import json
import math

import numpy as np
import pytest
import torch

from neurospec.errors import NeurospecError, TaskError
from neurospec.experiments.selective import PruneConfig, normalised_area, selective_pruning
from neurospec.experiments.taskmap import TaskMapConfig, task_map
from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig
from neurospec.record.store import open_run

from tiny import char_tokenizer, write_corpus

RC = RecordConfig(tokens=640, eval_tokens=320, seq_len=32, batch_size=4, reservoir=0, hist_bins=32)
NEURON = 17


def planted_model():
    """A tiny Llama whose MLP neuron layers.0.mlp:17 fires only on the character 'q' and then predicts 'u'."""
    import transformers as T

    tok = char_tokenizer()
    q, u = tok.convert_tokens_to_ids("q"), tok.convert_tokens_to_ids("u")
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, :2] = 0
        emb[q, 0] = 5.0  # dimension 0 carries "this token is q"
        for layer in model.model.layers:  # nothing else writes dimensions 0 and 1
            layer.self_attn.o_proj.weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        mlp = model.model.layers[0].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[NEURON] = 0
            w[NEURON, 0] = 4.0
        mlp.down_proj.weight[:, NEURON] = 0
        mlp.down_proj.weight[1, NEURON] = 3.0  # the neuron writes dimension 1 ...
        head = model.lm_head.weight
        head[:, 1] = 0
        head[u] = 0
        head[u, 1] = 30.0  # ... which is read only by the logit of 'u'
    return from_module(model, tok, name="planted")


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    quack = write_corpus(tmp_path / "q.txt", seed=1, words=("quick", "quiet", "queen", "aqua", "equal"))
    plain = write_corpus(tmp_path / "p.txt", seed=2, words=("alpha", "beta", "delta", "gamma"))
    other = write_corpus(tmp_path / "o.txt", seed=3, words=("one", "two", "three", "five"))
    return {"quack": f"quack={quack}", "plain": f"plain={plain}", "other": f"other={other}"}, tmp_path


def test_planted_neuron_is_found_and_pruning_it_hurts_only_its_task(corpora):
    tasks, tmp = corpora
    loaded = planted_model()
    res = selective_pruning(
        loaded, tasks["quack"], [tasks["plain"]], tmp / "prune", record_cfg=RC,
        prune_cfg=PruneConfig(score="abs", frac=0.006, steps=1),  # floor(0.006 * 192) = 1 neuron
    )
    ids = [ln for ln in (tmp / "prune" / "pruned_neurons.txt").read_text().splitlines() if not ln.startswith("#")]
    assert ids == [f"layers.0.mlp:{NEURON}"]
    base, pruned = res["steps"]
    assert base["n_pruned"] == 0 and pruned["n_pruned"] == 1
    assert base["forget"]["top1"] - pruned["forget"]["top1"] > 0.05, "its task loses the q->u predictions"
    assert pruned["retain"]["top1"] == base["retain"]["top1"], "the other task does not see the neuron at all"
    assert pruned["retain"]["loss"] == pytest.approx(base["retain"]["loss"], abs=1e-6)


def _hand_overlaps(run_dir, names: list[str], frac: float) -> list[list[float]]:
    """The task map's overlap matrix by hand from a run's statistics: abs score against the token-weighted union
    of the other tasks, top floor(frac * N) MLP neurons over both layers, |A ∩ B| / |A| on sets of ids."""
    run = open_run(run_dir)
    stats = {t: run.stats(t) for t in names}
    sites = [s for s in stats[names[0]] if s.endswith(".mlp")]
    sets = []
    for t in names:
        others = [u for u in names if u != t]
        ranked = []
        for s in sites:
            count = sum(stats[u][s]["count"].double() for u in others)
            mean_abs_r = sum(stats[u][s]["count"].double() * stats[u][s]["mean_abs"].double() for u in others) / count
            score = stats[t][s]["mean_abs"].double() / (mean_abs_r + 1e-3)
            ranked += [(float(score[i]), s, i) for i in range(score.numel())]
        ranked.sort(reverse=True)
        k = math.floor(frac * len(ranked))
        assert ranked[k - 1][0] > ranked[k][0] * (1 + 1e-9), "the hand computation needs a clear cut"
        sets.append({(s, i) for _, s, i in ranked[:k]})
    return [[len(a & b) / len(a) for b in sets] for a in sets]


def test_task_map_selectivity_and_contract(corpora):
    tasks, tmp = corpora
    loaded = planted_model()
    res = task_map(loaded, [tasks["quack"], tasks["plain"], tasks["other"]], tmp / "map", record_cfg=RC,
                   cfg=TaskMapConfig(fractions=(0.006, 0.1, 0.5), select_frac=0.006))
    assert res["tasks"] == ["quack", "plain", "other"]
    assert set(res["overlap"]) == {"0.006", "0.1", "0.5"}
    assert res["top_neurons"]["quack"][0]["neuron"] == f"layers.0.mlp:{NEURON}"
    sel = np.array(res["selectivity"])
    assert sel[0, 0] > 0.05 and sel[0, 0] > 5 * abs(sel[0, 1:]).max()
    rnd = res["random_init"]
    assert rnd["fingerprint"] != loaded.fingerprint and set(rnd["overlap"]) == set(res["overlap"])
    for key, frac in (("0.006", 0.006), ("0.1", 0.1), ("0.5", 0.5)):
        # every entry of both matrices against the hand computation on the run each was recorded into
        want = _hand_overlaps(tmp / "map" / "model", res["tasks"], frac)
        want_rnd = _hand_overlaps(tmp / "map" / "random_init", res["tasks"], frac)
        np.testing.assert_allclose(res["overlap"][key], want, rtol=1e-12)
        np.testing.assert_allclose(rnd["overlap"][key], want_rnd, rtol=1e-12)
    # the control is measured on the re-initialised copy: its own recording, its own (different) numbers
    assert open_run(tmp / "map" / "random_init").model_fingerprint == rnd["fingerprint"]
    assert not np.allclose(rnd["overlap"]["0.5"], res["overlap"]["0.5"])
    assert rnd["layer_counts"]["0.5"] != res["layer_counts"]["0.5"]
    saved = json.loads((tmp / "map" / "taskmap.json").read_text())
    assert saved["selectivity"] == res["selectivity"]


def _matched_z(res: dict, names: list[str], key: str) -> list[float]:
    """Per ordered pair (i, j), i != j: (|A_i ∩ A_j| - E) / sd under the layer-matched null (each site's overlap
    hypergeometric given both sets' per-site counts), from the map's own overlaps, baselines and counts."""
    counts = res["layer_counts"][key]
    width = 96  # MLP neurons per layer of the planted model
    zs = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            na = sum(counts[a].values())
            var = sum(counts[a][s] * (counts[b][s] / width) * (1 - counts[b][s] / width) * (width - counts[a][s])
                      / (width - 1) for s in counts[a])
            inter, expected = res["overlap"][key][i][j] * na, res["overlap_chance"]["matched"][key][i][j] * na
            zs.append((inter - expected) / math.sqrt(var))
    return zs


@pytest.mark.parametrize("score", ["rand", "tied"])
def test_rand_control_and_tied_scores_overlap_at_layer_matched_chance(corpora, monkeypatch, score):
    """The rand control picks each task's neurons independently, and so does a score that ties every neuron
    (ties are broken at random per task): overlaps at the layer-matched chance baseline within sampling error, on
    the model and on its random-init copy, drawn differently on each."""
    from neurospec.score import SCORERS

    monkeypatch.setitem(SCORERS, "tied", lambda f, r, eps, g: torch.ones_like(f["mean"], dtype=torch.float64))
    tasks, tmp = corpora
    loaded = planted_model()
    names = ["quack", "plain", "other"]
    res = task_map(loaded, [tasks[n] for n in names], tmp / "map", record_cfg=RC,
                   cfg=TaskMapConfig(score=score, fractions=(0.25, 0.5), select_frac=0.02))
    for key in ("0.25", "0.5"):
        for r in (res, res["random_init"]):
            z = _matched_z(r, names, key)
            assert max(abs(v) for v in z) < 4, z
    assert res["layer_counts"]["0.5"] != res["random_init"]["layer_counts"]["0.5"]


def test_task_masks_recompute_the_maps_sets(corpora):
    """The sets recomputed from a task-map directory are the map's own (rand control included: same seeds per
    model and task); a map written with the version-1 selection rule says that its sets may differ."""
    from neurospec.analyze.overlap import overlap_matrix
    from neurospec.experiments.taskmap import task_masks

    tasks, tmp = corpora
    names = ["quack", "plain", "other"]
    res = task_map(planted_model(), [tasks[n] for n in names], tmp / "map", record_cfg=RC,
                   cfg=TaskMapConfig(score="rand", fractions=(0.3,), select_frac=0.3, random_init=False))
    masks, tm = task_masks(tmp / "map")
    assert tm["config"]["version"] == 2
    ov, _, _ = overlap_matrix([masks[t] for t in names])
    np.testing.assert_allclose(ov, res["overlap"]["0.3"], rtol=1e-12)
    assert {t: {s: int(m.sum()) for s, m in masks[t].items()} for t in names} == res["layer_counts"]["0.3"]
    path = tmp / "map" / "taskmap.json"
    old = json.loads(path.read_text())
    old["config"]["version"] = 1
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="version 1: its sets broke ties by layer order"):
        task_masks(tmp / "map")


def test_bad_inputs(corpora):
    tasks, tmp = corpora
    loaded = planted_model()
    with pytest.raises(TaskError, match="at least two"):
        task_map(loaded, [tasks["quack"]], tmp / "m", record_cfg=RC)
    with pytest.raises(TaskError, match="more than once"):
        task_map(loaded, [tasks["quack"], tasks["quack"]], tmp / "m", record_cfg=RC)
    with pytest.raises(NeurospecError, match="also a retain task"):
        selective_pruning(loaded, tasks["quack"], [tasks["plain"], tasks["quack"]], tmp / "p", record_cfg=RC)
    for bad in (dict(frac=1.5), dict(frac=0.0, attn_frac=0.0), dict(frac=0.5, steps=3), dict(mode="x")):
        with pytest.raises(NeurospecError):
            PruneConfig(**bad)
    with pytest.raises(NeurospecError, match=r"\(0, 1\]"):
        TaskMapConfig(fractions=(0.0,))


@pytest.mark.parametrize("stop", [0.0, 0.1, 0.25, 0.4, 0.49])
def test_normalised_area_reads_the_same_wherever_the_curve_stops(stop):
    # both tasks fall at the same rate (retain keeps the share of accuracy forget keeps): 1, at any stop
    f = [0.5, 0.45, 0.3, stop] if stop < 0.3 else [0.5, 0.45, stop]
    assert normalised_area(f, [0.4 * x / 0.5 for x in f]) == pytest.approx(1.0)
    # only the forget task falls: 2
    assert normalised_area(f, [0.4] * len(f)) == pytest.approx(2.0)


def test_normalised_area_by_hand():
    # F: 0.5 -> 0.4 -> 0.25, R: 0.4 -> 0.38 -> 0.3 (above the diagonal: forget falls faster)
    a = 0.1 * (0.4 + 0.38) / 2 + 0.15 * (0.38 + 0.3) / 2  # trapezoids over [0.25, 0.5]
    d = 0.4 * (0.5**2 - 0.25**2) / (2 * 0.5)  # the diagonal y = 0.8 x over the same range
    t = 0.4 * 0.25  # y = 0.4 over it
    got = normalised_area([0.5, 0.4, 0.25], [0.4, 0.38, 0.3])
    assert got == pytest.approx(1 + (a - d) / (t - d)) and 1 < got < 2
    # the retain task falls faster: below 1
    assert normalised_area([0.5, 0.4, 0.25], [0.4, 0.2, 0.1]) < 1
    # run to forget accuracy 0 it is the area over 0.5 * F0 * R0
    assert normalised_area([0.5, 0.2, 0.0], [0.4, 0.3, 0.1]) == pytest.approx(
        (0.3 * 0.7 / 2 + 0.2 * 0.4 / 2) / (0.5 * 0.5 * 0.4))
    # a step where forget accuracy comes back is walked back along the curve: a detour on the diagonal is still 1
    assert normalised_area([0.5, 0.3, 0.35, 0.2], [0.4, 0.24, 0.28, 0.16]) == pytest.approx(1.0)
    # nothing to compare on: forget accuracy did not fall, or no accuracy to start with
    for f, r in (([0.5, 0.5], [0.4, 0.3]), ([0.5, 0.6], [0.4, 0.4]), ([0.0, 0.0], [0.4, 0.3]), ([0.5], [0.4])):
        assert math.isnan(normalised_area(f, r))
    with pytest.raises(NeurospecError, match="forget and 1 retain"):
        normalised_area([0.5, 0.2], [0.4])


def test_select_global_per_site_and_whole_heads():
    from neurospec.models.sites import find_sites
    from neurospec.score.selection import select

    from tiny import tiny_model

    sites = find_sites(tiny_model("llama"))
    g = torch.Generator().manual_seed(0)
    scores = {s.name: torch.rand(s.width, generator=g, dtype=torch.float64) for s in sites}
    mlp = [s.name for s in sites.of_kind("mlp")]
    attn = [s.name for s in sites.of_kind("attn")]
    # global: the top floor(0.1 * 192) MLP neurons over both layers at once
    ns = select(scores, 0.1, 0.0, "global", sites=sites)
    flat = sorted(((float(scores[s][i]), s, i) for s in mlp for i in range(96)), reverse=True)[:19]
    assert set(ns.to_ids()) == {f"{s}:{i}" for _, s, i in flat}
    # per site: floor(0.1 * 96) = 9 in each layer
    ns = select(scores, 0.1, 0.0, "per_site", sites=sites)
    assert ns.count_by_site() == {mlp[0]: 9, mlp[1]: 9}
    for s in mlp:
        assert set(ns.indices(s).tolist()) == set(torch.topk(scores[s], 9).indices.tolist())
    # whole heads: 2 of the 8 heads (4 per layer, d_head 16), ranked by the mean of their neurons' scores
    ns = select(scores, 0.0, 0.25, "global", sites=sites, heads="mean")
    head_means = sorted(((float(scores[s].view(4, 16)[h].mean()), s, h) for s in attn for h in range(4)), reverse=True)
    want = {f"{s}:{h * 16 + j}" for _, s, h in head_means[:2] for j in range(16)}
    assert set(ns.to_ids()) == want and len(ns) == 32
