"""``neurospec skills`` with the optional studies: --prune, --save-pruned, --agreement, --beyond."""

import json

import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.models.loading import load_model

_register()
runner = CliRunner()


def _csv(path, a, b, n=10):
    rows = [f"{a} {i} {'x' * (i % 3)},{a}" for i in range(n)] + [f"{b} {i} {'y' * (i % 3)},{b}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_skills_studies_json_contract_and_saved_pruned_model(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setenv("NEUROSPEC_PROGRESS_EVERY", "0")
    one = _csv(tmp_path / "one.csv", "apple", "zebra")
    r = runner.invoke(app, ["skills", "--model", str(model_dir), "--task", f"fruit={one}", "--p", "0.1", "--ps",
                            "0.1", "--methods", "zero", "--batch-size", "8", "--prune", "--prune-keeps", "0.1",
                            "--save-pruned", str(tmp_path / "pruned"), "--agreement", "--beyond", "lora",
                            "--beyond-epochs", "1", "--json", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    # each study says when it starts, and the perturbation of the tuned model counts its steps
    for label in ("pruning fruit: 0/1", "agreement fruit: 0/1", "lora tuning fruit: 0/1", "lora: perturb fruit",
                  "lora tuning fruit: 2/2 (100%)"):
        assert label in r.stderr, (label, r.stderr)
    res = json.loads(r.stdout)
    assert [(row["task"], row["keep"], row["n_kept"]) for row in res["pruning"]] == [("fruit", 0.1, 20)]
    assert {"keep", "skill_acc", "random_acc_mean", "pvalue"} <= set(res["pruning"][0])
    a = res["agreement"]["fruit"]
    assert {"overlap", "chance", "pvalue"} <= set(a) and a["n"] == 2 * round(0.1 * 96)
    assert abs(a["chance"] - 10 / 96) < 1e-12  # sum_l k_l^2 / W_l / sum_l k_l with k_l = 10 of 96
    row = res["beyond"]["fruit"][0]
    assert {"p", "method", "skill_acc", "random_acc_mean", "pvalue"} <= set(row) and row["tuning"] == "lora"
    saved = json.loads((tmp_path / "run" / "skills.json").read_text())
    assert saved["pruning"] == res["pruning"] and saved["beyond"] == res["beyond"]
    # the saved pruned model is a plain model directory that load_model reads
    back = load_model(str(tmp_path / "pruned"), device="cpu")
    orig = load_model(str(model_dir), device="cpu")
    x = torch.randint(2, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(back.model(input_ids=x).logits, orig.model(input_ids=x).logits)
    assert res["pruned_model"]["n_kept"] == 2 * round(0.1 * 96)


def test_skills_studies_errors_are_one_line(model_dir, tmp_path):
    one, two = _csv(tmp_path / "one.csv", "apple", "zebra"), _csv(tmp_path / "two.csv", "moon", "rock")
    base = ["skills", "--model", str(model_dir), "--task", f"fruit={one}", "--out", str(tmp_path / "o")]
    r = runner.invoke(app, [*base, "--beyond", "full"])
    assert r.exit_code == 2 and "beyond must be one of" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*base, "--task", f"space={two}", "--save-pruned", str(tmp_path / "p")])
    assert r.exit_code == 2 and "one task" in r.output
    r = runner.invoke(app, [*base, "--beyond", "bias"])
    assert r.exit_code == 2 and "no bias to tune" in r.output
