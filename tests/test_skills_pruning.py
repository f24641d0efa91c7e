"""Skill-based pruning: folded means equal a hooked computation and the formula, kept neurons counted once,
the caller's model untouched, the saved copy reloads with equal outputs, and the kept-fraction sweep."""

import pytest
import torch

from neurospec.data.labelled import make_labelled
from neurospec.intervene.ablate import ablated
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.linear import weight_out_in
from neurospec.models.loading import from_module, load_model
from neurospec.skills.prompting import PromptedModel, capture, hard_prompt, verbaliser_ids
from neurospec.skills.pruning import prune_model, pruning_study, pvalue_higher, save_pruned, token_means

from tiny import char_tokenizer, tiny_model


def _task(per_class=10):
    texts = [f"apple {i} {'x' * (i % 3)}" for i in range(per_class)] + [f"zebra {i} {'y' * (i % 3)}" for i in range(per_class)]
    return make_labelled("toy", texts, ["a"] * per_class + ["z"] * per_class, seed=0)


def _setup(family="llama"):
    loaded = from_module(tiny_model(family), char_tokenizer())
    pm = PromptedModel(loaded, 2, verbaliser=verbaliser_ids(loaded.tokenizer, ["a", "z"], decoder=True))
    return loaded, pm, hard_prompt(loaded, "L:")


def _keep(loaded, k=20):
    g = torch.Generator().manual_seed(3)
    return {s.name: torch.sort(torch.randperm(s.width, generator=g)[:k]).values for s in loaded.sites.of_kind("mlp")}


def test_token_means_equal_the_mean_over_non_padding_positions():
    loaded, pm, prompt = _setup()
    items, _ = _task().split("train")
    sites = loaded.sites.of_kind("mlp")
    means = token_means(pm, items, prompt, sites, batch_size=5)
    rows = {s.name: [] for s in sites}
    for t in items:  # one example at a time: no padding at all
        with torch.no_grad(), capture(loaded.model, sites, lambda _t=t: torch.arange(pm.inputs([_t], prompt)[1][-1] + 1),
                                      lambda n, x: rows[n].append(x[0].double())):
            pm.run_body([t], prompt)
    for s in sites:
        torch.testing.assert_close(means[s.name], torch.cat(rows[s.name]).mean(0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # no bias (config flag) and a Conv1D with a bias
def test_pruned_copy_equals_hooked_means_and_the_formula_without_double_counting(family):
    loaded, pm, prompt = _setup(family)
    items, _ = _task().split("train")
    sites = loaded.sites.of_kind("mlp")
    means = token_means(pm, items, prompt, sites)
    keep = _keep(loaded)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    pruned = prune_model(loaded, keep, means)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert set(loaded.model.state_dict()) == set(before)
    x = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    drop = {}
    for s in sites:
        m = torch.ones(s.width, dtype=torch.bool)
        m[keep[s.name]] = False
        drop[s.name] = m.nonzero().flatten()
    with torch.no_grad():
        got = pruned.model(input_ids=x).logits
        with ablated(loaded.model, loaded.sites, NeuronSet(drop, {s.name: s.width for s in sites}), "mean",
                     offsets=means, fold=False):
            hooked = loaded.model(input_ids=x).logits
    torch.testing.assert_close(got, hooked, rtol=1e-4, atol=1e-5)
    # brute force on layer 0 (its input is the same in both models): W (m*a + (1-m)*mu) + b
    site = sites[0]
    mod, new = loaded.model.get_submodule(site.module), pruned.model.get_submodule(site.module)
    seen = {}
    h1 = mod.register_forward_hook(lambda _m, a, _o: seen.__setitem__("a", a[0].double()))
    h2 = new.register_forward_hook(lambda _m, _a, o: seen.__setitem__("y", o.double()))
    with torch.no_grad():
        loaded.model(input_ids=x)
        pruned.model(input_ids=x)
    h1.remove()
    h2.remove()
    W = weight_out_in(mod).double()
    b = mod.bias.double() if mod.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    m = torch.zeros(site.width, dtype=torch.float64)
    m[keep[site.name]] = 1
    mu = means[site.name]
    expected = (m * seen["a"] + (1 - m) * mu) @ W.T + b
    torch.testing.assert_close(seen["y"], expected, rtol=1e-5, atol=1e-8)
    # the published script's bias (all neurons' means, kept ones counted twice) is far outside that tolerance
    double = seen["a"] * m @ W.T + b + W @ mu
    assert (seen["y"] - double).abs().max() > 100 * (seen["y"] - expected).abs().max() + 1e-5


def test_saved_pruned_model_reloads_with_equal_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded, pm, prompt = _setup()
    means = token_means(pm, _task().split("train")[0], prompt, loaded.sites.of_kind("mlp"))
    pruned = prune_model(loaded, _keep(loaded), means)
    save_pruned(pruned, tmp_path / "pruned")
    assert (tmp_path / "pruned" / "model.safetensors").is_file()
    back = load_model(str(tmp_path / "pruned"), device="cpu")
    x = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=x).logits, pruned.model(input_ids=x).logits)
        assert not torch.allclose(back.model(input_ids=x).logits, loaded.model(input_ids=x).logits)


def test_pruning_study_sweep_matches_the_pruned_copy():
    loaded, pm, prompt = _setup()
    task = _task(12)
    means = token_means(pm, task.split("train")[0], prompt, loaded.sites.of_kind("mlp"))
    scores = {s.name: torch.rand(s.width, generator=torch.Generator().manual_seed(s.layer))
              for s in loaded.sites.of_kind("mlp")}
    items, labels = task.split("test")
    rows = pruning_study(pm, items, labels, prompt, scores, means, [0.1, 1.0], n_random=20, key="t", batch_size=8)
    assert [(r["keep"], r["n_kept"]) for r in rows] == [(0.1, 20), (1.0, 192)]
    assert rows[1]["skill_acc"] == rows[1]["base_acc"] == rows[1]["random_acc_mean"]
    from neurospec.skills.predictivity import select_top_p

    copy_pm = PromptedModel(prune_model(loaded, select_top_p(scores, 0.1, key="t"), means), 2, verbaliser=pm.verbaliser.tolist())
    assert copy_pm.accuracy(items, labels, prompt, 8) == rows[0]["skill_acc"]
    assert pvalue_higher(0.5, [0.5] + [0.1] * 19) == pytest.approx(2 / 21)  # a tie counts against the skill set
    assert pvalue_higher(0.9, [0.1] * 20) == pytest.approx(1 / 21)
