"""Each task's specific neurons as per-site masks, recomputed from a task-map directory.

``taskmap.json`` keeps per-layer counts and the top neurons of every task, not the full sets. The sets follow
exactly from the run the task map recorded (``DIR/model``) and its configuration, so they are recomputed here with
the task map's own scoring and selection (:func:`neurospec.experiments.taskmap._scores` and ``_masks``): same
score, same retain tasks, same global top fraction. ``frac`` overrides the configuration's ``select_frac``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import NeurospecError, RunStoreError

TASKMAP_FILE = "taskmap.json"


def taskmap_path(directory: str | Path) -> Path:
    """The directory holding ``taskmap.json`` (``DIR`` or ``DIR/taskmap``), with a clear error when neither does."""
    d = Path(directory)
    for cand in (d, d / "taskmap"):
        if (cand / TASKMAP_FILE).is_file():
            return cand
    raise RunStoreError(
        f"{d} holds no {TASKMAP_FILE}: make a task map first with `neurospec taskmap --model M --task A --task B "
        f"--out {d}`"
    )


def read_taskmap(directory: str | Path) -> dict:
    return json.loads((taskmap_path(directory) / TASKMAP_FILE).read_text())


def task_masks(directory: str | Path, frac: float | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({task: {site: bool [width]}}, taskmap.json)`` of a task-map directory (see the module docstring)."""
    from neurospec.experiments.taskmap import TaskMapConfig, _masks, _scores
    from neurospec.record.store import open_run

    d = taskmap_path(directory)
    tm = read_taskmap(d)
    raw: dict[str, Any] = dict(tm["config"])
    raw.pop("type", None)
    raw.pop("version", None)
    cfg = TaskMapConfig(**raw)
    run_dir = d / "model"
    if not run_dir.is_dir():
        raise RunStoreError(f"task map {d} has no recorded run {run_dir}; re-run `neurospec taskmap` into it")
    run = open_run(run_dir)
    if run.model_fingerprint != tm["model"]["fingerprint"]:
        raise RunStoreError(f"{run_dir} was recorded on another model than {d / TASKMAP_FILE} describes")
    names = list(tm["tasks"])
    scores = _scores(run, names, cfg)
    use = cfg.select_frac if frac is None else float(frac)
    if not 0 < use <= 1:
        raise NeurospecError(f"frac must be in (0, 1], got {use}")
    return {t: _masks(scores[t], use, cfg.kind, run.sites) for t in names}, tm
