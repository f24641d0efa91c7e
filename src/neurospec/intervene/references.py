"""Ablation values from a recorded reference run: per-neuron means, peaks (modes) and activation samples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from neurospec.errors import NeurospecError, RunStoreError
from neurospec.intervene.ablate import get_ablation
from neurospec.record.histogram import PEAK_METHODS, peak
from neurospec.record.store import Run


def peak_offsets(
    stats: Mapping[str, Any], *, bins: int = 100, smooth: float = 0.0, method: str = "histogram",
    bandwidth: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Peak-ablation offsets ``{site: Tensor[width]}`` (float32) from recorded ``{site: NeuronStats}``.

    Each neuron's mode (:func:`~neurospec.record.histogram.peak`): ``method="histogram"`` takes the fullest of
    ``bins`` bins between the neuron's min and max, optionally Gaussian-smoothed by ``smooth`` bins;
    ``method="kde"`` takes the maximum of a Gaussian kernel density estimate with a kernel of ``bandwidth`` times
    the neuron's standard deviation (METHODS.md section 2 names these variants).
    """
    if method not in PEAK_METHODS:
        raise NeurospecError(f"peak method must be one of {', '.join(PEAK_METHODS)}, got {method!r}")
    if method == "kde" and smooth > 0:
        raise NeurospecError("peak smoothing (in bins) applies to the histogram method; the kde method uses its bandwidth")
    if not (isinstance(bins, int) and bins >= 1 and smooth >= 0 and bandwidth > 0):
        raise NeurospecError(
            f"need peak bins >= 1, smoothing >= 0 and bandwidth > 0, got {bins}, {smooth} and {bandwidth}"
        )
    return {
        s: peak(st, bins=bins, smooth=smooth, method=method, bandwidth=bandwidth).float() for s, st in stats.items()
    }


def reference_values(
    run: Run, task: str, methods: Iterable[str], *, peak_bins: int = 100, peak_smooth: float = 0.0,
    peak_method: str = "histogram", peak_bandwidth: float = 0.1, sites: Iterable[str] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """``(offsets_by_method, samples)`` for the given ablation methods, from ``task`` of the reference run.

    ``mean``: the recorded per-neuron mean. ``peak``: the mode of the recorded histogram re-binned into
    ``peak_bins`` bins between each neuron's min and max, either the fullest bin (``peak_method="histogram"``,
    optionally Gaussian-smoothed by ``peak_smooth`` bins) or the maximum of a kernel density estimate
    (``peak_method="kde"``, kernel ``peak_bandwidth`` times the neuron's standard deviation); see
    :func:`peak_offsets`.
    ``resample``: the recorded reservoir of activation vectors (an error says how to record one if absent).
    """
    methods = list(methods)
    wanted = ("stats", "reservoir") if any(get_ablation(m).per_input for m in methods) else ("stats",)
    accs = run.accumulators(task, wanted)  # the reservoir's samples (the largest part of a run) only when needed
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
            offsets[m] = peak_offsets(
                {s: accs[s]["stats"] for s in keep}, bins=peak_bins, smooth=peak_smooth, method=peak_method,
                bandwidth=peak_bandwidth,
            )
    samples = None
    if any(get_ablation(m).per_input for m in methods):
        if not all("reservoir" in accs[s] for s in keep):
            raise RunStoreError(
                f"resample ablation needs activation samples, but reference run {run.path} has none; record them "
                "with `neurospec record ... --reservoir 1024`"
            )
        samples = {s: accs[s]["reservoir"].compute()["samples"] for s in keep}
    return offsets, samples
