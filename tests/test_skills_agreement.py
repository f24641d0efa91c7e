"""Agreement of skill neurons with selective-pruning neurons: class statistics and scores against brute force,
the layer-matched chance level and the hypergeometric p-value against exhaustive enumeration."""

import itertools

import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.models.loading import from_module
from neurospec.score.selective import DEFAULT_EPS
from neurospec.skills.agreement import class_statistics, overlap_test, selective_scores
from neurospec.skills.prompting import PromptedModel, capture, hard_prompt, verbaliser_ids

from tiny import char_tokenizer, tiny_model


def test_class_statistics_and_selective_scores_match_brute_force():
    words = ["apple pie", "zebra zoo", "quick fox"]
    texts = [f"{w} {i} {'x' * (i % 4)}" for w in words for i in range(10)]
    task = make_labelled("toy3", texts, [f"c{k}" for k in range(3) for _ in range(10)], seed=0)
    loaded = from_module(tiny_model("llama"), char_tokenizer())
    pm = PromptedModel(loaded, 3, verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "b", "c"], decoder=True))
    prompt = hard_prompt(loaded, "L:")
    sites = loaded.sites.of_kind("mlp")
    stats = class_statistics(pm, task, prompt, sites, batch_size=4)
    items, labels = task.split("train")
    acts = {s.name: [] for s in sites}
    with torch.no_grad(), capture(loaded.model, sites, lambda: pm.current_positions,
                                  lambda n, x: acts[n].append(x.double())):
        for t in items:
            pm.run_body([t], prompt)
    scores = selective_scores(stats, "abs", task="toy3")
    y = torch.as_tensor(labels)
    for s in sites:
        a = torch.cat(acts[s.name])  # [N, P, W]
        per_class = [a[y == c].reshape(-1, s.width).abs().mean(0) for c in range(3)]
        for c in range(3):
            torch.testing.assert_close(stats[c][s.name].compute()["mean_abs"], per_class[c], rtol=1e-6, atol=1e-9)
        ref = torch.stack([per_class[c] / (a[y != c].reshape(-1, s.width).abs().mean(0) + DEFAULT_EPS["mlp"])
                           for c in range(3)]).amax(0)
        torch.testing.assert_close(scores[s.name], ref, rtol=1e-6, atol=1e-9)


def test_overlap_chance_and_pvalue_equal_exhaustive_enumeration():
    widths = {"layers.0.mlp": 6, "layers.1.mlp": 5}
    a = {"layers.0.mlp": torch.tensor([0, 1]), "layers.1.mlp": torch.tensor([0, 2, 4])}
    K = {"layers.0.mlp": 3, "layers.1.mlp": 2}
    overlaps = []
    for b0 in itertools.combinations(range(6), K["layers.0.mlp"]):
        for b1 in itertools.combinations(range(5), K["layers.1.mlp"]):
            overlaps.append(len({0, 1} & set(b0)) + len({0, 2, 4} & set(b1)))
    n = 5
    for b in ({"layers.0.mlp": torch.tensor([0, 1, 5]), "layers.1.mlp": torch.tensor([2, 4])},
              {"layers.0.mlp": torch.tensor([0, 3, 5]), "layers.1.mlp": torch.tensor([1, 3])}):
        res = overlap_test(a, b, widths)
        obs = sum(len(set(a[s].tolist()) & set(b[s].tolist())) for s in a)
        assert res["n_common"] == obs and res["n"] == n and res["overlap"] == pytest.approx(obs / n)
        assert res["chance"] == pytest.approx(sum(overlaps) / len(overlaps) / n)
        assert res["pvalue"] == pytest.approx(sum(o >= obs for o in overlaps) / len(overlaps))
