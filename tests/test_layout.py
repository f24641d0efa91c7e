"""The layout of result directories: claims, clearing stale results, atomic writes."""

import json
import os

import pytest

from neurospec.errors import RunStoreError
from neurospec.record import layout


def test_layout_names_are_the_names_the_pipelines_use():
    from neurospec.cluster.result import LABELS_FILE, MANIFEST_FILE
    from neurospec.experiments.clusters import ALIGNMENT_FILE
    from neurospec.experiments.routing import ROUTING_FILE
    from neurospec.experiments.specialization import SPECIALIZATION_FILE
    from neurospec.models.digits import ZOO_FILE

    assert (layout.CLUSTER_LABELS, layout.CLUSTERS, layout.ALIGNMENT, layout.ROUTING, layout.SPECIALIZATION,
            layout.ZOO) == (LABELS_FILE, MANIFEST_FILE, ALIGNMENT_FILE, ROUTING_FILE, SPECIALIZATION_FILE, ZOO_FILE)


def test_claims_refuse_other_results_and_force_clears_only_results(tmp_path):
    out = tmp_path / "out"
    layout.claim_out_dir(out, "run", {"tasks": ["a", "b"]})
    for rel in ("main.json", "report.html", "figures/x.png", "prune/b/result.json", "prune/b/pruned_neurons.txt",
                "taskmap/model/manifest.json", "taskmap/model/stats/a.safetensors", "notes.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    layout.claim_out_dir(out, "run", {"tasks": ["a", "b"]})  # the same command and config: resume, keep all
    assert (out / "prune/b/result.json").exists()
    with pytest.raises(RunStoreError, match=r"another configuration \(tasks \[\"a\", \"b\"\] there, \[\"a\"\] now"):
        layout.claim_out_dir(out, "run", {"tasks": ["a"]})
    with pytest.raises(RunStoreError, match="holds results of `neurospec run`; use --force"):
        layout.claim_out_dir(out, "taskmap", {"tasks": ["a", "b"]})
    layout.claim_out_dir(out, "run", {"tasks": ["a"]}, force=True)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # results gone; recordings, the user's own file and the new claim stay
    assert left == ["command.json", "notes.txt", "taskmap/model/manifest.json", "taskmap/model/stats/a.safetensors"]
    assert layout.read_claim(out)["config"] == {"tasks": ["a"]}
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunStoreError, match="is not a directory"):
        layout.claim_out_dir(tmp_path / "f", "run", {})


def test_result_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "d" / "result.json"
    layout.write_result_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        layout.write_result_json(path, {"v": 2})
    with pytest.raises(OSError):
        layout.write_result_text(tmp_path / "d" / "report.html", "<html>")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary file, no half report


def test_figures_are_written_whole_in_their_format(tmp_path):
    from neurospec.report.figures import pyplot

    fig = pyplot().figure()
    png = layout.write_result_figure(fig, tmp_path / "f.png", dpi=50)
    svg = layout.write_result_figure(fig, tmp_path / "f.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "f.svg"]


def test_report_and_neuron_sets_go_through_atomic_writes(tmp_path, monkeypatch):
    """report.html and pruned_neurons.txt are never written in place (os.replace moves each into position)."""
    from neurospec.intervene.neuronset import NeuronSet
    from neurospec.report.html import build_report

    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    NeuronSet({"layers.0.mlp": [1, 2]}, {"layers.0.mlp": 4}).save(tmp_path / "pruned_neurons.txt")
    point = {"top1": 0.5, "top10": 0.9, "skip_top1": 0.4, "loss": 2.0}
    steps = [{"fraction": f, "forget": point, "retain": point} for f in (0.0, 0.1)]
    (tmp_path / "result.json").write_text(json.dumps({"forget": "a", "retain": ["b"], "area": 1.0, "steps": steps}))
    build_report(tmp_path)
    assert {"pruned_neurons.txt", "report.html", "pruning_curves.png", "pruning_curves.svg"} <= set(moved)
