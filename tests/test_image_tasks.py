"""Image classes as tasks: recording, evaluation, task map and selective pruning on a ViT."""

import numpy as np
import pytest
import torch

from neurospec.data.build import build_tasks
from neurospec.data.images import image_task, is_image_task
from neurospec.evaluate.tasks import task_metrics
from neurospec.experiments.selective import PruneConfig, selective_pruning
from neurospec.experiments.taskmap import TaskMapConfig, task_map
from neurospec.models.loading import from_module
from neurospec.record.recorder import RecordConfig, record
from neurospec.record.store import open_run

from tiny import tiny_model

RC = RecordConfig(batch_size=32, reservoir=8, hist_bins=32)


@pytest.fixture
def vit(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    return from_module(tiny_model("vit"), name="tiny-vit")  # 8x8 one-channel images, patch 2, 10 classes


def test_image_task_is_one_class_of_the_digits():
    from neurospec.data import digits as zoo

    t = image_task("three=digit-3")
    assert t.name == "three" and t.label == 3 and is_image_task("digit-3") and not is_image_task("python")
    data = zoo.digits_split()
    assert torch.equal(t.collect, data.x_train[data.y_train == 3]) and torch.equal(t.eval, data.x_test[data.y_test == 3])
    assert image_task("python") is None and image_task("digit-3").fingerprint == image_task("digit-3").fingerprint


def test_recorded_image_statistics_equal_the_full_tensor(vit, tmp_path):
    summary = record(vit, ["digit-1", "digit-7"], tmp_path / "run", RC)
    n1 = image_task("digit-1").collect
    assert summary["tasks"]["digit-1"] == n1.shape[0] * 17  # 16 patches + CLS per image
    acts = []
    site = vit.sites["layers.1.mlp"]
    h = vit.model.get_submodule(site.module).register_forward_pre_hook(
        lambda m, a: acts.append(a[0].reshape(-1, site.width).double()))
    with torch.no_grad():
        vit.model.base_model(pixel_values=n1)
    h.remove()
    x = torch.cat(acts)
    s = open_run(tmp_path / "run").stats("digit-1")["layers.1.mlp"]
    torch.testing.assert_close(s["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["std"], x.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["max"], x.max(0).values, rtol=1e-6, atol=1e-6)


def test_class_accuracy_by_hand(vit):
    t = build_tasks(vit, ["digit-4"], RC)["digit-4"]
    m = task_metrics(vit, t.eval, label=4)
    with torch.no_grad():
        logits = vit.model(pixel_values=t.eval).logits.double()
    target = torch.full((t.eval.shape[0],), 4)
    assert m["top1"] == pytest.approx(float((logits.argmax(-1) == 4).double().mean()))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-9)
    assert m["tokens"] == t.eval.shape[0]


def test_task_map_and_pruning_run_on_images(vit, tmp_path):
    res = task_map(vit, ["digit-0", "digit-1", "digit-2"], tmp_path / "map", record_cfg=RC,
                   cfg=TaskMapConfig(fractions=(0.05, 0.2), select_frac=0.05, random_seed=7))
    assert np.array(res["selectivity"]).shape == (3, 3)
    assert set(res["task_info"]["digit-0"]) == {"fingerprint", "collect_images", "eval_images"}
    # every overlap (off the diagonal too) is that of the sets the map selected, recomputed from its directory
    from neurospec.analyze.overlap import overlap_matrix
    from neurospec.experiments.taskmap import task_masks

    masks, _ = task_masks(tmp_path / "map", 0.2)
    ov, _, _ = overlap_matrix([masks[t] for t in ("digit-0", "digit-1", "digit-2")])
    np.testing.assert_allclose(ov, res["overlap"]["0.2"], rtol=1e-12)
    # the random-init control (seed 7, unlike the tiny model built with seed 0) selects from its own recording
    assert not np.allclose(res["random_init"]["overlap"]["0.2"], res["overlap"]["0.2"])
    p = selective_pruning(vit, "digit-3", ["digit-8", "digit-5"], tmp_path / "prune", record_cfg=RC,
                          prune_cfg=PruneConfig(frac=0.05, steps=2))
    base = p["steps"][0]
    want = [task_metrics(vit, image_task(t).eval, label=image_task(t).label) for t in ("digit-8", "digit-5")]
    n = sum(w["tokens"] for w in want)
    assert base["retain"]["top1"] == pytest.approx(sum(w["top1"] * w["tokens"] for w in want) / n)
    assert [s["n_pruned"] for s in p["steps"]] == [0, 9, 19]  # floor(0.05 * 192), floor(0.10 * 192) MLP neurons


def test_taskmap_command_on_a_saved_vit(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from neurospec.cli import _register, app

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    _register()
    tiny_model("vit").save_pretrained(tmp_path / "vit")
    r = CliRunner().invoke(app, ["taskmap", "--model", str(tmp_path / "vit"), "--task", "digit-0", "--task", "digit-1",
                                 "--fractions", "0.05,0.2", "--select-frac", "0.05", "--batch-size", "32",
                                 "--out", str(tmp_path / "map"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tasks"] == ["digit-0", "digit-1"] and len(res["selectivity"]) == 2
    assert (tmp_path / "map" / "report.html").exists()
