"""Reference runs of the cluster analyses: a recorded run's co-moments merged over its tasks, and its dead neurons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neurospec.errors import RunStoreError
from neurospec.models.loading import LoadedModel
from neurospec.record.store import Run, open_run


def reference_run(path: str | Path, loaded: LoadedModel) -> Run:
    """Open a reference run and check it was recorded on ``loaded``'s model."""
    run = open_run(path)
    run.check_model(loaded.fingerprint)
    return run


def reference_comoments(run: Run, sites: Sequence[str], tasks: Sequence[str] = (), *,
                        kind: str = "comoments") -> tuple[dict, list[str]]:
    """``({site: {"mean", "cov", "corr"}}, tasks)`` of a run's MLP co-moments, merged exactly over ``tasks``
    (default: every finished task of the run); an error that says how to record them when they are missing.

    ``kind``: ``"comoments"`` (of the activations) or ``"relu_comoments"`` (of their positive parts)."""
    what = {"comoments": "co-moments", "relu_comoments": "relu co-moments"}[kind]
    how = (f"record them with `neurospec record --model MODEL --task T ... --{kind.replace('_', '-')} mlp "
           f"--out {run.path}`")
    if "mlp" not in run.config.get(kind, []):
        raise RunStoreError(f"run {run.path} has no {what} of the MLP sites; {how} (or into a new --out)")
    names = list(tasks) or run.tasks
    if not names:
        raise RunStoreError(f"run {run.path} has no finished task; {how}")
    merged: dict[str, Any] = {}
    for t in names:
        accs = run.accumulators(t, (kind,))
        for s in sites:
            if s not in accs or kind not in accs[s]:
                raise RunStoreError(f"run {run.path} has no {what} of site {s} for task {t!r}; {how}")
            if s in merged:
                merged[s].merge(accs[s][kind])
            else:
                merged[s] = accs[s][kind]
    return {s: merged[s].compute() for s in sites}, names


def reference_dead(run: Run, sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{site: bool [width]}``: neurons constant over every recorded token of the run (dead)."""
    stats = run.merged_stats(run.tasks)
    return {s: ~(stats[s]["std"] > 0) for s in sites}
