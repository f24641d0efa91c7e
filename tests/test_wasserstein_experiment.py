"""The Wasserstein-neuron experiment: selections, the random p-value, rows pruned, and the CLI's JSON contract."""

import json

import pytest
import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.experiments.wasserstein import (
    SELECTIONS,
    make_selections,
    random_pvalue,
    row_experiment,
    wasserstein_scores,
)
from neurospec.models.linear import weight_out_in
from neurospec.sparsity.wasserstein import top_count

from tiny import tiny_model

_register()


def _blocks(n, seq=16, seed=0):
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_random_pvalue_counts_draws_at_least_as_bad():
    draws = [0.1, 0.5, 0.2, 0.5, 0.9]
    assert random_pvalue(0.5, draws) == pytest.approx((3 + 1) / (5 + 1))
    assert random_pvalue(1.0, draws) == pytest.approx(1 / 6)
    assert random_pvalue(0.0, draws) == pytest.approx(1.0)


def test_selections_have_the_per_layer_counts_and_pick_by_their_statistic():
    model = tiny_model("llama")
    scores = wasserstein_scores(model, _blocks(4))
    sel = make_selections(model, scores, fraction=0.05, draws=4, seed=1)
    assert set(sel.fixed) == set(SELECTIONS) and len(sel.random) == 4
    for name, sc in scores.items():
        k = top_count(sc.w1.numel(), 0.05)
        assert k == 5 and sel.counts[name] == k  # round(0.05 * 96)
        for rows in [*(s[name] for s in sel.fixed.values()), *(r[name] for r in sel.random)]:
            assert rows.numel() == k and rows.unique().numel() == k
        w1 = sc.w1
        assert w1[sel.fixed["wasserstein"][name]].min() >= w1.sort(descending=True).values[k - 1]
        var = sc.var
        assert var[sel.fixed["variance"][name]].min() >= var.sort(descending=True).values[k - 1]
        norms = weight_out_in(model.get_submodule(name.replace("layers.", "model.layers."))).norm(dim=1)
        assert set(sel.fixed["weight_norm"][name].tolist()) == set(norms.topk(k).indices.tolist())
    assert not all(torch.equal(sel.random[0][n], sel.random[1][n]) for n in scores)  # draws differ


def test_row_experiment_prunes_only_the_selected_rows(monkeypatch):
    import neurospec.experiments.wasserstein as W

    model = tiny_model("llama")
    calib, ev = _blocks(8), _blocks(2, seed=1)
    scores = wasserstein_scores(model, calib, layers=[1])
    seen = []
    real = W.sparsify

    def spy(*args, **kw):
        res = real(*args, **kw)
        seen.append((kw["rows"], res.model))
        return res

    monkeypatch.setattr(W, "sparsify", spy)
    out = row_experiment(model, scores, calib, ev, patterns=["2:4"], fraction=0.03, draws=2)
    assert set(out["patterns"]["2:4"]) == {*SELECTIONS, "random"}
    assert len(seen) == 2 + len(SELECTIONS)
    sel = make_selections(model, scores, fraction=0.03, draws=2, seed=0)  # the same seed: the same draws
    expected = [*sel.random, *sel.fixed.values()]
    assert [{n: r.tolist() for n, r in rows.items()} for rows, _ in seen] == \
        [{n: r.tolist() for n, r in rows.items()} for rows in expected]
    for rows, sparse in seen:
        for name, idx in rows.items():
            path = name.replace("layers.", "model.layers.")
            d, s = weight_out_in(model.get_submodule(path)), weight_out_in(sparse.get_submodule(path))
            changed = (d != s).any(1).nonzero().reshape(-1)
            assert set(changed.tolist()) <= set(idx.tolist()) and idx.numel() == 3
            assert ((s[idx] == 0).reshape(idx.numel(), -1, 4).sum(-1) >= 2).all()
    r = out["patterns"]["2:4"]
    assert r["random"]["draws"] and r["wasserstein"]["pvalue"] == random_pvalue(r["wasserstein"]["delta_loss"],
                                                                                  r["random"]["draws"])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_json_contract_and_figures(model_dir, tmp_path, monkeypatch):
    import neurospec.cli.common as common
    from neurospec.experiments.wasserstein import experiment_tokens

    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setattr(common, "ESTIMATE_ABOVE_S", 0.0)
    counted = []  # every forward pass's tokens, counted at the embedding (the estimate's own pass included)
    embed = torch.nn.Embedding.forward
    monkeypatch.setattr(torch.nn.Embedding, "forward", lambda self, x: counted.append(x.numel()) or embed(self, x))
    r = invoke("wasserstein", "--model", model_dir, "--task", "prose", "--tokens", 128, "--seq-len", 16,
               "--batch-size", 4, "--layers", "1", "--experiment", "--patterns", "2:4", "--draws", 2,
               "--eval-tokens", 32, "--out", tmp_path / "w", "--json")
    assert r.exit_code == 0, r.output
    want = experiment_tokens(128, 32, 16, 1, 2)
    assert sum(counted) - 2 - 16 == want  # the estimate is exact in forward-pass tokens (2 + 16: its own passes)
    # every sparsified model reports its step: 1 pattern x (2 draws + 4 selections), then 3 methods
    assert "rows 2:4 random: 1/6" in r.stderr and "rows 2:4 weight_norm: 6/6 (100%)" in r.stderr, r.stderr
    assert "methods 2:4 sparsegpt: 3/3 (100%)" in r.stderr, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("wasserstein: this takes about "))
    assert f"about {want:,} forward-pass tokens" in line and "6 sparsified models of the row experiment" in line
    res = json.loads(r.stdout)
    assert set(res["scores"]) == {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"}
    for s in res["scores"].values():
        assert {"mean", "max", "top"} <= set(s) and len(s["top"]) == 3 and s["max"] >= s["mean"]
    assert set(res["experiment"]) == {*SELECTIONS, "random"}
    for v in res["experiment"].values():
        assert set(v) == {"delta_loss", "pvalue"}
    assert res["experiment"]["random"]["pvalue"] is None
    assert 0 < res["experiment"]["wasserstein"]["pvalue"] <= 1
    assert {"magnitude", "wanda", "sparsegpt"} == set(res["methods"]["patterns"]["2:4"])
    assert (tmp_path / "w" / "w1_distribution.png").exists() and (tmp_path / "w" / "error_vs_w1.png").exists()
    assert json.loads((tmp_path / "w" / "wasserstein.json").read_text())["scores"] == res["scores"]
    # `neurospec report` of the directory: W1 per layer, the experiment with the error scatter, the method ordering
    r = invoke("report", tmp_path / "w")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "w" / "report.html").read_text()
    for title in ("Wasserstein neurons: W1 per layer", "Wasserstein neurons: sparsifying the selected rows",
                  "Sparsification methods: perplexity"):
        assert f"<h2>{title}</h2>" in html
    assert html.count("data:image/png;base64,") == 3  # W1 histograms, error vs W1, perplexity per method
    ppl = res["methods"]["patterns"]["2:4"]
    assert f"<td>2:4</td><td>{ppl['magnitude']:.4g}</td><td>{ppl['wanda']:.4g}</td>" in html
    assert f"<td>wasserstein</td><td>{res['experiment']['wasserstein']['delta_loss']:.4g}</td>" in html


