"""Whole-model sparsification on tiny random models: layer-sequential calibration, requested sparsity in every chosen
linear, the caller's model untouched, per-neuron output error, saving, and clear errors."""

import pytest
import torch

from neurospec.errors import NeurospecError
from neurospec.models.linear import weight_out_in
from neurospec.sparsity import (
    InputHessian,
    list_linears,
    make_pattern,
    neuron_output_error,
    prune_weight,
    relative_output_error,
    save_sparse,
    sparsify,
)
from neurospec.sparsity.driver import BlockRunner

from tiny import char_tokenizer, tiny_model


def calib(n=8, seq=16, seed=0):
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "bert", "qwen2", "gemma"])
def test_block_runner_reproduces_the_forward_pass(family):
    model = tiny_model(family)
    ids = calib(n=5)
    runner = BlockRunner(model, ids, batch_size=2)  # batches of 2, 2, 1: kwargs broadcast to each
    for b in range(len(runner.blocks)):
        runner.run(b)
    outs = []
    handle = runner.blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    torch.testing.assert_close(torch.cat(runner.hidden), outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_requested_sparsity_in_every_chosen_linear_and_caller_unchanged(method, pattern):
    model = tiny_model("llama")
    before = snapshot(model)
    res = sparsify(model, method, sparsity=0.5 if pattern is None else None, pattern=pattern, calibration=calib(),
                   layers=[1], batch_size=4)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical caller
    sparse_lin = list_linears(res.model)
    chosen = [n for n in sparse_lin if n.startswith("layers.1.")]
    assert sorted(res.layers) == sorted(chosen) and len(chosen) == 7
    for name, ref in sparse_lin.items():
        w = weight_out_in(ref.module)
        if name in chosen:
            zeros = float((w == 0).float().mean())
            assert zeros == pytest.approx(0.5) and res.layers[name].sparsity == pytest.approx(zeros)
            if pattern == "2:4":
                assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert torch.equal(w, weight_out_in(list_linears(model)[name].module))
    assert res.to_dict()["pattern"] == ("unstructured" if pattern is None else "2:4")


def test_layer_sequential_calibration_uses_the_pruned_earlier_blocks():
    model = tiny_model("llama")
    ids = calib()
    both = sparsify(model, "sparsegpt", calibration=ids, batch_size=4, dtype=torch.float64)
    first = sparsify(model, "sparsegpt", calibration=ids, layers=[0], batch_size=4, dtype=torch.float64)
    # Block 1 pruned by hand, on the inputs that the model with block 0 already pruned gives it.
    lin = list_linears(first.model)
    accs = {}
    handles = [lin[n].module.register_forward_pre_hook(
        lambda m, a, n=n: accs.setdefault(n, InputHessian()).update(a[0])) for n in lin if n.startswith("layers.1.")]
    with torch.no_grad():
        for i in range(0, ids.shape[0], 4):
            first.model(input_ids=ids[i : i + 4])
    for h in handles:
        h.remove()
    pat = make_pattern(0.5)
    for n, acc in accs.items():
        want = prune_weight("sparsegpt", weight_out_in(lin[n].module), acc.compute(), pat, dtype=torch.float64)
        got = weight_out_in(list_linears(both.model)[n].module)
        torch.testing.assert_close(got, want.weight, atol=1e-5, rtol=1e-4)
    # ...which differs from calibrating block 1 on the dense model's inputs
    dense_only = sparsify(model, "sparsegpt", calibration=ids, layers=[1], batch_size=4, dtype=torch.float64)
    name = "layers.1.mlp.down_proj"
    assert not torch.allclose(weight_out_in(list_linears(dense_only.model)[name].module),
                              weight_out_in(list_linears(both.model)[name].module), atol=1e-6)


def test_inplace_rows_and_module_names():
    model = tiny_model("llama")
    name = "layers.0.mlp.up_proj"
    w0 = weight_out_in(list_linears(model)[name].module).clone()
    res = sparsify(model, "wanda", calibration=calib(), layers=[name], rows={name: [0, 5, 7]}, inplace=True)
    assert res.model is model and list(res.layers) == [name]
    w1 = weight_out_in(list_linears(model)[name].module)
    others = [i for i in range(w0.shape[0]) if i not in (0, 5, 7)]
    assert torch.equal(w1[others], w0[others])
    assert float((w1[[0, 5, 7]] == 0).float().mean()) == 0.5 and res.layers[name].rows == 3
    assert res.layers[name].matrix_sparsity == pytest.approx(0.5 * 3 / w0.shape[0])


def test_relative_output_error_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(5, 12, generator=g), torch.randn(40, 12, generator=g)
    Ws = prune_weight("magnitude", W, None, make_pattern(0.5)).weight
    direct = torch.stack([(X @ (W[o] - Ws[o])).norm() / (X @ W[o]).norm() for o in range(5)])
    torch.testing.assert_close(relative_output_error(W, Ws, X).float(), direct, rtol=1e-5, atol=1e-6)


def test_neuron_output_error_on_a_model_uses_the_dense_inputs():
    model = tiny_model("llama")
    res = sparsify(model, "magnitude", layers=["layers.1.mlp.down_proj", "layers.0.self_attn.q_proj"])
    held_out = calib(n=3, seed=1)
    errors = neuron_output_error(model, res.model, held_out, batch_size=2)
    assert set(errors) == {"layers.1.mlp.down_proj", "layers.0.self_attn.q_proj"}
    name = "layers.1.mlp.down_proj"
    xs = []
    handle = list_linears(model)[name].module.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=held_out)
    handle.remove()
    X = torch.cat(xs).double()
    W = weight_out_in(list_linears(model)[name].module).double()
    Ws = weight_out_in(list_linears(res.model)[name].module).double()
    direct = (X @ (W - Ws).T).norm(dim=0) / (X @ W.T).norm(dim=0)
    torch.testing.assert_close(errors[name], direct, rtol=1e-6, atol=1e-9)


