"""Selective pruning (METHODS.md section 1): remove the neurons most specific to a forget task F relative to a
retain task R, step by step, and measure both tasks after each step.

Per step ``i`` (step 0 is the unpruned model) the pruned set is the top ``frac * i`` MLP neurons and
``attn_frac * i`` attention neurons by score, ranked over all layers at once (``scope="global"``) or per layer.

- ``mode="cumulative"``: one set of statistics; step ``i`` takes the top ``frac * i`` of the same scores.
- ``mode="iterative"``: after each step the statistics are recorded again on the pruned model and the next
  ``frac`` of the still unpruned neurons are added. Each of these runs (``out/stepN``) carries the pruned set and
  the ablation in its identity, so rerunning into the same ``out`` with another score, fraction or ablation
  records them again rather than scoring from another pruned model's statistics.

Pruned neurons are replaced by a constant: 0 (``ablation="zero"``) or their mean on the retain task
(``ablation="mean"``), folded into the output projections (no hooks; the pruned model can be saved).

The retain task is measured on as many evaluation blocks as the forget task, taken in turn from each retain task.

Accuracy is the ``top1`` of :func:`neurospec.evaluate.task_metrics`, named in the result as ``metric``: next-token
(causal LM), masked-token (masked LM) or class (image classifier) top-1, and for head-less encoders the
representation similarity (mean cosine of the final hidden states to the unpruned model's; 1 at step 0).

Summary: the curve of accuracy on F (x) against accuracy on R (y), from the unpruned point ``(F0, R0)`` to the
last step's ``(F1, R1)``, and its normalised area (:func:`normalised_area`) over the range of F it measured:
1 means both tasks fall together (the diagonal ``y = R0 * x / F0``), above 1 that F falls faster than R, 2 that
F falls with R untouched (``y = R0``), at whatever step the curve stops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurospec.data.build import build_tasks
from neurospec.data.tasks import parse_task_spec
from neurospec.errors import NeurospecError
from neurospec.evaluate.tasks import objective_of, skip_ids_for, task_metrics, task_references
from neurospec.intervene.ablate import ablated, save_folded
from neurospec.intervene.neuronset import NeuronSet
from neurospec.models.loading import LoadedModel
from neurospec.record.layout import PRUNED_NEURONS
from neurospec.record.recorder import Intervention, ProgressFn, RecordConfig, record
from neurospec.record.store import open_run
from neurospec.score import score_neurons
from neurospec.score.selection import select
from neurospec.score.selective import check_score, tie_break_keys

MODES = ("cumulative", "iterative")
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class PruneConfig:
    score: str = "abs"
    frac: float = 0.02
    attn_frac: float = 0.0
    steps: int = 5
    mode: str = "cumulative"
    scope: str = "global"
    ablation: str = "zero"
    heads: str | None = None  # "mean" / "median": prune whole attention heads
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_score(self.score)
        for name in ("frac", "attn_frac"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise NeurospecError(f"{name} must be in [0, 1], got {v}")
        if self.frac == 0 and self.attn_frac == 0:
            raise NeurospecError("frac and attn_frac are both 0: nothing would be pruned")
        if max(self.frac, self.attn_frac) * self.steps > 1:
            raise NeurospecError(f"{self.steps} steps of {max(self.frac, self.attn_frac)} exceed all neurons")
        if self.steps < 1:
            raise NeurospecError("steps must be >= 1")
        if self.mode not in MODES:
            raise NeurospecError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.ablation not in ABLATIONS:
            raise NeurospecError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.heads not in (None, "mean", "median"):
            raise NeurospecError(f"heads must be None, 'mean' or 'median', got {self.heads!r}")
        if self.scope not in ("global", "per_site"):
            raise NeurospecError(f"scope must be 'global' or 'per_site', got {self.scope!r}")

    def to_dict(self) -> dict:
        return {"type": "PruneConfig", "version": 1, **asdict(self)}


def _widen(ns: NeuronSet, widths: Mapping[str, int]) -> NeuronSet:
    """The same neurons over a superset of sites (so set operations line up)."""
    return NeuronSet({s: ns.indices(s) if s in ns.site_names else [] for s in widths}, widths)


def _interleave(blocks: list[torch.Tensor], n: int) -> torch.Tensor:
    """Up to ``n`` evaluation blocks taken in turn from each retain task (so the retain measurement costs no more
    than the forget one and weighs the retain tasks equally)."""
    rows = []
    for i in range(max(b.shape[0] for b in blocks)):
        rows += [b[i] for b in blocks if i < b.shape[0]]
    return torch.stack(rows[: max(n, len(blocks))])


def _task_name(spec: Any) -> str:
    return spec.name if hasattr(spec, "name") else parse_task_spec(str(spec)).name


def normalised_area(acc_f: list[float], acc_r: list[float]) -> float:
    """Normalised area of the pruning curve: retain accuracy ``y`` against forget accuracy ``x``, step by step from
    the unpruned ``(F0, R0)`` to the last step's ``(F1, R1)``.

    With ``A`` the area under the curve over the measured range ``[F1, F0]`` (the trapezoid rule along the steps,
    so a step where F rises back is subtracted), ``D`` that of the diagonal ``y = R0 * x / F0`` (both tasks keep
    the same share of their accuracy) and ``T`` that of ``y = R0`` (the retain task untouched), over the same
    range::

        area = 1 + (A - D) / (T - D),   D = R0 (F0^2 - F1^2) / (2 F0),   T = R0 (F0 - F1)

    So 1 = both tasks fall together, above 1 = F falls faster than R, 2 = only F falls, below 1 = R falls faster,
    exactly for a curve stopped at any ``F1``. For a curve run to ``F1 = 0`` it is ``A / (0.5 * F0 * R0)``. NaN when
    ``F0`` or ``R0`` is not positive or the forget accuracy did not fall (``F1 >= F0``): no range to compare on.
    """
    if len(acc_f) != len(acc_r):
        raise NeurospecError(f"the curve has {len(acc_f)} forget and {len(acc_r)} retain accuracies")
    if len(acc_f) < 2:
        return float("nan")
    x = np.asarray(acc_f, dtype=np.float64)
    y = np.asarray(acc_r, dtype=np.float64)
    f0, r0, f1 = x[0], y[0], x[-1]
    if f0 <= 0 or r0 <= 0 or f1 >= f0:
        return float("nan")
    area = float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2))
    diagonal = r0 * (f0 * f0 - f1 * f1) / (2 * f0)
    top = r0 * (f0 - f1)
    return 1.0 + (area - diagonal) / (top - diagonal)


def selective_pruning(
    loaded: LoadedModel,
    forget: Any,
    retain: Any | list[Any],
    out: str | Path,
    *,
    record_cfg: RecordConfig | None = None,
    prune_cfg: PruneConfig | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    save_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
) -> dict:
    """Run selective pruning of ``forget`` against ``retain`` (one task or a list, merged). Records into ``out``.

    Returns ``{"steps": [{"step", "fraction", "attn_fraction", "n_pruned", "forget": {...}, "retain": {...}}],
    "metric", "area", "forget", "retain", "config"}`` (``metric``: what the accuracy ``top1`` measures); ``save_dir`` also writes the final pruned model with
    ``save_pretrained``. ``run_dir``: where the unpruned statistics are recorded (default ``out/step0``); an existing
    run with the same model and config is reused without recording again.
    """
    rcfg = record_cfg or RecordConfig()
    pcfg = prune_cfg or PruneConfig()
    retain_list = list(retain) if isinstance(retain, list | tuple) else [retain]
    if not retain_list:
        raise NeurospecError("selective pruning needs at least one retain task")
    f_name = _task_name(forget)
    if f_name in [_task_name(r) for r in retain_list]:
        raise NeurospecError(f"the forget task {f_name!r} is also a retain task: choose a different retain task")
    tasks = build_tasks(loaded, [forget, *retain_list], rcfg)
    names = list(tasks)
    f_name, r_names = names[0], names[1:]
    out = Path(out)
    kinds = tuple(k for k, f in (("mlp", pcfg.frac), ("attn", pcfg.attn_frac)) if f > 0)
    rcfg = RecordConfig(**{**{k: v for k, v in asdict(rcfg).items()}, "kinds": kinds})
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir) if run_dir is not None else out / "step0"
    record(loaded, list(tasks.values()), run_dir, rcfg, force=force, progress=progress)
    run = open_run(run_dir)
    sites = loaded.sites
    widths = {s.name: s.width for s in sites.select(kinds=kinds)}
    skip_f = skip_ids_for(tasks[f_name].collect)
    skip_r = skip_ids_for(torch.cat([tasks[n].collect for n in r_names]))  # None for image tasks
    r_eval = _interleave([tasks[n].eval for n in r_names], tasks[f_name].eval.shape[0])

    images = objective_of(loaded, tasks[f_name].eval) == "image-class"
    # head-less models: similarity of the final hidden states to the unpruned model's (taken now, before pruning)
    refs = task_references(loaded, {"forget": tasks[f_name].eval, "retain": r_eval}, batch_size=pcfg.batch_size)

    def measure() -> dict:
        f = task_metrics(loaded, tasks[f_name].eval, skip_ids=skip_f, batch_size=pcfg.batch_size,
                         label=getattr(tasks[f_name], "label", None), reference=refs.get("forget"))
        if images:  # each retain class on its own images, averaged with weights by image count
            parts = [task_metrics(loaded, tasks[n].eval, label=tasks[n].label, batch_size=pcfg.batch_size)
                     for n in r_names]
            total = sum(p["tokens"] for p in parts)
            r = {k: sum(p[k] * p["tokens"] for p in parts) / total for k in ("top1", "top10", "skip_top1", "loss")}
            r.update(perplexity=float(torch.tensor(r["loss"]).exp()), tokens=total, objective="image-class",
                     metric=parts[0]["metric"], nonfinite=sum(p["nonfinite"] for p in parts))
        else:
            r = task_metrics(loaded, r_eval, skip_ids=skip_r, batch_size=pcfg.batch_size, reference=refs.get("retain"))
        return {"forget": f, "retain": r}

    f_stats = run.stats(f_name)
    r_stats = run.merged_stats(r_names)
    # the rand control and the order of tied scores are seeded per model and forget task (see derive_seed)
    seeding = {"model": loaded.fingerprint, "task": f_name}
    scores = score_neurons(pcfg.score, f_stats, r_stats, seed=pcfg.seed, **seeding)
    keys = tie_break_keys(scores, pcfg.seed, **seeding)
    offsets = {s: v["mean"].float() for s, v in r_stats.items()} if pcfg.ablation == "mean" else None
    rows = [{"step": 0, "fraction": 0.0, "attn_fraction": 0.0, "n_pruned": 0, **measure()}]
    pruned = NeuronSet({s: [] for s in widths}, widths)
    for step in range(1, pcfg.steps + 1):
        if pcfg.mode == "cumulative":
            pruned = _widen(select(scores, pcfg.frac * step, pcfg.attn_frac * step, pcfg.scope, sites=sites,
                                    heads=pcfg.heads, keys=keys), widths)
        else:
            if step > 1:
                # The step run is this pipeline's own: one recorded under another pruned set or ablation (an
                # earlier call with other settings) is replaced, one under the same intervention reused.
                iv = Intervention.ablation(pruned, pcfg.ablation, offsets)
                with ablated(loaded.model, sites, pruned, pcfg.ablation, offsets=offsets):
                    sub = out / f"step{step - 1}"
                    record(loaded, [tasks[n] for n in names], sub, rcfg, force=True, progress=progress,
                           intervention=iv)
                step_run = open_run(sub)
                scores = score_neurons(pcfg.score, step_run.stats(f_name), step_run.merged_stats(r_names),
                                       seed=pcfg.seed, **seeding)
                keys = tie_break_keys(scores, pcfg.seed, **seeding)
            new = select(scores, pcfg.frac, pcfg.attn_frac, pcfg.scope, exclude=pruned, sites=sites,
                         heads=pcfg.heads, keys=keys)
            pruned = pruned | _widen(new, widths)
        with ablated(loaded.model, sites, pruned, pcfg.ablation, offsets=offsets):
            rows.append({"step": step, "fraction": pcfg.frac * step, "attn_fraction": pcfg.attn_frac * step,
                         "n_pruned": len(pruned), **measure()})
    pruned.save(out / PRUNED_NEURONS)  # atomic, like every result file
    if save_dir is not None:
        save_folded(loaded.model, sites, pruned, save_dir, offsets, tokenizer=loaded.tokenizer, method=pcfg.ablation)
    acc_f = [r["forget"]["top1"] for r in rows]
    acc_r = [r["retain"]["top1"] for r in rows]
    return {
        "forget": f_name, "retain": r_names, "config": pcfg.to_dict(), "steps": rows,
        "metric": rows[0]["forget"]["metric"], "area": normalised_area(acc_f, acc_r), "run": str(run_dir),
    }
