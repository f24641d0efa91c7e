"""Skill neurons beyond prompt tuning: LoRA / attention-bias tuning on a copy, MLP frozen, perturbation hooks on
the adapted model, the caller's model unchanged."""

import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.errors import NeurospecError
from neurospec.models.loading import from_module
from neurospec.skills.perturb import perturbation_study, perturbed
from neurospec.skills.prompting import PromptedModel, hard_prompt, verbaliser_ids
from neurospec.skills.tuning import TuningConfig, attention_modules, tune_model

from tiny import char_tokenizer, tiny_model


def _task(per_class=10):
    texts = [f"apple {i} {'x' * (i % 3)}" for i in range(per_class)] + [f"zebra {i} {'y' * (i % 3)}" for i in range(per_class)]
    return make_labelled("toy", texts, ["a"] * per_class + ["z"] * per_class, seed=0)


def _setup(family):
    loaded = from_module(tiny_model(family), char_tokenizer())
    pm = PromptedModel(loaded, 2, verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "z"], decoder=True))
    return loaded, pm, hard_prompt(loaded, "L:")


@pytest.mark.parametrize("family,method", [("llama", "lora"), ("gpt2", "bias")])
def test_tuning_adapts_attention_only_on_a_copy_and_hooks_act_on_it(family, method):
    loaded, pm, prompt = _setup(family)
    task = _task()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tuned = tune_model(pm, task, prompt, config=TuningConfig(method=method, epochs=2, lr=0.01, batch_size=6))
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert set(loaded.model.state_dict()) == set(before)
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert tuned.trained and all(("lora_" in n) if method == "lora" else n.endswith(".bias") for n in tuned.trained)
    attn = set(attention_modules(loaded))
    after = tuned.loaded.model.state_dict()
    assert set(after) == set(before)  # LoRA merged back: a plain model with the same parameters
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[0] in attn for k in changed)  # only attention projections moved
    texts, labels = task.split("test")
    with torch.no_grad():
        base_logits = pm.logits(texts, prompt)
        adapted = tuned.pm.logits(texts, prompt)
        assert not torch.allclose(base_logits, adapted)
        site = "layers.1.mlp"
        with perturbed(tuned.loaded.model, tuned.loaded.sites.by_name, {site: torch.arange(48)}, "zero"):
            hit = tuned.pm.logits(texts, prompt)
            torch.testing.assert_close(pm.logits(texts, prompt), base_logits)  # no hook on the caller's model
        assert not torch.allclose(hit, adapted)
    scores = {s.name: torch.rand(s.width, generator=torch.Generator().manual_seed(s.layer))
              for s in loaded.sites.of_kind("mlp")}
    rows = perturbation_study(tuned.pm, texts, labels, prompt, scores, [0.2], methods=["zero"], key="t")
    assert rows[0]["base_acc"] == tuned.pm.accuracy(texts, labels, prompt)


def test_bias_tuning_without_attention_bias_is_a_clear_error():
    loaded, pm, prompt = _setup("llama")
    with pytest.raises(NeurospecError, match="no bias to tune.*lora"):
        tune_model(pm, _task(), prompt, config=TuningConfig(method="bias", epochs=1))
    with pytest.raises(NeurospecError, match="tuning method must be one of"):
        TuningConfig(method="full")
