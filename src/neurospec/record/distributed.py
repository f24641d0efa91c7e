"""Combining accumulators across the processes of a data-parallel recording (``torch.distributed``).

Each process records its shard; :func:`all_reduce_` then makes every process hold the accumulator of all the
data, following the accumulator's declared reductions (:mod:`neurospec.record.base`): ``"sum"``, ``"min"`` and
``"max"`` states are all-reduced, ``"same"`` states are checked to agree, and ``"custom"`` states (a reservoir's
keys and samples) are gathered from every process and merged with the accumulator's own rule.
:func:`sync_range` is the ``range_sync`` for :class:`~neurospec.record.accumulators.NeuronStats` that makes all
processes fix the same histogram edges.

Everything here is a collective: every process of the group must make the same calls in the same order. With
no initialised process group every function returns its input unchanged.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from neurospec.record.base import Accumulator

_OPS = ("sum", "min", "max")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device(group) -> torch.device:
    """NCCL only moves CUDA tensors; every other backend takes the CPU state as it is."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _op(rule: str):
    ops = torch.distributed.ReduceOp
    return {"sum": ops.SUM, "min": ops.MIN, "max": ops.MAX}[rule]


def _all_reduce_flat(tensors: list[Tensor], rule: str, device: torch.device, group) -> None:
    """All-reduce same-dtype tensors in place with one collective (flattened into one buffer)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    torch.distributed.all_reduce(flat, op=_op(rule), group=group)
    flat = flat.cpu()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sync_range(lo: Tensor, hi: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """Elementwise min of ``lo`` and max of ``hi`` over all processes (``NeuronStats(range_sync=sync_range)``).

    Returns new tensors; without a process group, returns ``(lo, hi)`` unchanged.
    """
    if not is_distributed():
        return lo, hi
    lo, hi = lo.double().clone(), hi.double().clone()
    device = _comm_device(group)
    _all_reduce_flat([lo], "min", device, group)
    _all_reduce_flat([hi], "max", device, group)
    return lo, hi


def all_reduce_(acc: Accumulator, group=None) -> Accumulator:
    """Combine ``acc`` in place with its counterparts in every process of ``group``; returns ``acc``.

    Afterwards every process holds the same result as one process that saw all the data (sums up to the order
    of float additions). Raises ``ValueError`` (on every process) if ``"same"`` states disagree, e.g. histograms
    calibrated on different batches without ``range_sync``, or reservoirs that share a seed.
    Cost: one all-reduce per (rule, dtype) group of states; reservoirs also all-gather ``k * width`` floats.
    """
    if not is_distributed():
        return acc
    device = _comm_device(group)
    state = acc._state
    groups: dict[tuple[str, torch.dtype], list[Tensor]] = defaultdict(list)
    same: list[tuple[str, Tensor]] = []
    custom: list[str] = []
    for name, rule in acc.reductions.items():
        if rule in _OPS:
            groups[(rule, state[name].dtype)].append(state[name])
        elif rule == "same":
            same.append((name, state[name]))
        else:
            custom.append(name)
    if same:
        _agree_(same, device, group)
    if custom:
        _merge_gathered_(acc, custom, device, group)
    for (rule, _dtype), tensors in groups.items():
        _all_reduce_flat(tensors, rule, device, group)
    acc._state_changed()
    return acc


def _agree_(same: list[tuple[str, Tensor]], device: torch.device, group) -> None:
    """Set each "same" state (NaN = unset) to the value every process that set it agrees on."""
    low = [torch.where(torch.isnan(t), math.inf, t.double()) for _, t in same]
    high = [torch.where(torch.isnan(t), -math.inf, t.double()) for _, t in same]
    _all_reduce_flat(low, "min", device, group)
    _all_reduce_flat(high, "max", device, group)
    for (name, _), lo, hi in zip(same, low, high, strict=True):
        is_set = torch.isfinite(lo)
        if bool((is_set & (lo != hi)).any()):
            raise ValueError(
                f"all_reduce_: state {name!r} differs between processes; histogram edges must agree: pass "
                "range_sync=neurospec.record.distributed.sync_range (or a broadcast) to NeuronStats"
            )
    for (_, t), lo in zip(same, low, strict=True):
        t.copy_(torch.where(torch.isfinite(lo), lo, math.nan).to(t.dtype))


def _merge_gathered_(acc: Accumulator, names: list[str], device: torch.device, group) -> None:
    """Gather the custom states of every process and merge the others' into ``acc`` in rank order."""
    dist = torch.distributed
    world, me = dist.get_world_size(group), dist.get_rank(group)
    gathered: list[dict[str, Tensor]] = [{} for _ in range(world)]
    for name in names:
        t = acc._state[name].contiguous().to(device)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        for rank, part in enumerate(parts):
            gathered[rank][name] = part.cpu()
    for i in range(world):  # every process checks every pair, so that all raise alike
        for j in range(i + 1, world):
            acc._check_states(gathered[i], gathered[j])
    for rank, other in enumerate(gathered):
        if rank != me:
            acc._merge_custom(other)
