"""Integration on the two real bundled models: a few thousand tokens recorded, evaluated and ablated."""

import pytest
import torch

from neurospec.models.loading import load_model
from neurospec.record.recorder import RecordConfig, record
from neurospec.record.store import open_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_smollm2_records_and_evaluates(smollm, tmp_path):
    from neurospec.data.build import build_tasks
    from neurospec.evaluate.tasks import skip_ids_for, task_metrics

    cfg = RecordConfig(tokens=2048, eval_tokens=512, seq_len=128, batch_size=8, reservoir=64)
    summary = record(smollm, ["python", "prose"], tmp_path / "run", cfg)
    assert summary["tasks"] == {"python": 2048, "prose": 2048} and len(summary["sites"]) == 60
    run = open_run(tmp_path / "run")
    s = run.stats("python")["layers.10.mlp"]
    assert s["count"].min() == 2048 and torch.isfinite(s["std"]).all() and (s["std"] > 0).all()
    assert run.reservoir("prose")["layers.3.attn"].shape == (64, 576)
    tasks = build_tasks(smollm, ["python"], cfg)
    m = task_metrics(smollm, tasks["python"].eval, skip_ids=skip_ids_for(tasks["python"].collect))
    assert 0.3 < m["top1"] < 0.9 and m["top1"] < m["top10"] and m["perplexity"] < 50, m


def test_minilm_records(tmp_path):
    minilm = load_model("minilm-l6")
    summary = record(minilm, ["prose"], tmp_path / "run",
                     RecordConfig(tokens=1024, eval_tokens=256, seq_len=128, batch_size=8, reservoir=0))
    assert summary["tasks"] == {"prose": 1024} and len(summary["sites"]) == 12
    s = open_run(tmp_path / "run").stats("prose")["layers.5.mlp"]
    assert s["count"].min() == 1024
    # the site is the GELU output: never below GELU's minimum (about -0.17), and negative for some tokens
    assert -0.171 < s["min"].min() < 0 and 0 < s["frac_pos"].mean() < 1
