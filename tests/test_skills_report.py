"""The report draws the skill-neuron section from a tiny skills run."""

import json

from neurospec.data.labelled import make_labelled
from neurospec.experiments.skills import SkillsConfig, run_skills
from neurospec.models.loading import from_module
from neurospec.report.html import build_report
from neurospec.skills.tuning import TuningConfig

from tiny import char_tokenizer, tiny_model


def _task(name, a, b, n=10):
    texts = [f"{a} {i} {'x' * (i % 3)}" for i in range(n)] + [f"{b} {i} {'y' * (i % 3)}" for i in range(n)]
    return make_labelled(name, texts, [a] * n + [b] * n, seed=0)


def test_report_draws_skills_figures_from_a_tiny_run(tmp_path):
    loaded = from_module(tiny_model("llama"), char_tokenizer())
    cfg = SkillsConfig(p=0.1, ps=(0.1, 0.2), methods=("zero",), batch_size=8, prune_keeps=(0.1, 0.5),
                       agreement=True, beyond="lora", tuning=TuningConfig(epochs=1))
    run_skills(loaded, [_task("fruit", "apple", "zebra"), _task("space", "moon", "rock")], tmp_path, cfg)
    html = build_report(tmp_path).read_text()
    figs = tmp_path / "figures"
    for name in ("skills_predictivity", "skills_perturbation", "skills_similarity", "skills_pruning",
                 "skills_beyond"):
        assert (figs / f"{name}.png").stat().st_size > 1000 and (figs / f"{name}.svg").is_file()
    res = json.loads((tmp_path / "skills.json").read_text())
    assert "Skill neurons: pruning" in html and "Skill neurons and selective pruning" in html
    assert html.count("<img") == 5 and f"{res['agreement']['fruit']['chance']:.4g}" in html


def test_predictivity_lines_follow_one_site_kind_each(tmp_path):
    """With MLP and attention sites scored, each task gets one line per kind, its layers in order, its values
    from that kind's sites only (not a zigzag between the kinds of each layer)."""
    from neurospec.report.skills_figures import predictivity_per_layer, predictivity_series

    pred = {f"layers.{i}.{k}": {"t": {"mean": 0.6 + i / 10 + (0.2 if k == "attn" else 0.0), "skill_mean": None}}
            for i in range(3) for k in ("mlp", "attn")}
    res = {"predictivity": pred, "skill_neurons": {"t": []}, "config": {"p": 0.1, "kinds": ["mlp", "attn"]}}
    series = predictivity_series(res)
    assert set(series) == {("t", "mlp"), ("t", "attn")}
    layers, mean, _ = series[("t", "attn")]
    assert layers == [0, 1, 2] and mean == [pred[f"layers.{i}.attn"]["t"]["mean"] for i in range(3)]
    assert series[("t", "mlp")][1] == [pred[f"layers.{i}.mlp"]["t"]["mean"] for i in range(3)]
    assert predictivity_per_layer(res, tmp_path / "p").stat().st_size > 1000
