"""Predictivity against a randomly initialised copy: the comparison equals scipy, the pipeline's key, direction."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from neurospec.data.labelled import make_labelled
from neurospec.experiments.skills import RANDOM_DIR, SkillsConfig, run_skills
from neurospec.models.loading import from_module, random_init_copy
from neurospec.skills.baseline import compare_with_random
from neurospec.skills.predictivity import select_top_p
from neurospec.skills.soft import SoftPromptConfig

from tiny import char_tokenizer, tiny_model


def test_comparison_equals_scipy_and_brute_force_means():
    g = torch.Generator().manual_seed(0)
    real = {"a": 0.5 + 0.5 * torch.rand(40, generator=g), "b": 0.5 + 0.5 * torch.rand(60, generator=g)}
    rand = {"a": 0.5 + 0.2 * torch.rand(40, generator=g), "b": 0.5 + 0.2 * torch.rand(60, generator=g)}
    res = compare_with_random(real, rand, 0.1, key="t")
    for s in ("a", "b"):
        top = np.sort(real[s].numpy())[::-1][: round(0.1 * real[s].numel())]
        rtop = np.sort(rand[s].numpy())[::-1][: round(0.1 * rand[s].numel())]
        row = res["sites"][s]
        assert row["mean"] == pytest.approx(float(real[s].double().mean()))
        assert row["random_mean"] == pytest.approx(float(rand[s].double().mean()))
        assert row["top_mean"] == pytest.approx(top.mean()) and row["random_top_mean"] == pytest.approx(rtop.mean())
        ref = mannwhitneyu(top, rtop, alternative="greater")
        assert row["u"] == pytest.approx(ref.statistic) and row["pvalue"] == pytest.approx(ref.pvalue)
        assert row["n_top"] == len(top)
    allr, allq = (np.concatenate([d[s][select_top_p(d, 0.1, key="t")[s]].numpy() for s in d]) for d in (real, rand))
    assert res["all"]["pvalue"] == pytest.approx(mannwhitneyu(allr, allq, alternative="greater").pvalue)
    # planted: the model's top neurons all beat the copy's, so the one-sided test is significant; reversed, it is not
    assert res["all"]["pvalue"] < 1e-3
    assert compare_with_random(rand, real, 0.1, key="t")["all"]["pvalue"] > 0.99


def _task():
    texts = [f"apple {i} {'x' * (i % 3)}" for i in range(12)] + [f"zebra {i} {'y' * (i % 3)}" for i in range(12)]
    return make_labelled("toy", texts, ["a"] * 12 + ["z"] * 12, seed=0)


def test_random_baseline_in_the_pipeline_silent_mlp_against_its_random_copy(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # planted: every MLP neuron is 0 for every input, so its predictivity is exactly 0.5
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.zero_()
    loaded = from_module(model, char_tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SkillsConfig(prompt="soft", soft=SoftPromptConfig(length=4, epochs=1, batch_size=8), p=0.1, ps=(0.1,),
                       methods=("zero",), random_baseline=True, random_seed=3, batch_size=8)
    res = run_skills(loaded, [_task()], tmp_path, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rb = res["random_baseline"]
    assert rb["seed"] == 3 and rb["p"] == 0.1 and set(rb["tasks"]) == {"toy"}
    tr = rb["tasks"]["toy"]
    assert set(tr["sites"]) == {"layers.0.mlp", "layers.1.mlp"} and tr["accuracy"][0]["prompt"] == "soft"
    for row in [*tr["sites"].values(), tr["all"]]:
        assert row["mean"] == 0.5 and row["top_mean"] == 0.5
        assert row["random_top_mean"] > 0.5 and row["pvalue"] > 0.5  # the copy's neurons are not silent
    # the copy trained its own soft prompt and its scores are saved beside the model's
    assert (tmp_path / RANDOM_DIR / "prompts" / "toy" / "seed0" / "adapter_model.safetensors").is_file()
    assert (tmp_path / RANDOM_DIR / "scores" / "toy.safetensors").is_file()
    for key in ("tasks", "predictivity", "skill_neurons", "perturbation", "similarity"):
        assert key in res


def test_random_copy_has_other_weights_and_leaves_the_model_alone():
    loaded = from_module(tiny_model("bert", head=False), char_tokenizer())
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    a, b = random_init_copy(loaded, seed=1), random_init_copy(loaded, seed=1)
    w = "encoder.layer.0.intermediate.dense.weight"
    assert not torch.allclose(a.model.state_dict()[w], before[w])
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
