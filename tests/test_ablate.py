"""Ablations on tiny models of every family: folded == hooked == the formula, exact restore, resampling, saving."""

import copy

import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.intervene.ablate import (
    AblationMethod,
    ablated,
    ablation_methods,
    fold_ablation,
    get_ablation,
    register_ablation,
)
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.linear import weight_out_in
from neurospec.models.sites import find_sites

from tiny import FAMILIES, tiny_inputs, tiny_model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def formula_hooks(model, sites, neurons, offsets):
    """Reference ablation written from the definition: a <- m*a + (1-m)*c on each site's input."""
    handles = []
    for name in neurons.site_names:
        keep = (~neurons.mask(name)).float()
        c = torch.zeros(sites[name].width) if offsets is None else offsets[name].float()

        def pre(module, args, keep=keep, c=c):
            return (args[0] * keep + (1 - keep) * c,)

        handles.append(model.get_submodule(sites[name].module).register_forward_pre_hook(pre))
    return handles


def param_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model, snapshot, param_ids):
    names = dict(model.named_parameters())
    assert names.keys() == snapshot.keys()
    for n, p in names.items():
        assert torch.equal(p, snapshot[n]), n
        assert id(p) == param_ids[n], n
    for mod in model.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_equals_hooked_equals_formula(family):
    model = tiny_model(family)
    sites = find_sites(model)
    inputs = tiny_inputs(family)
    base = logits(model, inputs)
    g = torch.Generator().manual_seed(1)
    offsets = {s.name: torch.randn(s.width, generator=g) for s in sites}
    for kind in ("mlp", "attn"):
        neurons = NeuronSet.random(sites.of_kind(kind), frac=0.4, seed=3)
        for method, off in (("zero", None), ("mean", offsets), ("value", offsets)):
            handles = formula_hooks(model, sites, neurons, off)
            want = logits(model, inputs)
            for h in handles:
                h.remove()
            with ablated(model, sites, neurons, method, offsets=off) as info:
                folded = logits(model, inputs)
            assert info.folded and not info.hooked
            with ablated(model, sites, neurons, method, offsets=off, fold=False) as info:
                hooked = logits(model, inputs)
            assert info.hooked and not info.folded
            torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)
            assert (want - base).abs().max() > 1e-3, f"{family} {kind} {method}: ablation changed nothing"
    # mean offsets differ from zero: the offsets reach the output
    neurons = NeuronSet.random(sites, frac=0.4, seed=3)
    with ablated(model, sites, neurons, "zero"):
        z = logits(model, inputs)
    with ablated(model, sites, neurons, "mean", offsets=offsets):
        m = logits(model, inputs)
    assert (z - m).abs().max() > 1e-3
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("family,mlp_path", [
    ("llama", "model.layers.{i}.mlp"),
    ("gpt2", "transformer.h.{i}.mlp"),
    ("gpt_neox", "gpt_neox.layers.{i}.mlp"),
])
def test_zero_ablating_all_mlp_neurons_removes_the_mlp_but_its_bias(family, mlp_path):
    model = tiny_model(family)
    sites = find_sites(model)
    inputs = tiny_inputs(family)
    layer = 1
    site = sites[f"layers.{layer}.mlp"]
    with ablated(model, sites, NeuronSet.from_masks({site.name: torch.ones(site.width, dtype=torch.bool)}), "zero"):
        got = logits(model, inputs)
    mlp = model.get_submodule(mlp_path.format(i=layer))
    reader = model.get_submodule(site.module)

    def bias_only(x, *args, **kwargs):
        out = torch.zeros(*x.shape[:-1], sites.hidden_size)
        return out + reader.bias if reader.bias is not None else out

    mlp.forward = bias_only
    want = logits(model, inputs)
    del mlp.forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, logits(model, inputs))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_context_restores_bit_identically_even_after_an_exception(method, fold):
    model = tiny_model("llama")  # no biases: folding mean offsets creates them
    sites = find_sites(model)
    inputs = tiny_inputs("llama")
    snap = param_snapshot(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    neurons = NeuronSet.random(sites, frac=0.5, seed=0)
    kw = {}
    if method == "mean":
        kw["offsets"] = {s.name: torch.randn(s.width) for s in sites}
    if method == "resample":
        kw["samples"] = {s.name: torch.randn(9, s.width) for s in sites}
        fold = True
    base = logits(model, inputs)
    with ablated(model, sites, neurons, method, fold=fold, **kw) as info:
        assert not torch.equal(logits(model, inputs), base)
    assert_untouched(model, snap, ids)
    if method == "mean" and fold:
        assert len(info.created_biases) == len(sites)
    with pytest.raises(RuntimeError, match="boom"):
        with ablated(model, sites, neurons, method, fold=fold, **kw):
            raise RuntimeError("boom")
    assert_untouched(model, snap, ids)
    assert torch.equal(logits(model, inputs), base)
    # nested ablations unwind in order
    with ablated(model, sites, neurons, method, fold=fold, **kw):
        with ablated(model, sites, NeuronSet.random(sites, frac=0.2, seed=9), "zero"):
            pass
    assert_untouched(model, snap, ids)


def test_bad_inputs_change_nothing():
    model = tiny_model("gpt2")
    sites = find_sites(model)
    snap = param_snapshot(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    neurons = NeuronSet.random(sites, frac=0.3, seed=0)
    partial = {s.name: torch.zeros(s.width) for s in sites.sites[:2]}
    with pytest.raises(NeurospecError, match="no entry for site layers.1.mlp"):
        with ablated(model, sites, neurons, "mean", offsets=partial):
            pass
    with pytest.raises(NeurospecError, match="needs offsets"):
        with ablated(model, sites, neurons, "peak"):
            pass
    with pytest.raises(NeurospecError, match="takes no offsets"):
        with ablated(model, sites, neurons, "zero", offsets=partial):
            pass
    with pytest.raises(NeurospecError, match="shape"):
        with ablated(model, sites, neurons, "value", offsets={s.name: torch.zeros(3) for s in sites}):
            pass
    with pytest.raises(NeurospecError, match="unknown ablation method 'nope'; known: zero, mean"):
        get_ablation("nope")
    with pytest.raises(NeurospecError, match="cannot be folded"):
        fold_ablation(model, sites, neurons, method="resample")
    with pytest.raises(NeurospecError, match="width 50.*width 96"):
        with ablated(model, sites, NeuronSet({"layers.0.mlp": [1]}, {"layers.0.mlp": 50}), "zero"):
            pass
    assert_untouched(model, snap, ids)


def test_registry_rejects_duplicates():
    assert list(ablation_methods()) [:5] == ["zero", "mean", "peak", "value", "resample"]
    with pytest.raises(ValueError, match="already registered"):
        register_ablation(AblationMethod("mean", "offsets", "again"))
    assert get_ablation("resample").per_input and not get_ablation("peak").per_input


def capture_input(model, path):
    seen = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    return seen, handle


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resample_takes_whole_token_rows_from_the_samples(family):
    model = tiny_model(family)
    sites = find_sites(model)
    site = sites["layers.1.mlp"]
    inputs = tiny_inputs(family, batch=4, seq=16)
    n_rows = 12
    rows = torch.arange(1, n_rows + 1, dtype=torch.float32) * 10.0  # row r holds the constant 10*(r+1)
    samples = {site.name: rows[:, None].expand(n_rows, site.width).clone()}
    neurons = NeuronSet.random([site], frac=0.3, seed=2)
    idx = neurons.indices(site.name)
    keep = ~neurons.mask(site.name)
    seen0, h = capture_input(model, site.module)
    logits(model, inputs)
    h.remove()
    with ablated(model, sites, neurons, "resample", samples=samples, seed=4):
        seen, h = capture_input(model, site.module)
        out1 = logits(model, inputs)
        h.remove()
    x = seen["x"].reshape(-1, site.width)
    vals = x[:, idx]
    assert torch.isin(vals, rows).all()
    assert (vals == vals[:, :1]).all(), "one row per token, shared by its ablated neurons"
    assert len(vals[:, 0].unique()) >= 6
    torch.testing.assert_close(x[:, keep], seen0["x"].reshape(-1, site.width)[:, keep])
    with ablated(model, sites, neurons, "resample", samples=samples, seed=4):
        assert torch.equal(logits(model, inputs), out1)
    with ablated(model, sites, neurons, "resample", samples=samples, seed=5):
        assert not torch.equal(logits(model, inputs), out1)
    with ablated(model, sites, neurons, "resample", samples=samples, seed=4, per_neuron=True):
        seen, h = capture_input(model, site.module)
        logits(model, inputs)
        h.remove()
    vals = seen["x"].reshape(-1, site.width)[:, idx]
    assert torch.isin(vals, rows).all()
    assert (vals != vals[:, :1]).any(dim=1).float().mean() > 0.5, "per-neuron rows differ within a token"
    with pytest.raises(NeurospecError, match="per_neuron"):
        with ablated(model, sites, neurons, "zero", per_neuron=True):
            pass


def test_resample_position_aligned():
    model = tiny_model("llama")
    sites = find_sites(model)
    site = sites["layers.0.attn"]
    n_seq, ref_seq, seq = 5, 20, 16
    r = torch.arange(n_seq, dtype=torch.float32)[:, None, None]
    p = torch.arange(ref_seq, dtype=torch.float32)[None, :, None]
    samples = {site.name: (1000 * r + p).expand(n_seq, ref_seq, site.width).clone()}
    neurons = NeuronSet.random([site], frac=0.25, seed=0)
    with ablated(model, sites, neurons, "resample", samples=samples):
        seen, h = capture_input(model, site.module)
        logits(model, tiny_inputs("llama", batch=3, seq=seq))
        h.remove()
    vals = seen["x"][..., neurons.indices(site.name)]  # [3, seq, k]
    assert torch.equal(vals % 1000, torch.arange(seq, dtype=torch.float32)[None, :, None].expand_as(vals))
    assert len((vals // 1000).unique()) >= 3
    with ablated(model, sites, neurons, "resample", samples=samples):
        with pytest.raises(NeurospecError, match="positions"):
            logits(model, tiny_inputs("llama", batch=1, seq=ref_seq + 1))


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16 keeps 8 significant bits: each rounding errs by at most 2^-8 relative


def test_bf16_fold_hook_and_resample():
    """Folded and hooked bf16 ablations both match an exact float64 evaluation of the same bf16 weights.

    Tolerance: every rounding of the bf16 forward errs by at most u = 2^-8 of the value rounded; the logits are a
    short chain of such roundings (embedding, 2 x (attention, MLP), norm, head; measured error about 1.5 u of the
    largest logit), so each of folded and hooked must lie within 4 u of the largest reference logit, elementwise.
    Folding that misses one site's bias term, or puts it in the wrong place, errs by far more (checked below).
    """
    model = tiny_model("llama").to(torch.bfloat16)
    exact = copy.deepcopy(model).to(torch.float64)  # the same bf16-rounded weights, evaluated in float64
    sites = find_sites(model)
    inputs = tiny_inputs("llama")
    neurons = NeuronSet.random(sites, frac=0.3, seed=1)
    offsets = {s.name: torch.randn(s.width, generator=torch.Generator().manual_seed(7)) for s in sites}
    snap = param_snapshot(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    handles = formula_hooks(exact, sites, neurons, {k: v.double() for k, v in offsets.items()})
    want = logits(exact, inputs)
    for h in handles:
        h.remove()
    tol = 4 * BF16_UNIT_ROUNDOFF * want.abs().max().item()
    with ablated(model, sites, neurons, "mean", offsets=offsets) as info:
        assert all(model.get_submodule(m).bias.dtype == torch.bfloat16 for m in info.created_biases)
        folded = logits(model, inputs).double()
    with ablated(model, sites, neurons, "mean", offsets=offsets, fold=False):
        hooked = logits(model, inputs).double()
    assert (folded - want).abs().max() <= tol
    assert (hooked - want).abs().max() <= tol
    # a fold that misses the bias term of one site (its offsets' contribution) is caught by this tolerance
    last = neurons.site_names[-1]
    missed = {**offsets, last: torch.zeros_like(offsets[last])}
    with ablated(model, sites, neurons, "mean", offsets=missed):
        wrong = logits(model, inputs).double()
    assert (wrong - want).abs().max() > 3 * tol
    samples = {s.name: torch.randn(7, s.width) for s in sites}
    with ablated(model, sites, neurons, "resample", samples=samples):
        out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_untouched(model, snap, ids)


def test_position_aligned_samples_are_the_site_inputs_per_sequence():
    from neurospec.intervene.aligned import position_aligned_samples

    model = tiny_model("llama")
    sites = find_sites(model)
    snap = param_snapshot(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    blocks = tiny_inputs("llama", batch=5, seq=10, seed=3)["input_ids"]
    got = position_aligned_samples(model, blocks, site_names=["layers.1.attn", "layers.0.mlp"], batch_size=2)
    assert list(got) == ["layers.1.attn", "layers.0.mlp"]
    for name, x in got.items():
        seen, h = capture_input(model, sites[name].module)
        logits(model, {"input_ids": blocks})
        h.remove()
        assert x.shape == (5, 10, sites[name].width)
        torch.testing.assert_close(x, seen["x"], rtol=1e-5, atol=1e-6)
    assert_untouched(model, snap, ids)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_fold_save_from_pretrained_same_logits(tmp_path, family):
    import transformers as T

    model = tiny_model(family)
    sites = find_sites(model)
    inputs = tiny_inputs(family)
    kinds = ("attn",) if family == "gemma" else ("mlp", "attn")  # gemma has attention_bias but no mlp_bias
    neurons = NeuronSet.random(sites.select(kinds=kinds), frac=0.3, seed=0)
    offsets = {s.name: torch.randn(s.width) for s in sites}
    with ablated(model, sites, neurons, "mean", offsets=offsets):
        want = logits(model, inputs)
    info = fold_ablation(model, sites, neurons, offsets, method="mean")
    assert info.method == "mean" and info.n_ablated == len(neurons)
    torch.testing.assert_close(logits(model, inputs), want, rtol=1e-5, atol=1e-5)
    if family == "llama":
        assert info.config_changes == {"mlp_bias": True, "attention_bias": True}
        assert "model.layers.0.mlp.up_proj" in info.created_biases
    if family == "gpt2":
        assert info.config_changes == {} and info.created_biases == ()
    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back, inputs), want, rtol=1e-5, atol=1e-5)
    for s in neurons.site_names:
        assert (weight_out_in(back.get_submodule(sites[s].module))[:, neurons.indices(s)] == 0).all()


def test_fold_without_a_bias_flag_refuses_and_changes_nothing():
    model = tiny_model("qwen2")  # its o_proj and down_proj have no bias and no config flag for one
    sites = find_sites(model)
    neurons = NeuronSet.random(sites, frac=0.3, seed=0)
    offsets = {s.name: torch.randn(s.width) for s in sites}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NeurospecError, match="no config flag.*method 'zero'"):
        fold_ablation(model, sites, neurons, offsets)
    with pytest.raises(NeurospecError, match="missing_bias='error'"):
        fold_ablation(tiny_model("llama"), sites, neurons, offsets, missing_bias="error")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # zero needs no bias; "memory" folds offsets with in-memory biases and leaves the config alone
    zero = fold_ablation(copy.deepcopy(model), sites, neurons)
    assert zero.method == "zero" and zero.created_biases == ()
    inputs = tiny_inputs("qwen2")
    with ablated(model, sites, neurons, "value", offsets=offsets):
        want = logits(model, inputs)
    info = fold_ablation(model, sites, neurons, offsets, missing_bias="memory")
    assert info.config_changes == {} and len(info.created_biases) == len(sites)
    torch.testing.assert_close(logits(model, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: transposed Conv1D weights with biases
@pytest.mark.parametrize("method", ["zero", "mean"])
def test_folding_changes_the_weights_in_place_without_copying_them(family, method):
    model = tiny_model(family)
    sites = find_sites(model)
    neurons = NeuronSet.random(sites, frac=0.3, seed=1)
    kw = {"offsets": {s.name: torch.randn(s.width) for s in sites}} if method == "mean" else {}
    readers = {s.name: model.get_submodule(s.module) for s in sites}
    before = {n: (m.weight, m.weight.data_ptr()) for n, m in readers.items()}
    snap, ids = param_snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    with ablated(model, sites, neurons, method, **kw):
        for s in sites:
            w = readers[s.name].weight
            assert w is before[s.name][0] and w.data_ptr() == before[s.name][1], f"{s.name}: the weight was copied"
            cols = torch.as_tensor(neurons.indices(s.name), dtype=torch.long)
            assert not weight_out_in(readers[s.name])[:, cols].any(), "the ablated columns are folded"
    assert_untouched(model, snap, ids)


def test_an_inference_tensor_weight_is_folded_into_a_copy():
    with torch.inference_mode():
        model = tiny_model("llama")
    sites = find_sites(model)
    snap = param_snapshot(model)
    neurons = NeuronSet.random(sites, frac=0.3, seed=1)
    inputs = tiny_inputs("llama")
    with torch.inference_mode():
        base = logits(model, inputs)
    with ablated(model, sites, neurons, "zero"):
        with torch.inference_mode():
            assert not torch.equal(logits(model, inputs), base)
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n
