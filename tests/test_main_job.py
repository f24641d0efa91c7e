"""The main job end to end on a tiny model saved to disk, through the command line."""

import json

from typer.testing import CliRunner

from neurospec.cli import _register, app
from neurospec.intervene.ablate import study_methods

_register()



def test_run_writes_every_result_and_the_report(model_dir, tmp_path, monkeypatch):
    import neurospec.cli.common as common

    monkeypatch.delenv("NEUROSPEC_NO_PROGRESS", raising=False)  # progress lines and the time estimate on stderr
    monkeypatch.setattr(common, "ESTIMATE_ABOVE_S", 0.0)
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
    lines = r.stderr.splitlines()
    est = [i for i, x in enumerate(lines) if x.startswith("run: this takes about ")]
    tokens = main["budget"]["record_tokens"] + main["budget"]["eval_tokens"]
    assert len(est) == 1 and f"about {tokens:,} forward-pass tokens" in lines[est[0]]
    assert est[0] < next(i for i, x in enumerate(lines) if x.startswith("1/4 task map"))
    assert any(x.startswith("prose: ") and "tokens" in x for x in lines[est[0]:])  # progress lines follow
    ab = json.loads((out / "ablation" / "ablation.json").read_text())
    assert {r["method"] for r in ab["rows"]} == set(study_methods())
    # the report can be rebuilt on its own
    r = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["report"] == str(out / "report.html")
