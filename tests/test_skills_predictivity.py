"""Skill predictivity from streaming statistics equals the brute-force computation on the full activations."""

import numpy as np
import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.models.loading import from_module
from neurospec.skills.collect import prompt_statistics
from neurospec.skills.predictivity import (
    ExceedCounts,
    PromptMeans,
    aggregate,
    predictivity,
    random_same_counts,
    select_top_p,
    task_scores,
)
from neurospec.skills.prompting import PromptedModel, capture, hard_prompt, verbaliser_ids

from tiny import char_tokenizer, tiny_model


def _task(n_classes, per_class=10, seed=0):
    words = ["apple pie", "zebra zoo", "quick fox", "moon rock"][:n_classes]
    texts, labels = [], []
    for c, w in enumerate(words):
        for i in range(per_class):
            texts.append(f"{w} {i} {'x' * (i % 4)}")
            labels.append(f"class{c}")
    return make_labelled("toy", texts, labels, seed=seed)


def _loaded(family="llama"):
    return from_module(tiny_model(family), char_tokenizer())


def _brute_force(pm, task, prompt, sites):
    acts = {split: {s.name: [] for s in sites} for split in ("train", "dev")}
    for split in acts:
        items, _ = task.split(split)
        with torch.no_grad(), capture(pm.loaded.model, sites, lambda: pm.current_positions,
                                      lambda name, x, _s=split: acts[_s][name].append(x.double())):
            for i in range(0, len(items), 3):  # another batch size than the streaming pass
                pm.run_body(items[i : i + 3], prompt)
    _, y = task.split("dev")
    out = {}
    for s in sites:
        train = torch.cat(acts["train"][s.name])  # [N, P, W]
        dev = torch.cat(acts["dev"][s.name])
        above = dev > train.mean(0)
        if task.n_classes == 2:
            label = torch.as_tensor(y == 1)[:, None, None]
            acc = (above == label).double().mean(0)[None]  # mean over dev of 1[(a > a_bsl) == label]
        else:
            accs = []
            for c in range(task.n_classes):
                pos = torch.as_tensor(y == c)
                # balanced one-vs-rest: each rest example weighs n_pos / n_rest
                w = torch.where(pos, 1.0, pos.sum() / (~pos).sum()).double()
                hit = (above == pos[:, None, None]).double()
                accs.append((w[:, None, None] * hit).sum(0) / w.sum())
            acc = torch.stack(accs)
        out[s.name] = torch.maximum(acc, 1 - acc).amax(1)
    return out


@pytest.mark.parametrize("family,n_classes,kind", [("llama", 2, "mlp"), ("llama", 3, "mlp"), ("bert", 3, "mlp"),
                                                   ("llama", 2, "attn"), ("bert", 3, "attn")])
def test_streaming_predictivity_matches_brute_force(family, n_classes, kind):
    loaded = _loaded(family)
    task = _task(n_classes)
    pm = PromptedModel(loaded, n_classes, readout="lm",
                       verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "b", "c"][:n_classes], decoder=False))
    if loaded.head == "masked-lm":
        loaded.tokenizer.add_special_tokens({"mask_token": "[EOS]"})
    prompt = hard_prompt(loaded, "cls:")
    sites = loaded.sites.of_kind(kind)
    counts = prompt_statistics(pm, task, prompt, sites, batch_size=4)
    ref = _brute_force(pm, task, prompt, sites)
    for s in sites:
        got = predictivity(counts[s.name].compute()["accuracy"])
        assert got.shape == (1 if n_classes == 2 else n_classes, s.width)
        torch.testing.assert_close(got, ref[s.name], rtol=0, atol=1e-12)
        assert got.max() > 0.6  # something is predictive on this easy toy task


def test_accumulators_merge_like_one_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 5, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    a, b, whole = PromptMeans(3, 5), PromptMeans(3, 5), PromptMeans(3, 5)
    a.update(x[:4]); b.update(x[4:]); whole.update(x)  # noqa: E702
    torch.testing.assert_close(a.merge(b).compute()["mean"], x.double().mean(0))
    base = whole.compute()["mean"]
    c, d, e = (ExceedCounts(3, 3, 5, base) for _ in range(3))
    c.update(x[:6], y[:6]); d.update(x[6:], y[6:]); e.update(x, y)  # noqa: E702
    assert torch.equal(c.merge(d).state_dict()["above"], e.state_dict()["above"])
    with pytest.raises(ValueError, match="baseline"):
        ExceedCounts(3, 3, 5, base + 1).merge(e)


def test_aggregate_selection_and_random_sets():
    runs = [torch.tensor([0.5, 0.9, 0.7]), torch.tensor([0.8, 0.6, 0.7])]
    assert torch.allclose(aggregate(runs, "mean"), torch.tensor([0.65, 0.75, 0.7]))
    assert torch.allclose(aggregate(runs, "min"), torch.tensor([0.5, 0.6, 0.7]))
    assert torch.equal(task_scores(torch.tensor([[0.5, 0.9], [0.7, 0.6]]), "max"), torch.tensor([0.7, 0.9]))
    scores = {"layers.0.mlp": torch.arange(100.0), "layers.1.mlp": -torch.arange(50.0)}
    top = select_top_p(scores, 0.1, key="t")
    assert top["layers.0.mlp"].tolist() == list(range(90, 100)) and top["layers.1.mlp"].tolist() == [0, 1, 2, 3, 4]
    tied = select_top_p({"layers.0.mlp": torch.zeros(100)}, 0.2, key="t")["layers.0.mlp"]
    assert torch.equal(tied, select_top_p({"layers.0.mlp": torch.zeros(100)}, 0.2, key="t")["layers.0.mlp"])
    assert not torch.equal(tied, select_top_p({"layers.0.mlp": torch.zeros(100)}, 0.2, key="u")["layers.0.mlp"])
    r = random_same_counts({"layers.0.mlp": (7, 100), "layers.1.mlp": (3, 50)}, key="k")
    assert [len(v) for v in r.values()] == [7, 3] and len(set(r["layers.0.mlp"].tolist())) == 7
    assert np.array_equal(r["layers.0.mlp"], random_same_counts({"layers.0.mlp": (7, 100)}, key="k")["layers.0.mlp"])
