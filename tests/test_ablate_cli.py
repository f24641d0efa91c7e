"""`neurospec evaluate` and `neurospec ablate`: JSON contracts, folding to a saved model, and clear errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app

from tiny import save_tiny_lm

_register()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def setup(model_dir, tmp_path):
    d = model_dir
    r = invoke("record", "--model", d, "--task", "prose", "--task", "dialog", "--tokens", 512, "--eval-tokens", 128,
               "--seq-len", 32, "--batch-size", 4, "--reservoir", 64, "--out", tmp_path / "ref", "--json")
    assert r.exit_code == 0, r.output
    return d, tmp_path


def test_evaluate_json_contract(setup):
    d, tmp = setup
    r = invoke("evaluate", "--model", d, "--task", "prose", "--task", "dialog", "--tokens", 128, "--seq-len", 32,
               "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res) == {"prose", "dialog"}
    for m in res.values():
        assert set(m) == {"metric", "top1", "top10", "skip_top1", "loss", "perplexity", "tokens", "nonfinite"}
        assert m["metric"] == "next-token top-1" and m["nonfinite"] == 0
        assert m["perplexity"] == pytest.approx(torch.tensor(m["loss"]).exp().item(), rel=1e-6)
        assert 0 <= m["top1"] <= m["top10"] <= 1


def test_ablation_study_json_contract(setup):
    d, tmp = setup
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--task", "prose", "--task", "dialog",
               "--kind", "attn", "--random-frac", 0.25, "--steps", 2, "--methods", "zero,mean,peak,resample",
               "--seeds", "0,1", "--tokens", 128, "--seq-len", 32, "--out", tmp / "abl", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    steps = res["steps"]
    assert {s["method"] for s in steps} == {"zero", "mean", "peak", "resample"}
    assert {s["task"] for s in steps} == {"prose", "dialog"}
    assert sorted({s["fraction"] for s in steps}) == [0.0, 0.25, 0.5]
    for s in steps:
        assert {"fraction", "method", "task", "loss", "top1"} <= set(s)
    assert (tmp / "abl" / "report.html").exists() and (tmp / "abl" / "ablation_methods.png").exists()


def test_fold_given_neurons_and_save(setup):
    from neurospec.experiments.references import reference_values
    from neurospec.intervene.ablate import ablated
    from neurospec.intervene.neuronset import NeuronSet
    from neurospec.models.loading import load_model
    from neurospec.record.store import open_run

    d, tmp = setup
    ids = ["layers.0.mlp:3", "layers.1.mlp:40", "layers.1.attn:7"]
    (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--neurons", tmp / "ids.txt", "--method", "mean",
               "--save", tmp / "pruned", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_ablated"] == 3
    import transformers as T

    saved = T.AutoModelForCausalLM.from_pretrained(tmp / "pruned").eval()
    orig = load_model(str(d))
    offsets, _ = reference_values(open_run(tmp / "ref"), "prose", ["mean"])
    ns = NeuronSet.from_ids(ids, orig.sites)
    x = torch.randint(2, 97, (2, 16))
    with torch.no_grad(), ablated(orig.model, orig.sites, ns, "mean", offsets=offsets["mean"], fold=False):
        want = orig.model(input_ids=x).logits
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs(setup, tmp_path):
    d, tmp = setup
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--task", "prose", "--random-frac", 1.5,
               "--tokens", 128, "--seq-len", 32)
    assert r.exit_code == 2 and "random-frac" in r.output
    other = tmp / "other"
    save_tiny_lm(other, seed=5)
    r = invoke("ablate", "--model", other, "--reference", tmp / "ref", "--task", "prose", "--tokens", 128,
               "--seq-len", 32)
    assert r.exit_code == 2 and "another model" in r.output
    (tmp / "bad.txt").write_text("layers.0.mlp:96\n")
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--neurons", tmp / "bad.txt", "--save", tmp / "x")
    assert r.exit_code == 2 and "layers.0.mlp:96" in r.output
    r = invoke("record", "--model", d, "--task", "prose", "--tokens", 256, "--seq-len", 32, "--reservoir", 0,
               "--out", tmp / "nores")
    assert r.exit_code == 0, r.output
    r = invoke("ablate", "--model", d, "--reference", tmp / "nores", "--task", "prose", "--methods", "resample",
               "--tokens", 128, "--seq-len", 32)
    assert r.exit_code == 2 and "--reservoir" in r.output
