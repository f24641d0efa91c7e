"""The main job (`neurospec run`): the standard study of one model on several tasks, ending in report.html.

1. Task map (records every task on the model and on a random-init copy; overlaps; selectivity matrix).
2. Selective pruning of each task against the others (reusing the task map's recordings).
3. The ablation-method comparison (every method of :func:`neurospec.intervene.ablate.study_methods`) on random
   attention neurons.
4. The HTML report.

The default budget is sized to finish in under 10 minutes on 2 CPU cores with the bundled SmolLM2-135M; every
number of it is an option (``RunConfig``), printed before the job starts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neurospec.data.build import build_tasks
from neurospec.errors import NeurospecError
from neurospec.evaluate.tasks import skip_ids_for
from neurospec.experiments.ablation import KINDS, AblationStudyConfig, ablation_study
from neurospec.experiments.selective import PruneConfig, selective_pruning
from neurospec.experiments.taskmap import TaskMapConfig, task_map
from neurospec.intervene.ablate import get_ablation, study_methods
from neurospec.intervene.references import reference_values
from neurospec.models.loading import LoadedModel
from neurospec.record import layout
from neurospec.record.recorder import ProgressFn, RecordConfig, record
from neurospec.record.store import open_run
from neurospec.report.html import build_report
from neurospec.score.selective import check_score


def _study_methods() -> tuple[str, ...]:
    return study_methods()

DEFAULT_TASKS = ("python", "c", "prose", "dialog", "dialog-spanish", "dialog-italian")


@dataclass(frozen=True)
class RunConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    tokens: int = 4096
    eval_tokens: int = 1024
    seq_len: int = 256
    batch_size: int = 8
    score: str = "abs"
    select_frac: float = 0.02
    prune_frac: float = 0.02
    prune_steps: int = 3
    random_init: bool = True
    ablation_tasks: tuple[str, ...] = ("python", "prose")
    ablation_kind: str = "attn"
    ablation_frac: float = 0.1
    ablation_steps: int = 3
    ablation_methods: tuple[str, ...] = field(default_factory=lambda: _study_methods())
    ablation_seeds: tuple[int, ...] = (0, 1)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every option is checked here, before a model is loaded or a token recorded."""
        for name in ("tokens", "eval_tokens", "seq_len", "batch_size", "prune_steps", "ablation_steps"):
            if int(getattr(self, name)) < 1:
                raise NeurospecError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check_score(self.score)
        for name in ("select_frac", "prune_frac", "ablation_frac"):
            if not 0 < getattr(self, name) <= 1:
                raise NeurospecError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.ablation_kind not in KINDS:
            raise NeurospecError(f"ablation_kind must be one of {', '.join(KINDS)}, got {self.ablation_kind!r}")
        if not self.ablation_methods:
            raise NeurospecError("ablation_methods is empty; give at least one ablation method")
        for m in self.ablation_methods:
            if not get_ablation(m).from_reference:
                raise NeurospecError(f"ablation method {m!r} takes constants from the caller; the main job has none "
                                     "to give")
        if not self.ablation_seeds:
            raise NeurospecError("ablation_seeds is empty; give at least one seed")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return {"type": "RunConfig", "version": 1, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    def budget(self) -> dict:
        """Forward-pass token counts of the job (what its run time scales with)."""
        n = len(self.tasks)
        rec = n * self.tokens * (2 if self.random_init else 1) + len(self.ablation_tasks) * self.tokens
        sel = n * (n + 1) * self.eval_tokens
        prune = n * (self.prune_steps + 1) * 2 * self.eval_tokens
        abl = len(self.ablation_tasks) * (1 + len(self.ablation_seeds) * self.ablation_steps * len(self.ablation_methods)) * self.eval_tokens
        return {"record_tokens": rec, "eval_tokens": sel + prune + abl, "tasks": n}


def main_job(
    loaded: LoadedModel, out: str | Path, cfg: RunConfig | None = None, *, force: bool = False,
    progress: ProgressFn | None = None, command: str | None = None, log=None,
) -> dict:
    """Run the whole study into ``out``; returns the summary written to ``out/main.json``."""
    cfg = cfg or RunConfig()
    if len(cfg.tasks) < 2:
        raise NeurospecError("the main job needs at least two tasks")
    say = log or (lambda msg: None)
    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rcfg = RecordConfig(tokens=cfg.tokens, eval_tokens=cfg.eval_tokens, seq_len=cfg.seq_len,
                        batch_size=cfg.batch_size, reservoir=0, seed=cfg.seed)
    say("1/4 task map: recording every task, overlaps, selectivity matrix")
    tasks = build_tasks(loaded, list(cfg.tasks), rcfg)
    tm = task_map(loaded, list(tasks.values()), out / "taskmap", record_cfg=rcfg,
                  cfg=TaskMapConfig(score=cfg.score, select_frac=cfg.select_frac, random_init=cfg.random_init,
                                    batch_size=cfg.batch_size),
                  force=force, progress=progress)
    timings["taskmap"] = time.perf_counter() - t0
    names = tm["tasks"]

    say("2/4 selective pruning of each task against the others")
    t1 = time.perf_counter()
    prune: dict[str, Any] = {}
    if loaded.head in ("causal-lm", "masked-lm"):
        for t in names:
            others = [tasks[n] for n in names if n != t]
            res = selective_pruning(
                loaded, tasks[t], others, out / "prune" / t, record_cfg=rcfg,
                prune_cfg=PruneConfig(score=cfg.score, frac=cfg.prune_frac, steps=cfg.prune_steps,
                                      batch_size=cfg.batch_size),
                force=force, progress=progress, run_dir=out / "taskmap" / "model",
            )
            layout.write_result_json(out / layout.PRUNE_DIR / t / layout.PRUNE_RESULT, res)
            prune[t] = {"area": res["area"], "steps": res["steps"]}
    timings["prune"] = time.perf_counter() - t1

    say("3/4 ablation methods on random attention neurons")
    t2 = time.perf_counter()
    ab_rows: list[dict] = []
    ab_tasks = [t for t in cfg.ablation_tasks if t in tasks]
    if ab_tasks:
        ref_cfg = RecordConfig(**{**asdict(rcfg), "kinds": (cfg.ablation_kind,) if cfg.ablation_kind != "both" else ("mlp", "attn"), "reservoir": 1024})
        record(loaded, [tasks[t] for t in ab_tasks], out / "ablation" / "reference", ref_cfg, force=force,
               progress=progress)
        ref = open_run(out / "ablation" / "reference")
        study_cfg = AblationStudyConfig(kind=cfg.ablation_kind, frac_per_step=cfg.ablation_frac,
                                        steps=cfg.ablation_steps, methods=cfg.ablation_methods,
                                        seeds=cfg.ablation_seeds, batch_size=cfg.batch_size)
        for t in ab_tasks:
            offsets, samples = reference_values(ref, t, cfg.ablation_methods)
            ab_rows += ablation_study(
                loaded, loaded.sites, {t: tasks[t].eval}, study_cfg, offsets_by_method=offsets, samples=samples,
                skip_ids=skip_ids_for(tasks[t].collect),
            )
        layout.write_result_json(out / layout.ABLATION_DIR / layout.ABLATION,
                                 {"rows": ab_rows, "config": cfg.to_dict(), "study_config": study_cfg.to_dict()})
    timings["ablation"] = time.perf_counter() - t2

    say("4/4 report")
    summary = {
        "command": command,
        "config": cfg.to_dict(),
        "budget": cfg.budget(),
        "model": loaded.describe(),
        "tasks": tm["task_info"],
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(time.perf_counter() - t0, 1)},
        "selectivity": tm.get("selectivity"),
        "prune_area": {t: p["area"] for t, p in prune.items()},
    }
    layout.write_result_json(out / layout.MAIN, summary)
    summary["report"] = str(build_report(out))
    return summary
