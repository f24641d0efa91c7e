"""The perturbation study: stacked sets equal sets run one at a time, balanced example caps, progress, cost."""

import numpy as np
import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.errors import NeurospecError
from neurospec.models.loading import from_module
from neurospec.skills.perturb import (
    balanced_subset,
    by_length,
    perturbation_cost,
    perturbation_study,
    perturbed,
    stacked_accuracy,
)
from neurospec.skills.predictivity import random_same_counts, seed_of, select_top_p
from neurospec.skills.prompting import PromptedModel, hard_prompt, verbaliser_ids

from tiny import char_tokenizer, tiny_model


def _setup(family="llama"):
    loaded = from_module(tiny_model(family), char_tokenizer())
    pm = PromptedModel(loaded, 2, verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "z"], decoder=family != "bert"))
    texts = [f"apple {i} {'x' * (i % 5)}" for i in range(12)] + [f"zebra {i} {'yy' * (i % 4)}" for i in range(12)]
    task = make_labelled("toy", texts, ["a"] * 12 + ["z"] * 12, seed=0)
    scores = {s.name: torch.rand(s.width, generator=torch.Generator().manual_seed(s.layer))
              for s in loaded.sites.of_kind("mlp")}
    return loaded, pm, task, scores, hard_prompt(loaded, "L:")


@pytest.mark.parametrize("method", ["noise", "zero"])
def test_stacked_sets_give_the_accuracies_of_one_set_at_a_time(method):
    loaded, pm, task, scores, prompt = _setup()
    items, labels = task.split("train")
    counts = {s: (int(v.numel()), int(scores[s].numel())) for s, v in select_top_p(scores, 0.3).items()}
    sets = [random_same_counts(counts, key=str(r)) for r in range(3)]
    sites = loaded.sites.by_name
    one, logits = [], []
    for s in sets:
        with perturbed(loaded.model, sites, s, method, std=2.0, seed=7), torch.no_grad():
            one.append(pm.accuracy(items, labels, prompt, 5))
            logits.append(torch.cat([pm.logits(items[i : i + 5], prompt) for i in range(0, 10, 5)]))
    with perturbed(loaded.model, sites, sets, method, std=2.0, seed=7), torch.no_grad():
        stacked = stacked_accuracy(pm, items, labels, prompt, 3, 5)
        rows = torch.cat([pm.logits(list(items[i : i + 5]) * 3, prompt).view(3, 5, -1) for i in range(0, 10, 5)], 1)
    assert stacked == pytest.approx(one, abs=1e-12)
    # each stacked copy gets its own set and the draws a set gets alone (batch by batch)
    torch.testing.assert_close(rows, torch.stack(logits), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        clean = pm.logits(items[:5], prompt)
    assert all(not torch.allclose(rows[k, :5], clean) for k in range(3))
    assert not torch.allclose(rows[0], rows[1])
    bad = [sets[0], {n: v[:-1] for n, v in sets[1].items()}]
    with pytest.raises(NeurospecError, match="same number"), perturbed(loaded.model, sites, bad, method):
        pass


def test_study_rows_do_not_depend_on_stacking_and_report_progress():
    loaded, pm, task, scores, prompt = _setup()
    items, labels = task.split("train")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calls = []
    kw = dict(methods=["zero", "noise"], n_random=20, key="t", batch_size=6, std=1.0)
    a = perturbation_study(pm, items, labels, prompt, scores, [0.2], sets_per_forward=1, **kw)
    b = perturbation_study(pm, items, labels, prompt, scores, [0.2], sets_per_forward=8,
                           progress=lambda *x: calls.append(x), **kw)
    assert a == b
    assert calls[-1][1:] == (42, 42) and [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert {r["n_examples"] for r in a} == {len(labels)}
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    # brute force of one row: the skill set and every random set perturbed alone, with the same seed
    sites = loaded.sites.by_name
    skill = select_top_p(scores, 0.2, key="t")
    counts = {s: (int(v.numel()), int(scores[s].numel())) for s, v in skill.items()}
    seed = seed_of("perturb", "t", 0.2, "zero")
    accs = []
    for s in [skill] + [random_same_counts(counts, key=f"t|0.2|{r}") for r in range(20)]:
        with perturbed(loaded.model, sites, s, "zero", seed=seed):
            accs.append(pm.accuracy(items, labels, prompt, 6))
    assert a[0]["skill_acc"] == pytest.approx(accs[0]) and a[0]["random_acc_mean"] == pytest.approx(np.mean(accs[1:]))


def test_balanced_subset_and_cap_in_the_study():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 12)
    idx = balanced_subset(labels, 10, key="k")
    assert np.bincount(labels[idx]).tolist() == [10, 7, 10] and len(set(idx.tolist())) == 27
    assert np.array_equal(idx, balanced_subset(labels, 10, key="k"))
    assert not np.array_equal(idx, balanced_subset(labels, 10, key="other"))
    assert np.array_equal(balanced_subset(labels, None), np.arange(len(labels)))
    with pytest.raises(NeurospecError, match="positive"):
        balanced_subset(labels, -1)
    loaded, pm, task, scores, prompt = _setup()
    items, labels = task.split("train")
    rows = perturbation_study(pm, items, labels, prompt, scores, [0.2], methods=["zero"], n_random=20, per_class=3)
    assert rows[0]["n_examples"] == 6
    assert perturbation_cost(100, [0.02, 0.05, 0.1, 0.2], ["noise", "zero"], 20) == 100 * (1 + 4 * 2 * 21)


def test_noise_sweep_methods_use_their_own_std():
    """``noise:STD`` perturbs with that std (a sweep next to the default ``noise``): the row of ``noise:1`` equals
    a brute-force accuracy under std 1, and its std is in the row; bad sweep points are clear errors."""
    loaded, pm, task, scores, prompt = _setup()
    items, labels = task.split("train")
    rows = perturbation_study(pm, items, labels, prompt, scores, [0.2], methods=["noise", "noise:1", "noise:40"],
                              n_random=20, key="t", batch_size=6, std=0.1)
    assert [(r["method"], r["std"]) for r in rows] == [("noise", 0.1), ("noise:1", 1.0), ("noise:40", 40.0)]
    skill = select_top_p(scores, 0.2, key="t")
    order = by_length(pm, items)  # the study's order of the examples (the noise is drawn batch by batch)
    items, labels = [items[int(i)] for i in order], np.asarray(labels)[order]
    for row, sd in ((rows[1], 1.0), (rows[2], 40.0)):
        with perturbed(loaded.model, loaded.sites.by_name, skill, "noise", std=sd,
                       seed=seed_of("perturb", "t", 0.2, row["method"])):
            assert row["skill_acc"] == pytest.approx(pm.accuracy(items, labels, prompt, 6))
    assert rows[2]["random_acc_mean"] != rows[0]["random_acc_mean"]  # std 40 moves the random sets' accuracy
    for bad in ("noise:-1", "noise:x", "zero:1", "blur"):
        with pytest.raises(NeurospecError, match="noise:"):
            perturbation_study(pm, items, labels, prompt, scores, [0.2], methods=[bad], n_random=20)
