"""Sites of every supported family, found on tiny models built in-process."""

import pytest
import torch

from neurospec.errors import ArchitectureError, NeuronSetError
from neurospec.models import Family, NeuronId, find_sites, register_family
from neurospec.models.architectures import families
from neurospec.models.linear import linear_dims, weight_out_in
from neurospec.models.sites import Site, Sites, parse_site_name

from tiny import FAMILIES, tiny_inputs, tiny_model

EXPECTED_FAMILY = {"qwen2": "llama", "gemma": "llama"}


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_found_and_read_by_hook(family):
    model = tiny_model(family)
    sites = find_sites(model)
    assert sites.family == EXPECTED_FAMILY.get(family, family)
    assert [s.name for s in sites] == ["layers.0.mlp", "layers.0.attn", "layers.1.mlp", "layers.1.attn"]
    seen = {}
    hooks = []
    for s in sites:
        mod = model.get_submodule(s.module)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=s.name: seen.__setitem__(name, a[0].shape)))
    with torch.no_grad():
        model(**tiny_inputs(family))
    for h in hooks:
        h.remove()
    for s in sites:
        assert seen[s.name][-1] == s.width, s
        if s.kind == "attn":
            assert s.n_heads == 4 and s.n_heads * s.d_head == s.width
            assert s.width == 64
        else:
            assert s.width == 96
            assert s.inputs, "MLP sites list their input projections"
            for path in s.inputs:
                assert linear_dims(model.get_submodule(path))[1] == s.width


def test_gpt2_conv1d_weight_view():
    model = tiny_model("gpt2")
    s = find_sites(model)["layers.0.mlp"]
    mod = model.get_submodule(s.module)
    w = weight_out_in(mod)
    x = torch.randn(3, s.width)
    torch.testing.assert_close(mod(x), x @ w.t() + mod.bias)


def test_structural_fallback_on_unregistered_model():
    import transformers as T

    cfg = T.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    sites = find_sites(T.AutoModel.from_config(cfg))
    assert sites.family == "structural"
    assert sites["layers.1.mlp"].module.endswith("mlp.fc2")
    assert sites["layers.1.attn"].width == 64


def test_unknown_model_error_says_how_to_register():
    from torch import nn

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird", "hidden_size": 8})()
            self.lin = nn.Linear(8, 8)

    with pytest.raises(ArchitectureError, match="register_family"):
        find_sites(Weird())
    with pytest.raises(ArchitectureError, match="config"):
        find_sites(nn.Linear(2, 2))


def test_register_family_rejects_duplicates():
    fam = families()["llama"]
    with pytest.raises(ValueError, match="already registered"):
        register_family(fam)
    with pytest.raises(ValueError, match="already belong"):
        register_family(Family("llama2", ("llama",), "layers", "a", "b", ()))


def test_neuron_ids_round_trip_and_validate():
    nid = NeuronId.parse("layers.12.mlp:1234")
    assert nid == NeuronId("layers.12.mlp", 1234) and str(nid) == "layers.12.mlp:1234"
    assert NeuronId.parse(str(nid)) == nid
    for bad in ("layers.1.mlp", "layers.x.mlp:3", "mlp:3", "layers.1.ffn:2", "layers.1.mlp:-1"):
        with pytest.raises(NeuronSetError):
            NeuronId.parse(bad)
    assert parse_site_name("layers.3.attn") == (3, "attn")
    sites = find_sites(tiny_model("llama"))
    sites.check_neuron(NeuronId("layers.1.mlp", 95))
    with pytest.raises(NeuronSetError, match="width 96"):
        sites.check_neuron(NeuronId("layers.1.mlp", 96))
    with pytest.raises(NeuronSetError, match="no site"):
        sites["layers.7.mlp"]


def test_sites_serialise():
    sites = find_sites(tiny_model("gpt_neox"))
    again = Sites(sites.family, tuple(Site.from_dict(d) for d in sites.to_list()), sites.hidden_size)
    assert again.sites == sites.sites
    assert [s.name for s in sites.of_kind("attn")] == ["layers.0.attn", "layers.1.attn"]
    assert sites.n_layers == 2
