"""Pieces every pipeline shares: building tasks once, recording them, and evaluating a task under any head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import NeurospecError, TaskError
from neurospec.evaluate.tasks import classification_metrics, task_metrics  # noqa: F401  (re-exported)
from neurospec.models.loading import LoadedModel
from neurospec.record.recorder import ProgressFn, RecordConfig, record
from neurospec.record.store import Run, open_run


def build_tasks(loaded: LoadedModel, specs: Sequence[Any], cfg: RecordConfig) -> dict[str, Any]:
    """``{name: TaskData}`` for every spec (strings like ``"python"`` or ``"name=path"``, or TaskSpec)."""
    from neurospec.data.images import ImageTaskData, image_task
    from neurospec.data.tasks import TaskData, TaskSpec, build_task_data, check_task_names, parse_task_spec

    out: dict[str, Any] = {}
    for s in specs:
        if isinstance(s, TaskData | ImageTaskData):
            data = s
        elif isinstance(s, str) and image_task(s) is not None:
            data = image_task(s)
        else:
            spec = s if isinstance(s, TaskSpec) else parse_task_spec(str(s))
            data = build_task_data(spec, loaded.tokenizer, seq_len=cfg.seq_len, collect_tokens=cfg.tokens,
                                   eval_tokens=cfg.eval_tokens, seed=cfg.seed)
        check_task_names([*out, data.name])  # the same name twice, or names that differ only by case
        if data.eval.shape[0] == 0:
            raise TaskError(f"task {data.name!r} has no evaluation blocks; give it more data or lower --seq-len")
        out[data.name] = data
    return out


def record_tasks(
    loaded: LoadedModel, tasks: Mapping[str, Any], out: Path, cfg: RecordConfig, *, force: bool = False,
    progress: ProgressFn | None = None,
) -> Run:
    record(loaded, list(tasks.values()), out, cfg, force=force, progress=progress)
    return open_run(out)


def _without_histogram(stats):
    """A copy of a NeuronStats whose histogram is emptied (edges unset), so that it merges with any other."""
    state = stats.state_dict()
    state["hist"] = torch.zeros_like(state["hist"])
    state["hist_lo"] = torch.full_like(state["hist_lo"], float("nan"))
    state["hist_hi"] = torch.full_like(state["hist_hi"], float("nan"))
    return type(stats).from_state_dict(state, **stats.meta())


def merge_moments(parts: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of the union of several token sets from their ``{site: NeuronStats}`` accumulators, by exact
    merging of the accumulated sums.

    Each part's histogram has its own calibrated edges, so histograms are dropped before merging: the moments
    (mean, std, rms, mean |x|, ...) and extremes are exact, the histogram-derived ``peak`` of the result is NaN.
    """
    merged: dict[str, Any] | None = None
    for part in parts:
        if merged is None:
            merged = {s: _without_histogram(st) for s, st in part.items()}
        else:
            for s, st in part.items():
                merged[s].merge(_without_histogram(st))
    if merged is None:
        raise NeurospecError("no statistics to merge")
    return {s: st.compute() for s, st in merged.items()}


def merged_stats(run: Run, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Moment statistics of the union of several recorded tasks (see :func:`merge_moments`)."""
    return merge_moments([{s: a["stats"] for s, a in run.accumulators(t).items()} for t in tasks])


def skip_ids_for(blocks: torch.Tensor, n: int = 50) -> torch.Tensor | None:
    """The ``n`` most frequent tokens of a task's collection split (left out by the "skip" top-1); ``None`` for
    image tasks."""
    from neurospec.evaluate import most_frequent_tokens

    if blocks.is_floating_point():
        return None
    return most_frequent_tokens(blocks, n=n)
