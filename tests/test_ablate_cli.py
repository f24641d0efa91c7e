"""`neurospec evaluate` and `neurospec ablate`: JSON contracts, folding to a saved model, and clear errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.intervene.ablate import study_methods

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


def test_ablation_study_json_contract(setup, monkeypatch):
    import neurospec.cli.common as common

    d, tmp = setup
    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setattr(common, "ESTIMATE_ABOVE_S", 0.0)
    counted = []  # every forward pass's tokens, counted at the embedding (the estimate's own passes included)
    embed = torch.nn.Embedding.forward
    monkeypatch.setattr(torch.nn.Embedding, "forward", lambda self, x: counted.append(x.numel()) or embed(self, x))
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--task", "prose", "--task", "dialog",
               "--kind", "attn", "--random-frac", 0.25, "--steps", 2, "--methods", ",".join(study_methods()),
               "--seeds", "0,1", "--tokens", 128, "--seq-len", 32, "--out", tmp / "abl", "--json")
    assert r.exit_code == 0, r.output
    want = (1 + 2 * len(study_methods()) * 2) * 2 * 128  # (baseline + steps x methods x seeds) x 2 tasks x 128
    assert sum(counted) - 2 - 32 == want  # exact in forward-pass tokens (2 + 32: the estimate's own passes)
    line = next(x for x in r.stderr.splitlines() if x.startswith("ablate: this takes about "))
    assert f"about {want:,} forward-pass tokens" in line
    res = json.loads(r.stdout)
    steps = res["steps"]
    assert {s["method"] for s in steps} == set(study_methods())
    assert {s["task"] for s in steps} == {"prose", "dialog"}
    assert sorted({s["fraction"] for s in steps}) == [0.0, 0.25, 0.5]
    for s in steps:
        assert {"fraction", "method", "task", "loss", "top1"} <= set(s)
    assert (tmp / "abl" / "report.html").exists() and (tmp / "abl" / "ablation_methods.png").exists()
    written = json.loads((tmp / "abl" / "ablation.json").read_text())["study_config"]
    assert written == {"type": "AblationStudyConfig", "version": 1, "kind": "attn", "frac_per_step": 0.25,
                       "steps": 2, "methods": list(study_methods()), "seeds": [0, 1], "batch_size": 8,
                       "metric": "auto", "per_neuron": False}


def test_fold_given_neurons_and_save(setup):
    from neurospec.intervene.ablate import ablated
    from neurospec.intervene.neuronset import NeuronSet
    from neurospec.intervene.references import reference_values
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


def test_resample_options_reach_the_hook(setup, monkeypatch):
    """--resample-per-neuron and --resample-align position are passed to the resampling hook, change the result,
    and are recorded in the JSON; position-aligned draws take each token's values from the same position of a
    reference sequence of the task's collection split."""
    from neurospec.intervene import ablate

    d, tmp = setup
    seen = []
    original_init, original_call = ablate._Resampler.__init__, ablate._Resampler.__call__

    def spy_init(self, idx, samples, like, seed, per_neuron):
        original_init(self, idx, samples, like, seed, per_neuron)
        self.ref = samples.float()
        self.cols = idx

    def spy_call(self, x):
        y = original_call(self, x)
        seen.append({"per_neuron": self.per_neuron, "aligned": self.aligned, "ref_shape": tuple(self.ref.shape)})
        if self.aligned:  # ref [n_seq, ref_seq, k]; y [batch, seq, width]
            vals = y[..., self.cols.to(y.device)].float()  # [batch, seq, k]
            for p in range(vals.shape[1]):
                here = self.ref[:, p, :]  # the reference values at position p
                for col in range(vals.shape[2]):
                    assert torch.isin(vals[:, p, col], here[:, col]).all(), f"position {p} drew another position"
            whole = [(self.ref[:, p, :] == vals[b, p]).all(-1).any() for b in range(vals.shape[0])
                     for p in range(vals.shape[1])]  # the token's ablated values are one reference row
            seen[-1]["shared_row"] = float(torch.stack(whole).float().mean())
        return y

    monkeypatch.setattr(ablate._Resampler, "__init__", spy_init)
    monkeypatch.setattr(ablate._Resampler, "__call__", spy_call)
    base = ["ablate", "--model", d, "--reference", tmp / "ref", "--task", "prose", "--kind", "attn",
            "--random-frac", 0.5, "--steps", 1, "--methods", "zero,resample", "--seeds", "3", "--tokens", 128,
            "--seq-len", 32, "--json"]

    def run(*extra):
        seen.clear()
        r = invoke(*base, *extra)
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        loss = [s["loss"] for s in res["steps"] if s["method"] == "resample" and s["fraction"] > 0]
        return res, loss[0], list(seen)

    shared, shared_loss, calls = run()
    assert calls and not any(c["per_neuron"] or c["aligned"] for c in calls)
    assert shared["resample"]["align"] == "random" and shared["resample"]["per_neuron"] is False
    assert all(len(c["ref_shape"]) == 2 for c in calls)  # token rows of the reservoir
    again, again_loss, _ = run()
    assert again_loss == shared_loss  # same seed, same draws
    per, per_loss, calls = run("--resample-per-neuron")
    assert calls and all(c["per_neuron"] and not c["aligned"] for c in calls)
    assert per["resample"]["per_neuron"] is True and per_loss != shared_loss
    pos, pos_loss, calls = run("--resample-align", "position")
    assert calls and all(c["aligned"] and not c["per_neuron"] and c["shared_row"] == 1 for c in calls)
    assert all(c["ref_shape"][1] == 32 for c in calls)  # [n_seq, seq_len, k]
    assert pos["resample"]["align"] == "position" and "collection split of prose" in pos["resample"]["samples"]["prose"]
    assert pos_loss != shared_loss
    both, _, calls = run("--resample-align", "position", "--resample-per-neuron")
    assert calls and all(c["aligned"] and c["per_neuron"] and c["shared_row"] < 0.5 for c in calls)
    r = invoke(*[a if a != "zero,resample" else "zero,mean" for a in base[:-1]], "--resample-per-neuron")
    assert r.exit_code == 2 and "add resample to --methods" in " ".join(r.output.split())
    r = invoke(*base[:-1], "--resample-align", "nearest")
    assert r.exit_code == 2 and "--resample-align must be one of random, position" in " ".join(r.output.split())


