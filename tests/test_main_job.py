"""The main job end to end on a tiny model saved to disk, through the command line."""

import json

from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.intervene.ablate import study_methods

_register()



def test_run_writes_every_result_and_the_report(model_dir, tmp_path):
    out = tmp_path / "main"
    args = ["run", "--model", str(model_dir), "--task", "prose", "--task", "python", "--task", "dialog",
            "--tokens", "256", "--eval-tokens", "64", "--seq-len", "32", "--batch-size", "4", "--out", str(out),
            "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["report"] == str(out / "report.html")
    for f in ("main.json", "taskmap/taskmap.json", "prune/prose/result.json", "ablation/ablation.json",
              "figures/selectivity.png", "figures/selectivity.svg", "figures/pruning_curves.png",
              "figures/ablation_methods.png", "figures/layer_distribution.png", "report.html"):
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 9
    main = json.loads((out / "main.json").read_text())
    assert main["config"]["tasks"] == ["prose", "python", "dialog"] and main["budget"]["tasks"] == 3
    ab = json.loads((out / "ablation" / "ablation.json").read_text())
    assert {r["method"] for r in ab["rows"]} == set(study_methods())
    # the report can be rebuilt on its own
    r = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["report"] == str(out / "report.html")
