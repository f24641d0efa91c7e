"""Mixture-of-experts models (Mixtral, Qwen2-MoE, OLMoE): per-expert sites, recording, router usage, ablation."""

import json

import pytest
import torch
import torch.nn.functional as F

from moe_tiny import FF, MOE_FAMILIES, N_EXPERTS, TOP_K, moe_model
from neurospec.errors import ArchitectureError, NeurospecError
from neurospec.intervene.ablate import ablated, fold_ablation
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.experts import add_expert_hook, add_routing_hook, observe_site
from neurospec.models.loading import from_module
from neurospec.models.sites import Site, find_sites, parse_site_expert, parse_site_name, site_order_key
from neurospec.record.recorder import RecordConfig, record
from neurospec.record.routing import routing_usage
from neurospec.record.store import open_run

from tiny import VOCAB, char_tokenizer, write_corpus

CFG = RecordConfig(tokens=256, eval_tokens=64, seq_len=32, batch_size=4, hist_bins=32, reservoir=8)


def _ids(batch=3, seq=10, seed=0):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _experts(model, layer):
    return model.model.layers[layer].mlp.experts


# --------------------------------------------------------------------------------------------- brute force


def _moe_inputs(model, ids_batches):
    """The hidden states entering each layer's MoE block, ``{layer: [tokens, hidden]}`` over all batches."""
    caps: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, a, i=i: caps.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for ids in ids_batches:
                model.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in caps.items()}