def test_fold_with_the_kde_peak(setup):
    """`--peak-method kde` reaches the folded constants: the saved model equals hooking the KDE peaks, and differs
    from the histogram peak's model."""
    from neurospec.intervene.ablate import ablated
    from neurospec.intervene.neuronset import NeuronSet
    from neurospec.intervene.references import reference_values
    from neurospec.models.loading import load_model
    from neurospec.record.store import open_run

    d, tmp = setup
    ids = [f"layers.0.mlp:{i}" for i in range(0, 96, 3)] + [f"layers.1.attn:{i}" for i in range(0, 64, 5)]
    (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
    logits = {}
    orig = load_model(str(d))
    ns = NeuronSet.from_ids(ids, orig.sites)
    x = torch.randint(2, 97, (2, 16))
    for how in ("kde", "histogram"):
        r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--neurons", tmp / "ids.txt", "--method",
                   "peak", "--peak-method", how, "--peak-bandwidth", 0.3, "--save", tmp / how, "--json")
        assert r.exit_code == 0, r.output
        saved = load_model(str(tmp / how))
        with torch.no_grad():
            logits[how] = saved.model(input_ids=x).logits
    offsets, _ = reference_values(open_run(tmp / "ref"), "prose", ["peak"], peak_method="kde", peak_bandwidth=0.3)
    with torch.no_grad(), ablated(orig.model, orig.sites, ns, "peak", offsets=offsets["peak"], fold=False):
        want = orig.model(input_ids=x).logits
    torch.testing.assert_close(logits["kde"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["kde"], logits["histogram"], rtol=1e-5, atol=1e-5)
    r = invoke("ablate", "--model", d, "--reference", tmp / "ref", "--neurons", tmp / "ids.txt", "--method", "peak",
               "--peak-method", "mode", "--save", tmp / "bad")
    assert r.exit_code == 2 and "--peak-method" in r.output


def test_reference_values_read_the_reservoir_only_for_resample(setup, monkeypatch):
    """The reservoir's samples are the largest part of a run file: mean and peak offsets must not read them."""
    from neurospec.intervene.references import reference_values
    from neurospec.record.store import Run, open_run

    _, tmp = setup
    asked = []
    real = Run.accumulators

    def spy(self, task, names=None):
        asked.append(names)
        return real(self, task, names)

    monkeypatch.setattr(Run, "accumulators", spy)
    run = open_run(tmp / "ref")
    offsets, samples = reference_values(run, "prose", ["mean", "peak"])
    assert asked == [("stats",)] and samples is None and set(offsets) == {"mean", "peak"}
    _, samples = reference_values(run, "prose", ["resample"])
    assert "reservoir" in asked[-1] and samples
