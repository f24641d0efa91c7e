"""`neurospec sparsify`: the JSON contract, the saved model, and one-line errors (tiny model saved to disk)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app

_register()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_sparsify_json_contract_and_saved_model(model_dir, tmp_path):
    from neurospec.evaluate import evaluate_lm
    from neurospec.models.linear import weight_out_in
    from neurospec.models.loading import load_model

    r = invoke("sparsify", "--model", model_dir, "--method", "sparsegpt", "--pattern", "2:4", "--calib-task", "prose",
               "--calib-tokens", 128, "--eval-task", "prose", "--eval-task", "dialog", "--eval-tokens", 64,
               "--seq-len", 16, "--batch-size", 4, "--layers", "1", "--save", tmp_path / "sparse", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"method", "sparsity", "pattern", "layers", "perplexity", "seconds"} <= set(res)
    assert (res["method"], res["sparsity"], res["pattern"]) == ("sparsegpt", 0.5, "2:4")
    assert len(res["layers"]) == 7 and all(k.startswith("layers.1.") for k in res["layers"])
    assert all(v == pytest.approx(0.5) for v in res["layers"].values())
    assert set(res["perplexity"]) == {"prose", "dialog"}
    assert res["calibration"] == {"task": "prose", "tokens": 128, "seq_len": 16}
    dense = load_model(model_dir)
    saved = load_model(res["saved"])
    w = weight_out_in(saved.model.model.layers[1].mlp.down_proj)
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.equal(saved.model.model.layers[0].mlp.down_proj.weight, dense.model.model.layers[0].mlp.down_proj.weight)
    from neurospec.data.tasks import build_task_data

    blocks = build_task_data("prose", dense.tokenizer, seq_len=16, collect_tokens=0, eval_tokens=64).eval
    for model, key in ((dense, "dense"), (saved, "sparse")):
        ppl = evaluate_lm(model, blocks, batch_size=4)["perplexity"]
        assert res["perplexity"]["prose"][key] == pytest.approx(ppl, rel=1e-5)


def test_sparsify_out_writes_a_result_the_report_shows(model_dir, tmp_path):
    """--out claims the directory and writes sparsify.json (the printed JSON); another configuration there is refused
    without --force; `neurospec report` draws a perplexity section from it."""
    from neurospec.record import layout

    out = tmp_path / "sp"
    args = ["sparsify", "--model", model_dir, "--method", "magnitude", "--sparsity", 0.5, "--calib-tokens", 32,
            "--eval-task", "prose", "--eval-task", "dialog", "--eval-tokens", 32, "--seq-len", 16, "--out", out]
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert json.loads((out / layout.SPARSIFY).read_text()) == res
    assert layout.read_claim(out)["command"] == "sparsify"
    r = invoke(*args[:-2], "--sparsity", 0.3, "--out", out)
    assert r.exit_code == 2 and "--force" in r.output
    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    html = (out / layout.REPORT).read_text()
    assert "Sparsification: perplexity" in html and "magnitude unstructured" in html
    assert html.count("data:image/png;base64,") == 1 and (out / layout.FIGURES / "sparsify_perplexity.svg").exists()
    for task in ("prose", "dialog"):
        p = res["perplexity"][task]
        assert f"<td>{task}</td><td>{p['dense']:.4g}</td><td>{p['sparse']:.4g}</td>" in html
    r = invoke(*args[:-2], "--sparsity", 0.3, "--out", out, "--force", "--json")
    assert r.exit_code == 0, r.output
    assert not (out / layout.REPORT).exists() and json.loads((out / layout.SPARSIFY).read_text())["sparsity"] == 0.3


def test_sparsify_magnitude_unstructured_human_output(model_dir):
    r = invoke("sparsify", "--model", model_dir, "--method", "magnitude", "--sparsity", 0.3, "--calib-tokens", 32,
               "--eval-tokens", 32, "--seq-len", 16, "--layers", "layers.0.mlp.down_proj,layers.1.self_attn.o_proj")
    assert r.exit_code == 0, r.output
    assert "magnitude unstructured (sparsity 0.3): 2 linear modules" in r.stdout and "perplexity" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "magnitude", "--sparsity", 1.5], "[0, 1)"),
    (["--method", "magnitude", "--pattern", "4:2"], "1 <= N < M"),
    (["--method", "magnitude", "--pattern", "2:5"], "not a multiple of the N:M group size"),
    (["--method", "sparsegpt", "--calib-tokens", 32], "at least 96 calibration tokens"),
    (["--method", "magnitude", "--layers", "layers.0.mlp"], "not a linear module"),
    (["--method", "magnitude", "--layers", "layers.0.mlp.gate"], "no linear module 'layers.0.mlp.gate'"),
    (["--method", "obs"], "'obs' is not one of"),
])
def test_sparsify_errors_are_one_clear_line(model_dir, args, message):
    r = invoke("sparsify", "--model", model_dir, "--seq-len", 16, "--eval-tokens", 16, *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.replace("│", " ").split())
    assert message in text and "Traceback" not in text
    if "obs" in args:
        from neurospec.sparsity import methods

        assert all(f"'{name}'" in text for name in methods())  # the choices come from the registry


def test_sparsify_expand_json_contract(model_dir, tmp_path):
    from neurospec.record import layout

    r = invoke("sparsify", "--model", model_dir, "--method", "sparsegpt", "--expand", "--clusters", 2,
               "--calib-tokens", 256, "--eval-tokens", 64, "--seq-len", 16, "--batch-size", 8, "--layers", "1",
               "--out", tmp_path / "ex", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert json.loads((tmp_path / "ex" / layout.SPARSIFY).read_text()) == res  # --out also with --expand
    assert {"method", "sparsity", "pattern", "layers", "perplexity", "seconds", "expansion", "expansion_error"} <= set(res)
    assert (res["method"], res["sparsity"], res["pattern"]) == ("sparsegpt", 0.5, "unstructured")
    mlp = ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    assert sorted(res["layers"]) == sorted(mlp) and all(v == pytest.approx(0.5) for v in res["layers"].values())
    ex = res["expansion"]
    assert ex["clusters"] == 2 and ex["pca_dims"] == {mlp[0]: 2, mlp[1]: 2, mlp[2]: 3}
    assert all(s["min"] + s["max"] == 256 for s in ex["cluster_tokens"].values())  # two clusters share the tokens
    assert ex["extra_parameters"] == 3 * 64 * 96
    p = res["perplexity"]["prose"]
    assert {"dense", "sparse", "plain_sparsegpt"} == set(p) and p["sparse"] != p["plain_sparsegpt"]
    errs = res["expansion_error"]["modules"]
    assert sorted(errs) == sorted(mlp)
    assert all({"error_plain", "error_expanded", "spearman", "reduction_top", "reduction_rest"} <= set(e)
               for e in errs.values())


@pytest.mark.parametrize("args,message", [
    (["--method", "wanda", "--expand"], "does not work with --method wanda"),
    (["--method", "sparsegpt", "--expand", "--clusters", 0], "clusters must be a positive integer"),
    (["--method", "sparsegpt", "--expand", "--clusters", 64, "--calib-tokens", 32], "at least as many calibration"),
    (["--method", "sparsegpt", "--expand", "--save", "x"], "--save does not work with --expand"),
    (["--method", "sparsegpt", "--expand", "--pca-div", 65, "--calib-tokens", 128], "pca_div 65 is larger than the "
                                                                                     "input width 64"),
    (["--method", "sparsegpt", "--expand", "--calib-tokens", 128, "--layers", "layers.0.self_attn.q_proj"],
     "not an MLP linear module"),
])
def test_sparsify_expand_errors_are_one_clear_line(model_dir, args, message):
    r = invoke("sparsify", "--model", model_dir, "--seq-len", 16, "--eval-tokens", 16, *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.replace("│", " ").split())
    assert message in text and "Traceback" not in text
