"""Prompt layouts and readouts, perturbation hooks, p-values, similarity, and soft-prompt training."""

import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.errors import NeurospecError
from neurospec.models.loading import from_module
from neurospec.skills.collect import prompt_statistics
from neurospec.skills.perturb import perturbation_study, perturbed, pvalue, similarity
from neurospec.skills.predictivity import random_same_counts
from neurospec.skills.prompting import PromptedModel, capture, hard_prompt, verbaliser_ids
from neurospec.skills.soft import SoftPromptConfig, train_soft_prompt

from tiny import char_tokenizer, tiny_model


def _task(per_class=10):
    texts = [f"apple {i} {'x' * (i % 3)}" for i in range(per_class)] + [f"zebra {i} {'y' * (i % 3)}" for i in range(per_class)]
    return make_labelled("toy", texts, ["a"] * per_class + ["z"] * per_class, seed=0)


def _lm(family="llama"):
    loaded = from_module(tiny_model(family), char_tokenizer())
    pm = PromptedModel(loaded, 2, verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "z"], decoder=True))
    return loaded, pm


def test_verbaliser_word_of_several_tokens_is_a_clear_error():
    tok = char_tokenizer()
    with pytest.raises(NeurospecError, match=r"'yes' is not a single token.*\['y', 'e', 's'\].*--verbaliser"):
        verbaliser_ids(tok, ["a", "yes"], decoder=False)
    with pytest.raises(NeurospecError, match="share a token"):
        verbaliser_ids(tok, ["a", "a"], decoder=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and absolute positions
def test_decoder_layout_left_padded_batch_equals_each_example_alone(family):
    loaded, pm = _lm(family)
    assert pm.readout == "lm" and pm.decoder
    prompt = hard_prompt(loaded, "Label:")
    texts = ["a short one", "a much longer sentence here", "mid size"]
    with torch.no_grad():
        batched = pm.logits(texts, prompt)
        alone = torch.cat([pm.logits([t], prompt) for t in texts])
        full = loaded.model(input_ids=torch.tensor([loaded.tokenizer(texts[1])["input_ids"] +
                                                    loaded.tokenizer("Label:")["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[1], full[pm.verbaliser], rtol=1e-4, atol=1e-5)
    _, positions, read = pm.inputs(texts, prompt)
    assert positions.tolist() == list(range(read - 5, read + 1))  # the prompt's 6 characters end the sequence


def test_encoder_without_lm_head_uses_a_linear_probe_and_vit_its_own_head():
    loaded = from_module(tiny_model("bert", head=False), char_tokenizer())
    pm = PromptedModel(loaded, 2)
    assert pm.readout == "probe"
    task = _task()
    prompt = hard_prompt(loaded, "topic")
    with pytest.raises(NeurospecError, match="fit_probe"):
        pm.logits(["x"], prompt)
    items, labels = task.split("train")
    pm.fit_probe(items, labels, prompt)
    assert pm.accuracy(items, labels, prompt) >= 0.9
    vit = from_module(tiny_model("vit"))
    images = make_labelled("img", torch.rand(40, 1, 8, 8), [k % 10 for k in range(40)], per_class=4,
                           classes=[str(k) for k in range(10)], min_per_split=1)
    pv = PromptedModel(vit, 10)
    assert pv.readout == "model-head"
    counts = prompt_statistics(pv, images, None, vit.sites.of_kind("mlp"), batch_size=8)
    assert counts["layers.0.mlp"].compute()["accuracy"].shape == (10, 1, 96)


def test_perturbation_hooks_noise_per_example_and_zero_and_model_unchanged():
    loaded, pm = _lm()
    sites = loaded.sites.by_name
    site = sites["layers.1.mlp"]
    prompt = hard_prompt(loaded, "L:")
    texts = ["abc", "defgh"]
    idx = torch.tensor([3, 10, 50])
    grabbed = {}

    def run(key):
        with capture(loaded.model, [site], lambda: torch.arange(pm.inputs(texts, prompt)[0]["inputs_embeds"].shape[1]),
                     lambda n, x: grabbed.__setitem__(key, x)), torch.no_grad():
            pm.logits(texts, prompt)

    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    run("clean")
    # run() registers its capture hook after the perturbation hook, so it sees the perturbed input
    with perturbed(loaded.model, sites, {"layers.1.mlp": idx}, "noise", std=0.1, seed=1):
        run("noise")
    with perturbed(loaded.model, sites, {"layers.1.mlp": idx}, "zero"):
        run("zero")
    diff = grabbed["noise"] - grabbed["clean"]
    others = torch.ones(site.width, dtype=torch.bool)
    others[idx] = False
    assert diff[..., others].abs().max() == 0
    # one noise vector per example, the same at every position of that example
    torch.testing.assert_close(diff[:, :, idx], diff[:, :1, idx].expand_as(diff[:, :, idx]))
    assert not torch.allclose(diff[0, 0, idx], diff[1, 0, idx])
    assert grabbed["zero"][..., idx].abs().max() == 0
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    run("after")
    torch.testing.assert_close(grabbed["after"], grabbed["clean"])


def test_pvalue_and_similarity_chance_level():
    assert pvalue(0.5, [0.4] * 5 + [0.6] * 15) == pytest.approx(6 / 21)
    assert pvalue(0.5, [0.5] + [0.9] * 19) == pytest.approx(2 / 21)  # a tie counts against the skill set
    counts = {"layers.0.mlp": (10, 40), "layers.1.mlp": (3, 60)}
    widths = {s: w for s, (_, w) in counts.items()}
    a = random_same_counts(counts, key="a")
    res = similarity({"a": a, "b": random_same_counts(counts, key="b")}, widths)
    assert res["tasks"] == ["a", "b"] and res["overlap"][0][0] == 1.0
    assert res["chance"] == pytest.approx((10 * 10 / 40 + 3 * 3 / 60) / 13)
    # the chance level is the mean overlap of independent random same-count sets
    sims = [similarity({"x": a, "y": random_same_counts(counts, key=str(i))}, widths)["overlap"][0][1]
            for i in range(400)]
    assert sum(sims) / len(sims) == pytest.approx(res["chance"], abs=0.02)


def test_perturbation_study_rows():
    loaded, pm = _lm()
    task = _task(8)
    prompt = hard_prompt(loaded, "L:")
    scores = {s.name: torch.rand(s.width, generator=torch.Generator().manual_seed(s.layer))
              for s in loaded.sites.of_kind("mlp")}
    items, labels = task.split("test")
    with pytest.raises(NeurospecError, match="at least 20"):
        perturbation_study(pm, items, labels, prompt, scores, [0.1], n_random=5)
    rows = perturbation_study(pm, items, labels, prompt, scores, [0.0, 0.5], methods=["zero"], n_random=20, key="t")
    assert [(r["p"], r["method"], r["n_neurons"]) for r in rows] == [(0.5, "zero", 96)]
    assert rows[0]["pvalue"] in {k / 21 for k in range(1, 22)} and 0 <= rows[0]["random_acc_mean"] <= 1


def test_soft_prompt_trains_saves_and_is_reused(tmp_path):
    loaded, pm = _lm()
    task = _task(10)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = SoftPromptConfig(length=4, epochs=3, lr=0.01, batch_size=6)
    steps = []
    sp = train_soft_prompt(pm, task, seed=0, config=cfg, out=tmp_path / "p", progress=lambda *a: steps.append(a))
    assert not sp.reused and sp.prompt.vectors.shape == (4, 64)
    total = len(sp.losses)  # every optimiser step is reported, against the right total
    assert steps == [(f"soft prompt {task.name} seed 0", k, total) for k in range(1, total + 1)] and total > 3
    first, last = sum(sp.losses[:2]) / 2, sum(sp.losses[-2:]) / 2
    assert last < first
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert all(p.requires_grad for p in loaded.model.parameters()) and all(
        p.grad is None for p in loaded.model.parameters())
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file() and (tmp_path / "p" / "adapter_config.json").is_file()
    again = train_soft_prompt(pm, task, seed=0, config=cfg, out=tmp_path / "p")
    assert again.reused and torch.equal(again.prompt.vectors, sp.prompt.vectors)
    other = train_soft_prompt(pm, task, seed=1, config=SoftPromptConfig(length=4, epochs=1, batch_size=12),
                              out=tmp_path / "p")
    assert not other.reused
