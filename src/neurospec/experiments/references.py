"""Ablation values from a recorded reference run: per-neuron means, peaks (modes) and activation samples."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from neurospec.errors import RunStoreError
from neurospec.intervene.ablate import get_ablation
from neurospec.record.histogram import peak
from neurospec.record.store import Run


def reference_values(
    run: Run, task: str, methods: Iterable[str], *, peak_bins: int = 100, peak_smooth: float = 0.0,
    sites: Iterable[str] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """``(offsets_by_method, samples)`` for the given ablation methods, from ``task`` of the reference run.

    ``mean``: the recorded per-neuron mean. ``peak``: the mode of the recorded histogram re-binned into
    ``peak_bins`` bins between each neuron's min and max (optionally Gaussian-smoothed by ``peak_smooth`` bins).
    ``resample``: the recorded reservoir of activation vectors (an error says how to record one if absent).
    """
    methods = list(methods)
    accs = run.accumulators(task)
    keep = set(sites) if sites is not None else set(accs)
    missing = keep - set(accs)
    if missing:
        raise RunStoreError(
            f"reference run {run.path} has no statistics for sites {sorted(missing)[:3]}...; record it with "
            "`--kinds mlp,attn`"
        )
    offsets: dict[str, dict[str, torch.Tensor]] = {}
    for m in methods:
        if m == "mean":
            offsets[m] = {s: accs[s]["stats"].compute()["mean"].float() for s in keep}
        elif m == "peak":
            offsets[m] = {s: peak(accs[s]["stats"], bins=peak_bins, smooth=peak_smooth).float() for s in keep}
    samples = None
    if any(get_ablation(m).per_input for m in methods):
        if not all("reservoir" in accs[s] for s in keep):
            raise RunStoreError(
                f"resample ablation needs activation samples, but reference run {run.path} has none; record them "
                "with `neurospec record ... --reservoir 1024`"
            )
        samples = {s: accs[s]["reservoir"].compute()["samples"] for s in keep}
    return offsets, samples
