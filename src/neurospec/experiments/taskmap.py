"""The task map: each task's specific neurons, how much they overlap across tasks, and how selectively pruning
them hurts their own task (METHODS.md section 1), on the model and on a randomly initialised copy.

For N tasks, task i's specific neurons are the top fraction by a selective-pruning score with task i as forget
task and the union of the other tasks (their accumulators merged exactly) as retain task, or a named retain task.

Randomness is seeded per model and task (:func:`neurospec.score.selective.derive_seed` of ``seed``, the model's
fingerprint and the task's name): the ``rand`` control draws independent scores for each task, and neurons with
equal scores are taken in a random order per task (:func:`neurospec.score.selective.tie_break_keys`), so neither
makes two tasks' sets overlap more than chance.

- Overlap: ``|A_i ∩ A_j| / |A_i|`` at each fraction, overall and per site, with two chance baselines
  (:mod:`neurospec.analyze.overlap`).
- Selectivity: prune task i's neurons (``select_frac``), measure every task j: ``drop[i, j] = top1_j(unpruned) -
  top1_j(pruned i)``. Selective pruning shows as a dominant diagonal. ``top1`` is the accuracy-like number of
  :func:`neurospec.evaluate.task_metrics`, named in the result as ``metric``: next-token, masked-token or class
  top-1, or for head-less encoders the representation similarity to the unpruned model (so the drop is the cosine
  distance the pruning causes).
- Random init: the same overlaps for a seeded re-initialisation of the same architecture (recorded on the same
  tokens). Selectivity is not measured there (a random model has no accuracy to lose).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurospec.analyze.overlap import overlap, overlap_matrix, per_layer_counts
from neurospec.data.build import build_tasks
from neurospec.errors import NeurospecError, RunStoreError, TaskError
from neurospec.evaluate.tasks import skip_ids_for, task_metrics, task_references
from neurospec.intervene.ablate import ablated
from neurospec.models.loading import LoadedModel, random_init_copy
from neurospec.record.layout import TASKMAP, write_result_json
from neurospec.record.recorder import ProgressFn, RecordConfig, record
from neurospec.record.store import open_run
from neurospec.score import score_neurons
from neurospec.score.selection import kind_masks, select_kind, selection_keys
from neurospec.score.selective import check_score

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
CONFIG_VERSION = 2  # 2: rand and ties seeded per model and task (1: one seed for all, ties by layer order)


@dataclass(frozen=True)
class TaskMapConfig:
    score: str = "abs"
    fractions: tuple[float, ...] = FRACTIONS
    select_frac: float = 0.02
    kind: str = "mlp"
    retain: str | None = None  # a named retain task; None = the union of the other tasks
    ablation: str = "zero"
    random_init: bool = True
    random_seed: int = 0
    batch_size: int = 8
    top_n: int = 20
    seed: int = 0  # seeds the rand control and the order of tied scores, with the model and the task

    def __post_init__(self) -> None:
        check_score(self.score)
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        for f in (*self.fractions, self.select_frac):
            if not 0 < f <= 1:
                raise NeurospecError(f"fractions must be in (0, 1], got {f}")
        if self.kind not in ("mlp", "attn"):
            raise NeurospecError(f"kind must be 'mlp' or 'attn', got {self.kind!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fractions"] = list(self.fractions)
        return {"type": "TaskMapConfig", "version": CONFIG_VERSION, **d}


def _task_info(d) -> dict:
    """Fingerprint and sizes of one task: tokens for text tasks, images for image tasks."""
    unit = "images" if d.collect.is_floating_point() else "tokens"
    size = (lambda t: int(t.shape[0])) if unit == "images" else (lambda t: int(t.numel()))
    return {"fingerprint": d.fingerprint, f"collect_{unit}": size(d.collect), f"eval_{unit}": size(d.eval)}


def task_scores(run, names: list[str], cfg: TaskMapConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's scores (forget = the task, retain = the others or the named retain task) on ``run``."""
    out = {}
    for t in names:
        retain = [cfg.retain] if cfg.retain else [n for n in names if n != t]
        if t in retain:
            raise NeurospecError(f"task {t!r} cannot be its own retain task")
        out[t] = score_neurons(cfg.score, run.stats(t), run.merged_stats(retain), seed=cfg.seed,
                               model=run.model_fingerprint, task=t)
    return out


