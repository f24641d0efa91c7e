"""The ablation-method study on tiny models (and once on the bundled SmolLM2)."""

import statistics

import numpy as np
import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.experiments.ablation import ablation_study
from neurospec.intervene.ablate import fold_ablation, study_methods
from neurospec.intervene.neuronset import NeuronSet
from neurospec.intervene.references import peak_offsets
from neurospec.models.sites import find_sites
from neurospec.record.accumulators import NeuronStats
from neurospec.report.ablation import plot_ablation, summarise

from tiny import VOCAB, tiny_model

RULE = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))  # next token = RULE[token]


def task_blocks(seed, n=4, seq=16):
    """Sequences that follow a fixed random bigram rule, so a briefly trained model predicts them well."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, seq):
        out[:, t] = RULE[out[:, t - 1]]
    return out


def trained_llama(steps=100):
    """A tiny Llama whose MLPs alone (everything else frozen at random init) learned the rule."""
    model = tiny_model("llama").train()
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    for i in range(steps):
        batch = task_blocks(1000 + i, n=16)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def site_means(model, sites, blocks):
    """Per-site input means and token rows, recorded with plain pre-hooks (the study takes them as tensors)."""
    rows = {}
    handles = [
        model.get_submodule(s.module).register_forward_pre_hook(
            lambda m, a, name=s.name: rows.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for s in sites
    ]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in handles:
        h.remove()
    return {k: v.mean(0) for k, v in rows.items()}, rows


@pytest.fixture(scope="module")
def study():
    model = trained_llama()
    sites = find_sites(model)
    means, samples = site_means(model, sites, task_blocks(99))
    stats = {}
    for name, x in samples.items():
        stats[name] = NeuronStats(x.shape[1])
        stats[name].update(x)
    offsets = {"mean": means, "peak": peak_offsets(stats)}
    tasks = {"a": task_blocks(1), "b": task_blocks(2)}
    kw = dict(kind="mlp", frac_per_step=0.25, steps=4, seeds=(0, 1), batch_size=3)
    rows = ablation_study(
        model, sites, tasks, methods=study_methods(), offsets_by_method=offsets,
        samples=samples, **kw,
    )
    return model, sites, tasks, rows, kw, offsets


def test_rows_baseline_and_growth(study):
    model, sites, tasks, rows, kw, _ = study
    assert len(rows) == 2 * 5 * 4 * 2
    assert set(rows[0]) == {"seed", "step", "fraction", "method", "task", "loss", "top1", "loss_increase",
                            "top1_drop", "n_ablated", "loss_metric"}
    for task in tasks:
        base = [r for r in rows if r["step"] == 0 and r["task"] == task]
        assert len(base) == 8 and len({(r["loss"], r["top1"]) for r in base}) == 1
        assert all(r["loss_increase"] == 0 and r["top1_drop"] == 0 and r["n_ablated"] == 0 for r in base)
    width = sites["layers.0.mlp"].width
    for step in range(5):
        ns = {r["n_ablated"] for r in rows if r["step"] == step}
        assert ns == {2 * (step * width // 4)}  # two MLP sites, a quarter of each per step
        assert {r["fraction"] for r in rows if r["step"] == step} == {step * 0.25}
    for r in rows:
        assert r["loss_increase"] == pytest.approx(r["loss"] - next(
            b["loss"] for b in rows if b["step"] == 0 and b["task"] == r["task"]))


def test_zero_ablation_of_everything_increases_loss(study):
    _, _, tasks, rows, _, _ = study
    for task in tasks:
        for seed in (0, 1):
            full = next(r for r in rows if r["step"] == 4 and r["method"] == "zero" and r["task"] == task
                        and r["seed"] == seed)
            assert full["fraction"] == 1.0 and full["loss_increase"] > 1.0


def loss_with_inputs_set(model, blocks, values_by_module):
    """The causal-LM loss with the given inputs of some modules overwritten: {module: (indices, values)}."""
    def hook(_module, args, idx, values):
        x = args[0].clone()
        x[..., idx] = values.to(x.dtype)
        return (x,) + args[1:]

    handles = [
        model.get_submodule(m).register_forward_pre_hook(lambda mod, a, i=i, v=v: hook(mod, a, i, v))
        for m, (i, v) in values_by_module.items()
    ]
    try:
        with torch.no_grad():
            return model(input_ids=blocks, labels=blocks).loss.item()
    finally:
        for h in handles:
            h.remove()


def test_losses_equal_an_independent_ablation(study):
    """Every (method, seed, step, task) loss equals the loss of the model whose ablated neurons are overwritten by
    plain hooks: same nested draws, same values, for every method that writes constants."""
    model, sites, tasks, rows, kw, offsets = study
    site_list = sites.of_kind("mlp")
    fracs = [kw["frac_per_step"] * i for i in range(1, kw["steps"] + 1)]
    by = {(r["method"], r["seed"], r["step"], r["task"]): r["loss"] for r in rows}
    checks = [("peak", seed, step) for seed in kw["seeds"] for step in (1, 2, 3)] + [("zero", 1, 2), ("mean", 1, 2)]
    for method, seed, step in checks:
        neurons = NeuronSet.random_nested(site_list, fracs, seed=seed)[step - 1]
        values = {}
        for s in site_list:
            idx = neurons.indices(s.name)
            values[s.module] = (idx, torch.zeros(len(idx)) if method == "zero" else offsets[method][s.name][idx])
        want = loss_with_inputs_set(model, tasks["a"], values)
        assert by[(method, seed, step, "a")] == pytest.approx(want, rel=1e-4), (method, seed, step)
    mean_vs_peak = [by[("mean", 0, step, "a")] - by[("peak", 0, step, "a")] for step in (1, 2, 3)]
    assert any(abs(d) > 1e-3 for d in mean_vs_peak)  # the two offsets differ enough to matter


def test_peak_ablation_folds_the_known_mode():
    """Activations with a known mode per neuron (after a misleading first batch) give peak offsets at that mode, and
    folding them writes bias = W[:, idx] @ mode."""
    model = tiny_model("llama")
    sites = find_sites(model)
    site = sites["layers.0.mlp"]
    rng = np.random.default_rng(0)
    mode = np.linspace(-1.5, 2.5, site.width)
    n = 20_000
    x = np.where(rng.random((n, site.width)) < 0.6, rng.normal(mode, 0.02, (n, site.width)),
                 rng.uniform(-4, 4, (n, site.width)))
    stats = NeuronStats(site.width)
    stats.update(torch.zeros(64, site.width))  # a first batch that says nothing about the distribution
    for part in torch.tensor(x, dtype=torch.float32).split(5000):
        stats.update(part)
    bin_width = (x.max(0) - x.min(0)) / 100
    idx = torch.tensor([0, 5, 17, 40, 95])
    w = model.get_submodule(site.module).weight.detach().double().clone()  # [out, in]
    for method in ("histogram", "kde"):
        offsets = peak_offsets({site.name: stats}, method=method)
        got = offsets[site.name].double().numpy()
        assert (np.abs(got - mode) <= bin_width).all(), method
        folded = tiny_model("llama")
        fold_ablation(folded, sites, NeuronSet({site.name: idx}, {site.name: site.width}), offsets, method="peak",
                      missing_bias="memory")
        bias = folded.get_submodule(site.module).bias.detach().double()
        hand = w[:, idx] @ torch.tensor(mode[idx.numpy()])
        slack = w[:, idx].abs() @ torch.tensor(bin_width[idx.numpy()])
        assert ((bias - hand).abs() <= slack + 1e-6).all(), method
        torch.testing.assert_close(bias, w[:, idx] @ offsets[site.name][idx].double(), rtol=1e-5, atol=1e-6)


def test_peak_offsets_reject_bad_options():
    stats = {"s": NeuronStats(3)}
    stats["s"].update(torch.randn(10, 3))
    with pytest.raises(NeurospecError, match="one of histogram, kde"):
        peak_offsets(stats, method="mode")
    with pytest.raises(NeurospecError, match="bandwidth"):
        peak_offsets(stats, method="kde", smooth=2.0)
    with pytest.raises(NeurospecError, match="bins >= 1"):
        peak_offsets(stats, bins=0)


def test_study_is_reproducible_including_resample(study):
    model, sites, tasks, rows, kw, _ = study
    _, samples = site_means(model, sites, task_blocks(99))
    again = ablation_study(model, sites, tasks, methods=("resample",), samples=samples, **kw)
    assert again == [r for r in rows if r["method"] == "resample"]


def test_summarise_matches_statistics_module(study):
    _, _, _, rows, _, _ = study
    summary = summarise(rows)
    assert len(summary) == 5 * 4 * 2
    for s in summary:
        group = [r for r in rows if (r["method"], r["fraction"], r["task"]) == (s["method"], s["fraction"], s["task"])]
        assert s["n_seeds"] == 2
        for f in ("loss", "top1", "loss_increase", "top1_drop"):
            vals = [r[f] for r in group]
            assert s[f"{f}_mean"] == pytest.approx(statistics.mean(vals))
            assert s[f"{f}_std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)


def test_plot_writes_png_and_svg(study, tmp_path):
    _, _, _, rows, _, _ = study
    paths = plot_ablation(rows, tmp_path / "fig" / "ablation.png")
    assert [p.name for p in paths] == ["ablation.png", "ablation.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths[1].read_text()
    assert "<svg" in svg and "resample" in svg


def test_headless_encoder_uses_representation_distance():
    model = tiny_model("bert", head=False)
    sites = find_sites(model)
    rows = ablation_study(model, sites, {"t": task_blocks(3)}, kind="both", frac_per_step=0.5, steps=2,
                          methods=("zero",), seeds=(0,))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-7) and rows[0]["top1"] is None
    assert rows[2]["loss"] > rows[0]["loss"] and rows[2]["top1_drop"] is None
    assert summarise(rows)[0]["top1_mean"] is None


def test_bad_arguments():
    model = tiny_model("llama")
    sites = find_sites(model)
    tasks = {"t": task_blocks(0)}
    with pytest.raises(NeurospecError, match=r"offsets_by_method\['mean'\]"):
        ablation_study(model, sites, tasks, methods=("mean",))
    with pytest.raises(NeurospecError, match="samples"):
        ablation_study(model, sites, tasks, methods=("resample",))
    with pytest.raises(NeurospecError, match="frac_per_step"):
        ablation_study(model, sites, tasks, methods=("zero",), frac_per_step=0.2, steps=6)
    with pytest.raises(NeurospecError, match="kind"):
        ablation_study(model, sites, tasks, methods=("zero",), kind="heads")
    with pytest.raises(NeurospecError, match="not run"):
        ablation_study(model, sites, tasks, methods=("zero",), offsets_by_method={"mean": {}})


@pytest.mark.slow
def test_real_model_attention_study():
    from neurospec.models.loading import load_model

    loaded = load_model("smollm2-135m")
    text = ("Water boils at one hundred degrees Celsius at sea level. Ice melts at zero degrees. "
            "The sun rises in the east and sets in the west. ") * 8
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"][:128]).reshape(2, 64)
    means, _ = site_means(loaded.model, loaded.sites.of_kind("attn"), ids[:1])
    rows = ablation_study(loaded, loaded.sites, {"facts": ids[1:]}, kind="attn", frac_per_step=0.25, steps=2,
                          methods=("zero", "mean"), offsets_by_method={"mean": means}, seeds=(0,), batch_size=1)
    by = {(r["method"], r["step"]): r for r in rows}
    assert by[("zero", 0)]["loss"] == by[("mean", 0)]["loss"] < 3.0
    attn = loaded.sites.of_kind("attn")
    half = NeuronSet.random_nested(attn, [0.25, 0.5], seed=0)[1]
    for method, values in (("zero", None), ("mean", means)):
        set_to = {s.module: (half.indices(s.name), torch.zeros(len(half.indices(s.name))) if values is None
                             else values[s.name][half.indices(s.name)]) for s in attn}
        want = loss_with_inputs_set(loaded.model, ids[1:], set_to)
        assert by[(method, 2)]["loss"] == pytest.approx(want, rel=1e-3)
        assert by[(method, 2)]["loss_increase"] == pytest.approx(want - by[(method, 0)]["loss"], rel=1e-3, abs=1e-4)
    assert by[("zero", 2)]["loss_increase"] > 0.1
    assert by[("zero", 2)]["n_ablated"] == 30 * 576 // 2
