"""Each task's specific neurons as per-site masks, recomputed from a task-map directory.

``taskmap.json`` keeps per-layer counts and the top neurons of every task, not the full sets. The sets follow
exactly from the run the task map recorded (``DIR/model``) and its configuration, so they are recomputed here with
the task map's own scoring and selection (:func:`neurospec.experiments.taskmap._scores`, ``_keys`` and ``_masks``):
same score, same retain tasks, same seeded order of tied scores, same global top fraction. ``frac`` overrides the
configuration's ``select_frac``. Task maps written before configuration version 2 chose tied neurons by layer
order and drew the ``rand`` control alike for every task; their sets are recomputed with today's rule (a warning
says so).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import NeurospecError, RunStoreError
from neurospec.record import layout

TASKMAP_FILE = layout.TASKMAP


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
    from neurospec.experiments.taskmap import CONFIG_VERSION, TaskMapConfig, _keys, _masks, _scores
    from neurospec.record.store import open_run

    d = taskmap_path(directory)
    tm = read_taskmap(d)
    raw: dict[str, Any] = dict(tm["config"])
    raw.pop("type", None)
    version = raw.pop("version", 1)
    if version < CONFIG_VERSION:
        warnings.warn(
            f"{d / TASKMAP_FILE} has configuration version {version}: its sets broke ties by layer order (and its "
            f"rand control was the same for every task); the sets recomputed here break ties at random per task "
            f"and may differ slightly. Re-run `neurospec taskmap` into {d} for a consistent map.",
            stacklevel=2,
        )
    cfg = TaskMapConfig(**raw)
    run_dir = d / "model"
    if not run_dir.is_dir():
        raise RunStoreError(f"task map {d} has no recorded run {run_dir}; re-run `neurospec taskmap` into it")
    run = open_run(run_dir)
    if run.model_fingerprint != tm["model"]["fingerprint"]:
        raise RunStoreError(f"{run_dir} was recorded on another model than {d / TASKMAP_FILE} describes")
    names = list(tm["tasks"])
    keys = _keys(_scores(run, names, cfg), cfg, run.model_fingerprint)
    use = cfg.select_frac if frac is None else float(frac)
    if not 0 < use <= 1:
        raise NeurospecError(f"frac must be in (0, 1], got {use}")
    return {t: _masks(keys[t], use, cfg.kind, run.sites) for t in names}, tm