def test_saved_sparse_model_loads_back_with_equal_logits(tmp_path, monkeypatch):
    from neurospec.models.loading import load_model

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    res = sparsify(model, "sparsegpt", pattern="2:4", calibration=calib())
    save_sparse(res.model, tmp_path / "sparse", char_tokenizer())
    loaded = load_model(str(tmp_path / "sparse"))
    ids = calib(n=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, res.model(input_ids=ids).logits)
    assert (tmp_path / "sparse" / "model.safetensors").exists()
    assert float((weight_out_in(loaded.model.model.layers[0].mlp.down_proj) == 0).float().mean()) == 0.5


def test_driver_errors_say_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(NeurospecError, match="at least 96 calibration tokens, got 32.*layers.0.mlp.down_proj"):
        sparsify(model, "sparsegpt", calibration=calib(n=2))
    with pytest.raises(NeurospecError, match="LlamaMLP, not a linear module.*layers.0.mlp.gate_proj"):
        sparsify(model, "magnitude", layers=["layers.0.mlp"])
    with pytest.raises(NeurospecError, match="no linear module 'layers.0.mlp.nope'"):
        sparsify(model, "magnitude", layers=["layers.0.mlp.nope"])
    with pytest.raises(NeurospecError, match="block 7 does not exist: the model has 2 blocks"):
        sparsify(model, "magnitude", layers=[7])
    with pytest.raises(NeurospecError, match="64 inputs, which is not a multiple of .* M=5"):
        sparsify(model, "magnitude", pattern="2:5")
    with pytest.raises(NeurospecError, match="needs calibration token blocks"):
        sparsify(model, "wanda")
    with pytest.raises(NeurospecError, match="not among the modules being pruned"):
        sparsify(model, "magnitude", layers=[0], rows={"layers.1.mlp.up_proj": [0]})
    with pytest.raises(NeurospecError, match=r"in \[0, 1\)"):
        sparsify(model, "magnitude", sparsity=1.0)


def test_gpt2_conv1d_weights_are_pruned_along_their_inputs():
    model = tiny_model("gpt2")
    res = sparsify(model, "sparsegpt", pattern="2:4", calibration=calib(), batch_size=4)
    lin = list_linears(res.model)
    assert "layers.0.attn.c_attn" in lin and len(res.layers) == 8
    for name, ref in lin.items():
        w = weight_out_in(ref.module)  # Conv1D stores [in, out]; the groups run along the inputs
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_sparsegpt_reconstructs_held_out_outputs_better_than_magnitude():
    model = tiny_model("llama")
    ids, held_out = calib(n=16, seed=0), calib(n=4, seed=9)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = sparsify(model, method, calibration=ids, layers=[0], batch_size=8)
        errors[method] = neuron_output_error(model, res.model, held_out, names=list(res.layers))
    for name in errors["sparsegpt"]:
        assert errors["sparsegpt"][name].mean() < errors["magnitude"][name].mean(), name
        assert errors["sparsegpt"][name].mean() < errors["wanda"][name].mean(), name


def test_vit_calibrates_on_images_and_counts_patch_tokens():
    model = tiny_model("vit")
    px = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = sparsify(model, "sparsegpt", calibration=px, batch_size=4)
    assert all(r.sparsity == pytest.approx(0.5) and r.tokens == 8 * 17 for r in res.layers.values())
    with pytest.raises(NeurospecError, match="at least 96 calibration tokens for layers.0.mlp.fc2, but it saw 68"):
        sparsify(model, "sparsegpt", calibration=px[:4])


def test_captured_block_arguments_broadcast_to_each_batch():
    from neurospec.sparsity.driver import _expand

    cos, mask, pos = torch.randn(1, 5, 4), torch.zeros(1, 1, 5, 5), torch.arange(5)
    pe = _expand((cos, cos), 3)
    assert [t.shape for t in pe] == [torch.Size([3, 5, 4])] * 2 and torch.equal(pe[0][2], cos[0])
    assert _expand(mask, 3).shape == (3, 1, 5, 5) and _expand(mask, 1) is mask
    assert _expand(pos, 3) is pos and _expand(None, 3) is None and _expand([mask], 2)[0].shape[0] == 2