def _route(model, layer, x):
    """Top-k experts and weights of ``x [tokens, hidden]``, computed by hand from the router's weight."""
    cfg = model.config
    probs = torch.softmax(F.linear(x, model.model.layers[layer].mlp.gate.weight).float(), dim=-1)
    w, idx = torch.topk(probs, TOP_K, dim=-1)
    if cfg.model_type == "mixtral" or getattr(cfg, "norm_topk_prob", False):
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def _expert_acts(model, layer, x, idx, e):
    """``act(gate_e(x)) * up_e(x)`` in float64 for the tokens of ``x`` routed to expert ``e``."""
    ex = _experts(model, layer)
    gate, up = (x[(idx == e).any(-1)].double() @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return ex.act_fn(gate) * up


def _moe_by_hand(model, layer, x, ablate: dict[int, torch.Tensor] | None = None):
    """The routed experts' output for ``x`` in float64, zeroing neurons ``ablate[e]`` of expert ``e``."""
    idx, w = _route(model, layer, x)
    ex = _experts(model, layer)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(N_EXPERTS):
        rows = (idx == e).any(-1)
        h = _expert_acts(model, layer, x, idx, e)
        if ablate and e in ablate:
            h[:, ablate[e]] = 0
        we = (w * (idx == e)).sum(-1)[rows].double()
        out[rows] += (h @ ex.down_proj[e].double().T) * we[:, None]
    return out


# --------------------------------------------------------------------------------------------- sites


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_sites_list_every_expert(family):
    sites = find_sites(moe_model(family))
    assert sites.family == family
    layer0 = [s.name for s in sites if s.layer == 0]
    shared = ["layers.0.mlp.shared"] if family == "qwen2_moe" else []
    assert layer0 == [f"layers.0.mlp.{e}" for e in range(N_EXPERTS)] + shared + ["layers.0.attn"]
    s = sites["layers.1.mlp.2"]
    assert (s.kind, s.layer, s.width, s.expert, s.module, s.param) == (
        "mlp", 1, FF, 2, "model.layers.1.mlp.experts", "model.layers.1.mlp.experts.down_proj")
    assert Site.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    if family == "qwen2_moe":
        sh = sites["layers.0.mlp.shared"]
        assert (sh.width, sh.module, sh.shared_expert) == (20, "model.layers.0.mlp.shared_expert.down_proj", True)
        assert Site.from_dict(sh.to_dict()) == sh


def test_site_names_of_experts():
    assert parse_site_name("layers.3.mlp.5") == (3, "mlp")
    assert parse_site_expert("layers.3.mlp.5") == 5
    assert parse_site_expert("layers.3.mlp.shared") == "shared"
    assert parse_site_expert("layers.3.attn") is None
    names = ["layers.1.attn", "layers.0.mlp.shared", "layers.0.mlp.10", "layers.0.attn", "layers.0.mlp.2"]
    assert sorted(names, key=site_order_key) == [
        "layers.0.mlp.2", "layers.0.mlp.10", "layers.0.mlp.shared", "layers.0.attn", "layers.1.attn"]
    for bad in ("layers.3.attn.1", "layers.3.mlp.", "layers.3.mlp.x"):
        with pytest.raises(NeurospecError, match="not a site name"):
            parse_site_name(bad)
    with pytest.raises(ValueError, match="expert"):
        Site("layers.0.mlp.1", "mlp", 0, 8, "m", expert=1)  # no fused parameter named


def test_qwen2_moe_dense_layers_keep_a_plain_mlp_site():
    import transformers as T

    from moe_tiny import moe_config

    cfg = moe_config("qwen2_moe")
    cfg.mlp_only_layers = [1]
    sites = find_sites(T.AutoModelForCausalLM.from_config(cfg))
    assert [s.name for s in sites if s.layer == 1] == ["layers.1.mlp", "layers.1.attn"]
    assert sites["layers.1.mlp"].module == "model.layers.1.mlp.down_proj"


def test_unregistered_fused_experts_get_a_clear_error(monkeypatch):
    import neurospec.models.architectures as A

    model = moe_model("mixtral")
    monkeypatch.delitem(A._BY_MODEL_TYPE, "mixtral")
    with pytest.raises(ArchitectureError, match="mixture-of-experts") as err:
        find_sites(model)
    assert "experts='mlp.experts'" in str(err.value)
    assert "mlp_reader='mlp.down_proj', attn_reader" in str(err.value)


def test_cli_sites_on_a_saved_mixtral(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from neurospec.cli import _register, app

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    moe_model("mixtral").save_pretrained(tmp_path / "mix")
    char_tokenizer().save_pretrained(tmp_path / "mix")
    _register()
    r = CliRunner().invoke(app, ["sites", str(tmp_path / "mix"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["family"] == "mixtral"
    assert [s["name"] for s in out["sites"]][:5] == [f"layers.0.mlp.{e}" for e in range(4)] + ["layers.0.attn"]
    assert out["sites"][1]["width"] == FF
    assert (out["sites"][1]["expert"], out["sites"][1]["param"]) == (1, "model.layers.0.mlp.experts.down_proj")
    r = CliRunner().invoke(app, ["sites", str(tmp_path / "mix")])
    assert r.exit_code == 0, r.output
    assert "layers.1.mlp.3" in r.output


# --------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hooked_forward_is_bit_identical_and_restored(family, impl):
    model = moe_model(family, experts_implementation=impl)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ex = _experts(model, 0)
    seen: dict[int, int] = {}
    routed = []
    handles = [add_expert_hook(ex, e, lambda h, e=e: seen.__setitem__(e, seen.get(e, 0) + h.shape[0]))
               for e in range(N_EXPERTS)]
    handles.append(add_routing_hook(ex, lambda idx, w: routed.append(idx.clone())))
    assert "forward" in ex.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    idx = routed[0]
    assert seen == {e: int((idx == e).any(-1).sum()) for e in range(N_EXPERTS)}
    if impl == "eager":  # an editor that changes nothing runs transformers' eager loop itself: same bits
        handles.append(add_expert_hook(ex, 1, lambda h: h, edit=True))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref)
    for h in handles:
        h.remove()
    assert "forward" not in ex.__dict__
    assert ex.forward.__func__ is type(ex).forward


def test_hook_removal_restores_an_existing_instance_forward():
    model = moe_model("olmoe", experts_implementation="eager")
    ex = _experts(model, 1)
    mine = ex.forward
    ex.forward = mine  # an instance forward set by someone else
    h = add_expert_hook(ex, 0, lambda h: None)
    assert ex.__dict__["forward"] is not mine
    h.remove()
    h.remove()  # twice is harmless
    assert ex.__dict__["forward"] is mine


# --------------------------------------------------------------------------------------------- recording


@pytest.fixture
def recorded(tmp_path, monkeypatch, request):
    from neurospec.data.tasks import build_task_data, parse_task_spec

    family, impl = request.param
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(moe_model(family, experts_implementation=impl), char_tokenizer(), name=f"tiny-{family}")
    corpus = write_corpus(tmp_path / "a.txt", seed=1)
    record(loaded, [f"alpha={corpus}"], tmp_path / "run", CFG)
    data = build_task_data(parse_task_spec(f"alpha={corpus}"), loaded.tokenizer, seq_len=CFG.seq_len,
                           collect_tokens=CFG.tokens, eval_tokens=CFG.eval_tokens, seed=CFG.seed)
    blocks = data.collect[: CFG.tokens // CFG.seq_len]
    batches = [blocks[i : i + CFG.batch_size] for i in range(0, blocks.shape[0], CFG.batch_size)]
    return loaded.model, open_run(tmp_path / "run"), _moe_inputs(loaded.model, batches)


@pytest.mark.parametrize("recorded", [(f, "grouped_mm") for f in MOE_FAMILIES] + [("mixtral", "eager")],
                         indirect=True, ids=lambda p: "-".join(p))
def test_recorded_expert_statistics_and_router_usage_equal_brute_force(recorded):
    model, run, inputs = recorded
    stats = run.stats("alpha")
    accs = run.accumulators("alpha")
    usage = routing_usage(accs)
    assert sorted(usage) == [0, 1]
    for layer, x in inputs.items():
        assert x.shape[0] == CFG.tokens
        idx, w = _route(model, layer, x)
        for e in range(N_EXPERTS):
            acts = _expert_acts(model, layer, x, idx, e)
            n = acts.shape[0]
            assert n > 0
            s = stats[f"layers.{layer}.mlp.{e}"]
            assert torch.equal(s["count"], torch.full((FF,), float(n), dtype=torch.float64))
            torch.testing.assert_close(s["mean"], acts.mean(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(s["std"], acts.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(s["max"], acts.max(0).values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["min"], acts.min(0).values, rtol=1e-5, atol=1e-6)
            r = accs[f"layers.{layer}.mlp.{e}"]["routing"].compute()
            assert r["tokens"].item() == CFG.tokens and r["routed"].item() == n
            assert usage[layer]["fraction"][e].item() == n / CFG.tokens
            mean_w = (w * (idx == e)).sum(-1)[(idx == e).any(-1)].double().mean()
            torch.testing.assert_close(usage[layer]["mean_weight"][e], mean_w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(usage[layer]["fraction"].sum(), torch.tensor(float(TOP_K), dtype=torch.float64))
        assert run.reservoir("alpha")[f"layers.{layer}.mlp.0"].shape == (CFG.reservoir, FF)
    if model.config.model_type == "qwen2_moe":  # the shared expert sees every token
        sh = model.model.layers[0].mlp.shared_expert
        x = inputs[0]
        full = (sh.act_fn(sh.gate_proj(x)) * sh.up_proj(x)).double()
        assert stats["layers.0.mlp.shared"]["count"][0] == CFG.tokens
        torch.testing.assert_close(stats["layers.0.mlp.shared"]["mean"], full.mean(0), rtol=1e-4, atol=1e-6)
    for layer in range(2):
        assert "forward" not in _experts(model, layer).__dict__


def test_routing_usage_needs_expert_sites():
    with pytest.raises(NeurospecError, match="no router statistics"):
        routing_usage({"layers.0.mlp": {"stats": object()}})


def test_observe_site_gives_each_expert_its_routed_tokens_only():
    model = moe_model("mixtral", experts_implementation="eager")
    sites = find_sites(model)
    ids = _ids(seed=3)
    x = _moe_inputs(model, [ids])[1]
    idx, _ = _route(model, 1, x)
    got = []
    handles = observe_site(model, sites["layers.1.mlp.3"], lambda h: got.append(h.double()))
    with torch.no_grad():
        model.model(input_ids=ids)
    for h in handles:
        h.remove()
    got, want = torch.cat(got), _expert_acts(model, 1, x, idx, 3)  # rows come by top-k slot, then token

    def by_first_column(t):
        return t[t[:, 0].argsort()]

    assert got.shape == want.shape
    torch.testing.assert_close(by_first_column(got), by_first_column(want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zero_ablation_of_experts_folded_equals_hooked_equals_brute_force(family):
    model = moe_model(family, experts_implementation="eager")
    sites = find_sites(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    ns = NeuronSet.from_ids(["layers.0.mlp.1:3", "layers.0.mlp.1:7", "layers.0.mlp.2:0", "layers.1.mlp.0:5"], sites)
    ids = _ids(seed=1)
    with torch.no_grad():
        with ablated(model, sites, ns, "zero") as info:
            assert info.folded == ("model.layers.0.mlp.experts.down_proj[1]", "model.layers.0.mlp.experts.down_proj[2]",
                                   "model.layers.1.mlp.experts.down_proj[0]")
            folded = model(input_ids=ids).logits
            x = _moe_inputs(model, [ids])
            moe_out = model.model.layers[0].mlp.experts(x[0], *_route(model, 0, x[0]))
        with ablated(model, sites, ns, "zero", fold=False) as info:
            assert info.hooked and not info.folded
            hooked = model(input_ids=ids).logits
            x_h = _moe_inputs(model, [ids])
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, folded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, folded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_h[1], x[1], rtol=1e-5, atol=1e-5)
    by_hand = _moe_by_hand(model, 0, x[0], {1: torch.tensor([3, 7]), 2: torch.tensor([0])})
    torch.testing.assert_close(moe_out.double(), by_hand, rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all("forward" not in _experts(model, i).__dict__ for i in range(2))


def test_constant_ablation_of_an_expert_uses_the_hook_and_permanent_folding_refuses():
    model = moe_model("olmoe", experts_implementation="eager")
    sites = find_sites(model)
    ns = NeuronSet.from_ids(["layers.0.mlp.2:4", "layers.0.mlp.2:9"], sites)
    offsets = {"layers.0.mlp.2": torch.linspace(-1, 1, FF)}
    ids = _ids(seed=2)
    x = _moe_inputs(model, [ids])[0]
    idx, w = _route(model, 0, x)
    ex = _experts(model, 0)
    with torch.no_grad():
        with ablated(model, sites, ns, "mean", offsets=offsets) as info:
            assert info.hooked == ("model.layers.0.mlp.experts.down_proj[2]",) and not info.folded
            out = ex(x, idx, w.to(x.dtype))
    by_hand = _moe_by_hand(model, 0, x, {2: torch.tensor([4, 9])})
    rows = (idx == 2).any(-1)
    w2 = (w * (idx == 2)).sum(-1)[rows].double()
    c = offsets["layers.0.mlp.2"][[4, 9]].double()
    by_hand[rows] += (ex.down_proj[2].double()[:, [4, 9]] @ c)[None, :] * w2[:, None]
    torch.testing.assert_close(out.double(), by_hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(NeurospecError, match="no\\s+bias"):
        fold_ablation(model, sites, ns, offsets, method="mean")
    assert "forward" not in ex.__dict__


def test_permanent_zero_fold_of_an_expert_and_hook_removed_on_error():
    model = moe_model("mixtral", experts_implementation="eager")
    sites = find_sites(model)
    ns = NeuronSet.from_ids(["layers.1.mlp.3:2"], sites)
    down = _experts(model, 1).down_proj
    expected = down.detach().clone()
    expected[3][:, 2] = 0
    with pytest.raises(RuntimeError, match="boom"), ablated(model, sites, ns, "zero", fold=False):
        assert "forward" in _experts(model, 1).__dict__
        raise RuntimeError("boom")
    assert "forward" not in _experts(model, 1).__dict__
    info = fold_ablation(model, sites, ns)
    assert info.folded == ("model.layers.1.mlp.experts.down_proj[3]",)
    assert torch.equal(_experts(model, 1).down_proj, expected)


def test_selection_over_expert_scores_picks_across_experts():
    model = moe_model("qwen2_moe")
    sites = find_sites(model)
    scores = {s.name: torch.zeros(s.width, dtype=torch.float64) for s in sites.of_kind("mlp")}
    scores["layers.1.mlp.3"][5] = 2.0
    scores["layers.0.mlp.shared"][1] = 1.0
    top = NeuronSet.top_k(scores, k=2, sites=sites)
    assert top.to_ids() == ["layers.0.mlp.shared:1", "layers.1.mlp.3:5"]


def test_observers_keep_the_configured_experts_implementation():
    """With observers only, the experts module's own (dispatching) forward makes the output, whatever it is."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    model = moe_model("mixtral", experts_implementation="eager")
    ex = _experts(model, 0)
    eager = type(ex).forward.__wrapped__

    def scaled(self, hidden_states, top_k_index, top_k_weights):  # an implementation that differs from eager
        return 1.5 * eager(self, hidden_states, top_k_index, top_k_weights)

    ALL_EXPERTS_FUNCTIONS["neurospec-test"] = scaled
    try:
        ids = _ids(seed=4)
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            ex.config._experts_implementation = "neurospec-test"
            ref = model(input_ids=ids).logits
            assert not torch.allclose(ref, plain)
            seen = []
            h = add_expert_hook(ex, 2, lambda a: seen.append(a.shape[0]))
            observed = model(input_ids=ids).logits
            h.remove()
    finally:
        del ALL_EXPERTS_FUNCTIONS["neurospec-test"]
    assert torch.equal(observed, ref)
    assert seen and seen[0] > 0


def test_an_expert_without_tokens_is_still_called_every_forward():
    """Every forward reaches every observed expert (with 0 rows if none was routed to it), so collective calls inside
    the accumulators (the histogram range broadcast under torchrun) stay in step across ranks."""
    model = moe_model("olmoe")
    sites = find_sites(model)
    gate = model.model.layers[0].mlp.gate

    def never_three(h):  # the router of layer 0, except that expert 3 is never chosen
        logits = F.linear(h.reshape(-1, h.shape[-1]), gate.weight)
        w, idx = torch.topk(torch.softmax(logits.float().index_fill(-1, torch.tensor([3]), -torch.inf), -1), TOP_K)
        return logits, w.to(h.dtype), idx

    gate.forward = never_three
    rows = []
    handles = observe_site(model, sites["layers.0.mlp.3"], lambda a: rows.append(a.shape), routing=lambda i, w: None)
    with torch.no_grad():
        for seed in range(3):
            model.model(input_ids=_ids(seed=seed))
    for h in handles:
        h.remove()
    assert rows == [torch.Size([0, FF])] * 3


def test_selective_scores_on_expert_sites(tmp_path, monkeypatch):
    """Two recorded tasks on Qwen2-MoE: the abs score of every expert neuron (and the shared expert's) is
    mean|x|_F / (mean|x|_R + 1e-3), the MLP epsilon, and the top neurons ablate through the expert hook."""
    from neurospec.experiments.selective import select
    from neurospec.score.selective import score_neurons

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    loaded = from_module(moe_model("qwen2_moe"), char_tokenizer(), name="tiny-qwen2-moe")
    a = write_corpus(tmp_path / "a.txt", seed=1)
    b = write_corpus(tmp_path / "b.txt", seed=2, words=("one", "two", "three"))
    record(loaded, [f"a={a}", f"b={b}"], tmp_path / "run", CFG)
    run = open_run(tmp_path / "run")
    forget, retain = run.stats("a"), run.merged_stats(["b"])
    scores = score_neurons("abs", forget, retain)
    for site in ("layers.1.mlp.2", "layers.0.mlp.shared"):
        want = forget[site]["mean_abs"] / (run.stats("b")[site]["mean_abs"] + 1e-3)
        torch.testing.assert_close(scores[site], want, rtol=1e-12, atol=0)
    top = select(scores, frac=0.05, attn_frac=0.0, scope="global", sites=loaded.sites)  # selective pruning's pick
    mlp = {s: v for s, v in scores.items() if parse_site_name(s)[1] == "mlp"}
    flat = torch.cat([mlp[s.name] for s in loaded.sites.of_kind("mlp")])
    assert len(top) == int(0.05 * flat.numel()) > 0
    picked = torch.cat([mlp[n][top.indices(n)] for n in top.site_names])
    assert picked.min() >= flat.sort(descending=True).values[len(top) - 1]
    assert any(parse_site_expert(n) is not None for n in top.site_names)
    with ablated(loaded.model, loaded.sites, top, "zero") as info:
        assert info.n_ablated == len(top)


def test_moefication_of_a_routed_expert():
    """MoEfication splits an expert's neurons by its rows of the fused gate_up_proj, and its routing rewrites the
    expert's activations (checked against the MoE layer computed by hand with route_topk applied)."""
    from neurospec.cluster.moefication import expert_features, install_routing, moefy_site, route_topk

    model = moe_model("mixtral", experts_implementation="eager")
    sites = find_sites(model)
    site = sites["layers.0.mlp.2"]
    up = _experts(model, 0).gate_up_proj[2][FF:].double()
    torch.testing.assert_close(torch.as_tensor(expert_features(model, site, "up")),
                               up / up.norm(dim=1, keepdim=True))
    labels = moefy_site(model, site, n_experts=4)
    assert sorted(torch.as_tensor(labels).bincount().tolist()) == [6, 6, 6, 6]
    ids = _ids(seed=5)
    x = _moe_inputs(model, [ids])[0]
    idx, w = _route(model, 0, x)
    ex = _experts(model, 0)
    with torch.no_grad(), install_routing(model, site, labels, k=1):
        out = ex(x, idx, w)
    assert "forward" not in ex.__dict__
    by_hand = _moe_by_hand(model, 0, x)
    rows = (idx == 2).any(-1)
    h = _expert_acts(model, 0, x, idx, 2)
    w2 = (w * (idx == 2)).sum(-1)[rows].double()
    by_hand[rows] += ((route_topk(h, labels, 1) - h) @ ex.down_proj[2].double().T) * w2[:, None]
    torch.testing.assert_close(out.double(), by_hand, rtol=1e-5, atol=1e-6)


def test_resampling_an_expert_from_one_row_equals_setting_that_row():
    model = moe_model("qwen2_moe", experts_implementation="eager")
    sites = find_sites(model)
    ns = NeuronSet.from_ids(["layers.1.mlp.0:1", "layers.1.mlp.0:6", "layers.0.mlp.shared:3"], sites)
    rows = {"layers.1.mlp.0": torch.randn(1, FF), "layers.0.mlp.shared": torch.randn(1, 20)}
    ids = _ids(seed=6)
    with torch.no_grad():
        with ablated(model, sites, ns, "resample", samples=rows) as info:
            assert info.hooked == ("model.layers.0.mlp.shared_expert.down_proj", "model.layers.1.mlp.experts.down_proj[0]")
            resampled = model(input_ids=ids).logits
        with ablated(model, sites, ns, "value", offsets={k: v[0] for k, v in rows.items()}):
            valued = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(resampled, valued, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, valued, rtol=1e-4, atol=1e-4)
    aligned = {"layers.1.mlp.0": torch.randn(2, 10, FF), "layers.0.mlp.shared": torch.randn(2, 10, 20)}
    with pytest.raises(NeurospecError, match="position-aligned"), ablated(model, sites, ns, "resample", samples=aligned):
        pass
    assert "forward" not in _experts(model, 1).__dict__
    assert not model.model.layers[0].mlp.shared_expert.down_proj._forward_pre_hooks


def test_recording_an_expert_that_no_token_reaches(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    model = moe_model("olmoe")
    gate = model.model.layers[1].mlp.gate

    def never_zero(h):  # the router of layer 1, except that expert 0 is never chosen
        logits = F.linear(h.reshape(-1, h.shape[-1]), gate.weight)
        w, idx = torch.topk(torch.softmax(logits.float().index_fill(-1, torch.tensor([0]), -torch.inf), -1), TOP_K)
        return logits, w.to(h.dtype), idx

    gate.forward = never_zero
    loaded = from_module(model, char_tokenizer(), name="tiny-olmoe")
    record(loaded, [f"a={write_corpus(tmp_path / 'a.txt', seed=1)}"], tmp_path / "run", CFG)
    run = open_run(tmp_path / "run")
    s = run.stats("a", "layers.1.mlp.0")
    assert s["count"].eq(0).all() and s["mean"].isnan().all()
    usage = routing_usage(run.accumulators("a"))[1]
    assert usage["fraction"][0] == 0 and usage["mean_weight"][0].isnan()
    torch.testing.assert_close(usage["fraction"].sum(), torch.tensor(2.0, dtype=torch.float64))
    assert run.stats("a", "layers.1.mlp.1")["count"][0] > 0


def test_shuffled_baseline_permutes_each_experts_slices():
    from neurospec.cluster.baselines import shuffle_weights

    model = moe_model("qwen2_moe")
    out = shuffle_weights(model, seed=1)
    for e in range(N_EXPERTS):
        for name in ("gate_up_proj", "down_proj"):
            a, b = getattr(_experts(model, 1), name)[e], getattr(_experts(out, 1), name)[e]
            assert not torch.equal(a, b)
            assert torch.equal(a.reshape(-1).sort().values, b.reshape(-1).sort().values)
    sh, sh_out = model.model.layers[0].mlp.shared_expert, out.model.layers[0].mlp.shared_expert
    assert not torch.equal(sh.down_proj.weight, sh_out.down_proj.weight)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, out.model.layers[0].self_attn.o_proj.weight)


def test_position_aligned_samples_refuse_routed_experts():
    from neurospec.intervene.aligned import position_aligned_samples

    model = moe_model("mixtral")
    with pytest.raises(NeurospecError, match="routed expert site layers.0.mlp.1"):
        position_aligned_samples(model, _ids(), site_names=["layers.0.attn", "layers.0.mlp.1"])
    got = position_aligned_samples(model, _ids(), site_names=["layers.0.attn"])
    assert got["layers.0.attn"].shape == (3, 10, 32)
