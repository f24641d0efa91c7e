"""The skill pipeline end to end on an encoder without an LM head (linear probe) and on a ViT (digits), and the
command-line options of the random baseline and the soft prompt's learning rate."""

import json

import torch
from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.data.labelled import load_labelled, make_labelled
from neurospec.experiments.skills import SkillsConfig, run_skills
from neurospec.models.loading import from_module
from neurospec.skills.soft import SoftPromptConfig

from tiny import char_tokenizer, tiny_model

CONTRACT = ("tasks", "predictivity", "skill_neurons", "perturbation", "similarity")
_register()


def _contract(res, sites, task, readout):
    for key in CONTRACT:
        assert key in res
    assert set(res["predictivity"]) == set(sites) and res["readout"] == {task: readout}
    assert {r["method"] for r in res["perturbation"][task]} == {"zero"}
    assert res["similarity"]["tasks"] == [task]
    assert all(n.split(":")[0] in sites for n in res["skill_neurons"][task])


def test_encoder_without_lm_head_hard_and_soft_prompts(tmp_path):
    loaded = from_module(tiny_model("bert", head=False), char_tokenizer())
    texts = [f"def f{i}(): pass" for i in range(10)] + [f"int f{i}() {{ }}" for i in range(10)]
    task = make_labelled("code", texts, ["python"] * 10 + ["c"] * 10, seed=0)
    sites = [s.name for s in loaded.sites.of_kind("mlp")]
    kw = dict(p=0.1, ps=(0.1,), methods=("zero",), batch_size=8)
    hard = run_skills(loaded, [task], tmp_path / "hard", SkillsConfig(**kw))
    _contract(hard, sites, "code", "probe")
    soft = run_skills(loaded, [task], tmp_path / "soft", SkillsConfig(
        prompt="soft", soft=SoftPromptConfig(length=4, epochs=1, batch_size=6), **kw))
    _contract(soft, sites, "code", "probe")
    assert soft["accuracy"]["code"][0]["prompt"] == "soft" and "linear head" in soft["notes"][0]
    assert (tmp_path / "soft" / "prompts" / "code" / "seed0" / "probe.safetensors").is_file()


def test_vit_on_digit_classes_with_its_own_head_and_random_baseline(tmp_path):
    loaded = from_module(tiny_model("vit"))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    task = load_labelled("digits?per_class=12")
    assert task.kind == "image" and list(task.classes) == [str(k) for k in range(10)]
    res = run_skills(loaded, [task], tmp_path, SkillsConfig(p=0.1, ps=(0.1,), methods=("zero",), batch_size=32,
                                                            perturb_examples=2, random_baseline=True))
    _contract(res, [s.name for s in loaded.sites.of_kind("mlp")], "digits", "model-head")
    assert {r["n_examples"] for r in res["perturbation"]["digits"]} == {20}
    assert res["random_baseline"]["tasks"]["digits"]["all"]["n_top"] == 2 * round(0.1 * 96)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def _csv(path, a, b, n=10):
    rows = [f"{a} {i} {'x' * (i % 3)},{a}" for i in range(n)] + [f"{b} {i} {'y' * (i % 3)},{b}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_cli_random_baseline_and_prompt_lr(model_dir, tmp_path):
    one = _csv(tmp_path / "one.csv", "apple", "zebra")
    r = CliRunner().invoke(app, ["skills", "--model", str(model_dir), "--task", f"fruit={one}", "--prompt", "soft",
                                 "--epochs", "1", "--prompt-length", "4", "--prompt-lr", "0.05", "--p", "0.1",
                                 "--ps", "0.1", "--methods", "zero", "--random-baseline", "--random-seed", "2",
                                 "--perturb-examples", "1", "--json", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["random_baseline"]["seed"] == 2 and set(res["random_baseline"]["tasks"]["fruit"]) == {
        "accuracy", "sites", "all"}
    assert res["perturbation"]["fruit"][0]["n_examples"] == 2
    meta = json.loads((tmp_path / "o" / "prompts" / "fruit" / "seed0" / "skills_prompt.json").read_text())
    assert meta["key"]["config"]["lr"] == 0.05
    r = CliRunner().invoke(app, ["skills", "--model", str(model_dir), "--task", f"fruit={one}",
                                 "--perturb-examples", "-1", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "perturb_examples" in r.output


def test_cli_attention_neurons_as_an_option(model_dir, tmp_path):
    """``--kinds mlp,attn``: attention outputs are scored, selected, perturbed and compared with the random copy
    beside the MLP neurons; the skill set keeps the same fraction of each site; bad kinds are one clear line."""
    one = _csv(tmp_path / "one.csv", "apple", "zebra")
    base = ["skills", "--model", str(model_dir), "--task", f"fruit={one}", "--p", "0.1", "--ps", "0.1",
            "--methods", "zero", "--json"]
    r = CliRunner().invoke(app, [*base, "--kinds", "mlp,attn", "--random-baseline", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    from neurospec.models.loading import load_model

    sites = load_model(str(model_dir)).sites
    attn, mlp = sites.of_kind("attn"), sites.of_kind("mlp")
    assert set(res["predictivity"]) == {s.name for s in (*mlp, *attn)}
    ids = res["skill_neurons"]["fruit"]
    for s in (*mlp, *attn):
        assert sum(1 for i in ids if i.startswith(s.name + ":")) == round(0.1 * s.width)
    assert res["perturbation"]["fruit"][0]["n_neurons"] == len(ids)
    assert {s.name for s in attn} <= set(res["random_baseline"]["tasks"]["fruit"]["sites"])
    only = CliRunner().invoke(app, [*base, "--kinds", "attn", "--out", str(tmp_path / "a")])
    assert only.exit_code == 0, only.output
    assert set(json.loads(only.stdout)["predictivity"]) == {s.name for s in attn}
    bad = CliRunner().invoke(app, [*base, "--kinds", "mlp,conv", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "kinds must be" in bad.output