def _overlaps(scores_by_task, names, cfg, sites) -> dict:
    res: dict[str, Any] = {"overall": {}, "chance_global": {}, "chance_matched": {}, "per_site": {}, "counts": {}}
    for f in cfg.fractions:
        sets = [kind_masks(scores_by_task[t], f, cfg.kind, sites) for t in names]
        ov, cg, cm = overlap_matrix(sets)
        key = f"{f:g}"
        res["overall"][key] = ov.tolist()
        res["chance_global"][key] = cg.tolist()
        res["chance_matched"][key] = cm.tolist()
        res["per_site"][key] = {
            f"{a}|{b}": overlap(sets[i], sets[j])["per_site"] for i, a in enumerate(names) for j, b in enumerate(names)
            if i != j
        }
        res["counts"][key] = {t: per_layer_counts(s) for t, s in zip(names, sets, strict=True)}
    return res


def task_map(
    loaded: LoadedModel,
    task_specs: list[Any],
    out: str | Path,
    *,
    record_cfg: RecordConfig | None = None,
    cfg: TaskMapConfig | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Build the task map of ``task_specs`` on ``loaded``; writes ``taskmap.json`` in ``out`` and returns it."""
    rcfg = record_cfg or RecordConfig()
    cfg = cfg or TaskMapConfig()
    if len(task_specs) < 2 and cfg.retain is None:
        raise TaskError("a task map needs at least two tasks (or a named retain task)")
    rcfg = RecordConfig(**{**asdict(rcfg), "kinds": (cfg.kind,)})
    out = Path(out)
    tasks = build_tasks(loaded, task_specs, rcfg)
    names = list(tasks)
    if cfg.retain is not None and cfg.retain not in names:
        raise TaskError(f"retain task {cfg.retain!r} is not among the tasks {names}")
    record(loaded, list(tasks.values()), out / "model", rcfg, force=force, progress=progress)
    run = open_run(out / "model")
    sites = loaded.sites
    scores = task_scores(run, names, cfg)
    keys = selection_keys(scores, cfg.seed, run.model_fingerprint)
    result: dict[str, Any] = {
        "tasks": names,
        "config": cfg.to_dict(),
        "record_config": rcfg.to_dict(),
        "model": loaded.describe(),
        "task_info": {n: _task_info(d) for n, d in tasks.items()},
    }
    ov = _overlaps(keys, names, cfg, sites)
    result["overlap"] = ov["overall"]
    result["overlap_chance"] = {"global": ov["chance_global"], "matched": ov["chance_matched"]}
    result["overlap_per_site"] = ov["per_site"]
    result["layer_counts"] = ov["counts"]
    result["top_neurons"] = {}
    for t in names:
        flat = [(float(k[i]), float(scores[t][s][i]), f"{s}:{i}") for s, k in keys[t].items()
                for i in torch.topk(k, min(cfg.top_n, k.numel())).indices.tolist()]
        flat.sort(key=lambda p: -p[0])
        result["top_neurons"][t] = [{"neuron": n, "score": sc} for _, sc, n in flat[: cfg.top_n]]

    # selectivity: prune each task's neurons, measure every task (head-less models: against their unpruned states)
    skip = {n: skip_ids_for(d.collect) for n, d in tasks.items()}
    refs = task_references(loaded, {n: d.eval for n, d in tasks.items()}, batch_size=cfg.batch_size)

    def measure() -> dict[str, dict]:
        return {n: task_metrics(loaded, d.eval, skip_ids=skip[n], batch_size=cfg.batch_size,
                                label=getattr(d, "label", None), reference=refs.get(n))
                for n, d in tasks.items()}

    base = measure()
    drop = np.zeros((len(names), len(names)))
    loss_up = np.zeros_like(drop)
    pruned_metrics = {}
    for i, t in enumerate(names):
        ns = select_kind(keys[t], cfg.select_frac, cfg.kind, sites)
        with ablated(loaded.model, sites, ns, cfg.ablation):
            m = measure()
        pruned_metrics[t] = m
        for j, u in enumerate(names):
            drop[i, j] = base[u]["top1"] - m[u]["top1"]
            loss_up[i, j] = m[u]["loss"] - base[u]["loss"]
    result["metric"] = base[names[0]]["metric"]
    result["baseline"] = base
    result["selectivity"] = drop.tolist()
    result["selectivity_loss"] = loss_up.tolist()
    result["pruned_metrics"] = pruned_metrics

    if cfg.random_init:
        rnd = random_init_copy(loaded, seed=cfg.random_seed)
        record(rnd, list(tasks.values()), out / "random_init", rcfg, force=force, progress=progress)
        rrun = open_run(out / "random_init")
        rkeys = selection_keys(task_scores(rrun, names, cfg), cfg.seed, rrun.model_fingerprint)
        rov = _overlaps(rkeys, names, cfg, rnd.sites)
        result["random_init"] = {
            "overlap": rov["overall"],
            "overlap_chance": {"global": rov["chance_global"], "matched": rov["chance_matched"]},
            "layer_counts": rov["counts"],
            "fingerprint": rnd.fingerprint,
        }
        del rnd
    write_result_json(out / TASKMAP, result)
    return result


# ------------------------------------------------------------------------------------------- reading a task map

def taskmap_path(directory: str | Path) -> Path:
    """The directory holding ``taskmap.json`` (``DIR`` or ``DIR/taskmap``), with a clear error when neither does."""
    d = Path(directory)
    for cand in (d, d / "taskmap"):
        if (cand / TASKMAP).is_file():
            return cand
    raise RunStoreError(
        f"{d} holds no {TASKMAP}: make a task map first with `neurospec taskmap --model M --task A --task B "
        f"--out {d}`"
    )


def read_taskmap(directory: str | Path) -> dict:
    return json.loads((taskmap_path(directory) / TASKMAP).read_text())


def task_masks(directory: str | Path, frac: float | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({task: {site: bool [width]}}, taskmap.json)``: each task's specific neurons, recomputed from a task-map
    directory.

    ``taskmap.json`` keeps per-layer counts and the top neurons of every task, not the full sets. The sets follow
    exactly from the run the task map recorded (``DIR/model``) and its configuration, so they are recomputed here with
    the task map's own scoring and selection (:func:`task_scores`, :func:`~neurospec.score.selection.selection_keys` and
    :func:`~neurospec.score.selection.kind_masks`):
    same score, same retain tasks, same seeded order of tied scores, same global top fraction. ``frac`` overrides the
    configuration's ``select_frac``. Task maps written before configuration version 2 chose tied neurons by layer
    order and drew the ``rand`` control alike for every task; their sets are recomputed with today's rule (a warning
    says so).
    """
    d = taskmap_path(directory)
    tm = read_taskmap(d)
    raw: dict[str, Any] = dict(tm["config"])
    raw.pop("type", None)
    version = raw.pop("version", 1)
    if version < CONFIG_VERSION:
        warnings.warn(
            f"{d / TASKMAP} has configuration version {version}: its sets broke ties by layer order (and its "
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
        raise RunStoreError(f"{run_dir} was recorded on another model than {d / TASKMAP} describes")
    names = list(tm["tasks"])
    keys = selection_keys(task_scores(run, names, cfg), cfg.seed, run.model_fingerprint)
    use = cfg.select_frac if frac is None else float(frac)
    if not 0 < use <= 1:
        raise NeurospecError(f"frac must be in (0, 1], got {use}")
    return {t: kind_masks(keys[t], use, cfg.kind, run.sites) for t in names}, tm
