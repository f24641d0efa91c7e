"""One run layout: record/layout.py names every result file, and a report reads the one layout of its directory."""

import json
from pathlib import Path

import pytest

from neurospec.errors import RunStoreError
from neurospec.record import layout
from neurospec.report.html import build_report

SRC = Path(__file__).resolve().parents[1] / "src" / "neurospec"
NAMES = (layout.REPORT, layout.PRUNE_RESULT, layout.PRUNED_NEURONS, layout.TASKMAP, layout.MAIN, layout.ABLATION,
         layout.CLUSTERS, layout.CLUSTER_LABELS, layout.SPECIALIZATION, layout.ALIGNMENT, layout.ROUTING, layout.ZOO,
         layout.WASSERSTEIN, layout.SKILLS_RESULT, layout.SPARSIFY)
# a digits model directory's zoo.json belongs to the model format: models/digits.py defines it, the layout re-exports it
DEFINED_ELSEWHERE = {("models", "digits.py"): layout.ZOO}


def test_result_file_names_are_spelled_only_in_the_layout():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "layout.py" and path.parent.name == "record":
            continue
        text = path.read_text()
        own = DEFINED_ELSEWHERE.get((path.parent.name, path.name))
        offenders += [f"{path.relative_to(SRC)}: {n}" for n in NAMES
                      if n != own and (f'"{n}"' in text or f"'{n}'" in text)]
    assert not offenders


def prune_result(forget: str) -> dict:
    point = {"top1": 0.5, "top10": 0.9, "skip_top1": 0.4, "loss": 2.0}
    return {"forget": forget, "retain": ["b"], "area": 1.0,
            "steps": [{"fraction": f, "forget": point, "retain": point} for f in (0.0, 0.1)]}


def test_a_main_job_directory_is_read_in_its_layout_only(tmp_path):
    """A directory claimed by `run` is read in the main job's layout: a prune result at its top (another layout)
    is not taken for one of the job's results."""
    out = tmp_path / "main"
    layout.claim_out_dir(out, "run", {"tasks": ["a", "b"]})
    (out / layout.PRUNE_RESULT).write_text(json.dumps(prune_result("a")))
    with pytest.raises(RunStoreError, match="no results to report"):
        build_report(out)
    (out / layout.PRUNE_DIR / "b").mkdir(parents=True)
    (out / layout.PRUNE_DIR / "b" / layout.PRUNE_RESULT).write_text(json.dumps(prune_result("b")))
    html = build_report(out).read_text()
    assert "<td>b</td>" in html and "<td>a</td>" not in html


def test_a_single_command_directory_is_read_for_that_command(tmp_path):
    """`prune --out DIR` is read at the top of DIR; the same files under a `taskmap` claim are not a prune result;
    an unclaimed directory with a main-job summary is a main job."""
    out = tmp_path / "p"
    layout.claim_out_dir(out, "prune", {"score": "abs"})
    (out / layout.PRUNE_RESULT).write_text(json.dumps(prune_result("a")))
    assert "Selective pruning" in build_report(out).read_text()
    other = tmp_path / "t"
    layout.claim_out_dir(other, "taskmap", {"score": "abs"})
    (other / layout.PRUNE_RESULT).write_text(json.dumps(prune_result("a")))
    with pytest.raises(RunStoreError, match="no results to report"):
        build_report(other)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / layout.MAIN).write_text("{}")
    (lib / layout.PRUNE_RESULT).write_text(json.dumps(prune_result("a")))
    assert layout.layout_of(lib) == layout.MAIN_JOB and layout.report_inputs(lib)["prune"] == []
