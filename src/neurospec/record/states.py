"""The accumulators a run stores, by the name their state tensors carry, and rebuilding them from those tensors.

A run file holds one flat ``{"SITE/NAME/KEY": tensor}`` dict; ``NAME`` is a key of :data:`ACCUMULATORS` and the
accumulator's constructor arguments are stored in the file's metadata under ``"SITE/NAME"``.
"""

from __future__ import annotations

from typing import Any

import torch

from neurospec.errors import RunStoreError
from neurospec.record.accumulators import CoMoments, NeuronStats, Reservoir
from neurospec.record.coactivation import ReluCoMoments
from neurospec.record.routing import ExpertRouting

ACCUMULATORS = {"stats": NeuronStats, "reservoir": Reservoir, "comoments": CoMoments,
                "relu_comoments": ReluCoMoments, "routing": ExpertRouting}


def accumulators_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{site: {name: accumulator}}`` rebuilt from a run file's tensors and accumulator metadata."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        site, name, k = key.split("/", 2)
        grouped.setdefault((site, name), {})[k] = v
    out: dict[str, dict[str, Any]] = {}
    for (site, name), state in grouped.items():
        cls = ACCUMULATORS.get(name)
        if cls is None:
            raise RunStoreError(f"unknown accumulator {name!r} in run file")
        out.setdefault(site, {})[name] = cls.from_state_dict(state, **meta.get(f"{site}/{name}", {}))
    return out