@pytest.mark.parametrize("args, message", [
    (["--layers", "layers.0.mlp.act_fn"], "not a linear module"),
    (["--layers", "layers.0.mlp.nothing"], "no linear module"),
    (["--tokens", 8, "--seq-len", 8], "at least 16 tokens"),
    (["--top", 0], "--top"),
    (["--patterns", "3:2"], "N:M"),
    (["--hist-every", 0], "--hist-every"),
])
def test_cli_bad_input_is_one_clear_line(model_dir, args, message):
    r = invoke("wasserstein", "--model", model_dir, "--task", "prose", "--seq-len", 16, "--tokens", 64, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_headless_encoder_is_judged_by_representation_distance(monkeypatch):
    """An encoder without a language-model head: the row experiment and the method ordering measure the cosine
    distance of the final hidden states to the dense model's (checked directly), not a loss it cannot compute."""
    import neurospec.experiments.wasserstein as W

    model = tiny_model("bert", head=False)
    calib, ev = _blocks(8), _blocks(2, seed=1)
    scores = wasserstein_scores(model, calib, layers=[1])
    pruned = []
    real = W.sparsify

    def spy(*args, **kw):
        res = real(*args, **kw)
        pruned.append(res.model)
        return res

    monkeypatch.setattr(W, "sparsify", spy)
    out = row_experiment(model, scores, calib, ev, patterns=["50%"], fraction=0.5, draws=2)
    assert out["metric"] == "cosine_distance" and out["dense_loss"] == pytest.approx(0.0, abs=1e-6)

    def distance(net):
        with torch.no_grad():
            a, b = model(input_ids=ev).last_hidden_state, net(input_ids=ev).last_hidden_state
        return float((1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)).mean())

    r = out["patterns"]["50%"]
    expected = [distance(m) for m in pruned]
    assert r["random"]["draws"] == pytest.approx(expected[:2], rel=1e-4, abs=1e-9)
    assert [r[s]["delta_loss"] for s in SELECTIONS] == pytest.approx(expected[2:], rel=1e-4, abs=1e-9)
    assert min(expected) > 1e-6  # pruning moved the representation (float32 rounding is about 1e-7)
    order = W.method_ordering(model, calib, ev, patterns=["50%"], methods=("magnitude",))
    assert order["metric"] == "cosine_distance" and order["patterns"]["50%"]["magnitude"] > 1e-6


def test_cli_hist_every_bins_a_quarter_of_the_tokens(model_dir, tmp_path):
    """``--hist-every 4`` is in the JSON and changes the scores (the histograms hold a quarter of the tokens)."""
    args = ["wasserstein", "--model", model_dir, "--task", "prose", "--tokens", 256, "--seq-len", 16, "--layers",
            "1", "--json"]
    one, four = invoke(*args), invoke(*args, "--hist-every", 4)
    assert one.exit_code == 0 and four.exit_code == 0, (one.output, four.output)
    a, b = json.loads(one.stdout), json.loads(four.stdout)
    assert (a["hist_every"], b["hist_every"]) == (1, 4)
    assert a["scores"].keys() == b["scores"].keys()
    assert any(a["scores"][k]["mean"] != b["scores"][k]["mean"] for k in a["scores"])
