"""The ``skills`` command on a tiny saved model: JSON contract, soft prompts reused, clear errors."""

import json

from typer.testing import CliRunner

from neurospec.cli import _register, app

_register()
runner = CliRunner()


def _csv(path, a, b, n=10):
    rows = [f"{a} {i} {'x' * (i % 3)},{a}" for i in range(n)] + [f"{b} {i} {'y' * (i % 3)},{b}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _invoke(*args):
    return runner.invoke(app, ["skills", *[str(a) for a in args]])


def test_skills_json_contract_and_soft_prompt_reuse(model_dir, tmp_path, monkeypatch):
    import neurospec.cli.common as cli_common

    one, two = _csv(tmp_path / "one.csv", "apple", "zebra"), _csv(tmp_path / "two.csv", "moon", "rock")
    common = ["--model", model_dir, "--task", f"fruit={one}", "--task", f"space={two}", "--p", 0.1, "--ps", "0.1",
              "--methods", "zero", "--batch-size", 8, "--json"]
    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)
    monkeypatch.setattr(cli_common, "ESTIMATE_ABOVE_S", 0.0)
    r = _invoke(*common, "--out", tmp_path / "hard")
    assert r.exit_code == 0, r.output
    # the estimate before the work: per task 12 + 4 examples once, the 4 test examples 1 + 1 x 1 x (1 + 20) times
    line = next(x for x in r.stderr.splitlines() if x.startswith("skills: this takes about "))
    assert "forward-pass tokens" in line
    from neurospec.cli.skills import skills_examples
    from neurospec.data.labelled import load_labelled
    from neurospec.experiments.skills import SkillsConfig

    assert skills_examples(SkillsConfig(ps=(0.1,), methods=("zero",)), load_labelled(f"fruit={one}")) == 12 + 4 + 4 * 22
    assert r.stderr.index(line) < r.stderr.index("skills fruit")  # said before the first task starts
    monkeypatch.setenv("NEUROSPEC_NO_PROGRESS", "1")
    res = json.loads(r.stdout)
    assert res["tasks"]["fruit"] | {"licence": None} == {"classes": ["apple", "zebra"], "train": 12, "dev": 4,
                                                         "test": 4, "licence": None}
    assert set(res["predictivity"]) == {"layers.0.mlp", "layers.1.mlp"}
    assert set(res["predictivity"]["layers.0.mlp"]) == {"fruit", "space"}
    ids = res["skill_neurons"]["fruit"]
    assert len(ids) == 2 * round(0.1 * 96) and ids[0].startswith("layers.0.mlp:") and ids[-1].startswith("layers.1.mlp:")
    row = res["perturbation"]["space"][0]
    assert {"p", "method", "skill_acc", "random_acc_mean", "pvalue"} <= set(row) and row["method"] == "zero"
    assert res["similarity"]["tasks"] == ["fruit", "space"] and len(res["similarity"]["overlap"]) == 2
    assert (tmp_path / "hard" / "skills.json").is_file() and (tmp_path / "hard" / "scores" / "fruit.safetensors").is_file()

    soft = ["--model", model_dir, "--task", f"fruit={one}", "--prompt", "soft", "--seeds", 2, "--epochs", 1,
            "--prompt-length", 4, "--ps", "0.1", "--methods", "noise", "--batch-size", 12, "--json",
            "--out", tmp_path / "soft"]
    r = _invoke(*soft)
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert [a["reused"] for a in first["accuracy"]["fruit"]] == [False, False]
    r = _invoke(*soft)
    again = json.loads(r.stdout)
    assert [a["reused"] for a in again["accuracy"]["fruit"]] == [True, True]
    assert again["skill_neurons"] == first["skill_neurons"]


def test_skills_errors_are_one_line(model_dir, tmp_path):
    one = _csv(tmp_path / "one.csv", "apple", "zebra")
    r = _invoke("--model", model_dir, "--task", f"fruit={one}", "--verbaliser", "apple=yes", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "'yes' is not a single token" in r.output and "Traceback" not in r.output
    small = _csv(tmp_path / "small.csv", "apple", "zebra", n=4)
    r = _invoke("--model", model_dir, "--task", f"s={small}", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "at least 8 distinct examples" in r.output
