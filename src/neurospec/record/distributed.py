"""Data-parallel recording under ``torchrun``: joining the process group, agreeing across ranks, combining
accumulators.

Each process records its shard; :func:`all_reduce_` then makes every process hold the accumulator of all the
data, following the accumulator's declared reductions (:mod:`neurospec.record.base`): ``"sum"``, ``"min"`` and
``"max"`` states are all-reduced, ``"same"`` states are checked to agree, and ``"custom"`` states (a reservoir's
keys and samples) are gathered from every process and merged with the accumulator's own rule.

Devices: NCCL only moves CUDA tensors, so every collective runs on :func:`collective_device` (``cuda:LOCAL_RANK``
for NCCL, the CPU for gloo) and the results come back to the CPU state. :func:`join_process_group` picks the
backend from the device the model runs on (NCCL for CUDA, gloo otherwise) and gives each rank its own GPU.

Errors: a check that fails on one rank only (a run directory only rank 0 writes, a file one node lacks) must not
leave the other ranks waiting in a collective until the timeout. Blocks of checks run under :func:`together`,
which ends with every rank learning whether any rank failed; then all of them raise. :func:`check_same` refuses
ranks that see different models or data.

Everything here is a collective: every process of the group must make the same calls in the same order. With
no initialised process group every function returns its input unchanged.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from neurospec.errors import NeurospecError
from neurospec.record.base import Accumulator

DEFAULT_TIMEOUT_S = 600
_OPS = ("sum", "min", "max")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def backend_for(device: str | torch.device | None) -> str:
    """The process-group backend for a model on ``device``: ``"nccl"`` for CUDA, ``"gloo"`` for everything else."""
    return "nccl" if device is not None and str(device).startswith("cuda") else "gloo"


def _one_gpu_per_rank(local_ranks: int, gpus: int) -> NeurospecError:
    return NeurospecError(
        f"NCCL needs one GPU per rank, but this node runs {local_ranks} ranks and has {gpus} GPU(s): start at most "
        f"{gpus} (torchrun --nproc_per_node {gpus}), or record on the CPU (--device cpu, gloo backend)"
    )


def _local_rank(env) -> int:
    return int(env.get("LOCAL_RANK", "0"))


def collective_device(backend: str) -> torch.device:
    """Where tensors must be for a collective of ``backend``: ``cuda:LOCAL_RANK`` for NCCL (which only moves CUDA
    tensors; the current CUDA device when ``LOCAL_RANK`` is unset), the CPU for every other backend."""
    if "nccl" not in backend.lower():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise NeurospecError("the NCCL backend needs CUDA, and no GPU is visible; use the gloo backend (--device cpu)")
    index = _local_rank(os.environ) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise _one_gpu_per_rank(index + 1, torch.cuda.device_count())
    return torch.device("cuda", index)


def rank_device(device: str | None, env=None) -> tuple[str, str | None]:
    """``(backend, device of this rank)`` for a ``torchrun`` process asked to run its model on ``device``.

    CUDA: NCCL, and each rank on its own GPU ``cuda:LOCAL_RANK``; there must be a GPU for every rank of the node
    (``LOCAL_WORLD_SIZE``). Anything else (``None`` = CPU): gloo, ``device`` unchanged. ``env``: the environment
    (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if device == "auto":
        raise NeurospecError(
            "--device auto spreads one model over all GPUs and cannot be combined with torchrun: pass --device cuda "
            "(each rank on its own GPU), or run auto in a single process"
        )
    backend = backend_for(device)
    if backend != "nccl":
        return backend, device
    local = _local_rank(env)
    if str(device) != "cuda":
        raise NeurospecError(
            f"under torchrun every rank runs on its own GPU (cuda:LOCAL_RANK): pass --device cuda, not {device}"
        )
    if not torch.cuda.is_available():
        raise NeurospecError("--device cuda was asked for, but no GPU is visible; pass --device cpu")
    local_ranks = int(env.get("LOCAL_WORLD_SIZE", str(local + 1)))
    gpus = torch.cuda.device_count()
    if max(local_ranks, local + 1) > gpus:
        raise _one_gpu_per_rank(max(local_ranks, local + 1), gpus)
    return backend, f"cuda:{local}"


def default_timeout(env=None) -> timedelta:
    """How long a collective waits for the other ranks before failing: ``NEUROSPEC_DIST_TIMEOUT`` seconds, else
    10 minutes (torch's default for gloo is 30). Ranks wait at most for one rank writing a task's results, or
    building the next task's data; checks that can fail on one rank are agreed on (:func:`together`) instead."""
    env = os.environ if env is None else env
    raw = env.get("NEUROSPEC_DIST_TIMEOUT")
    if raw is None or raw == "":
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise NeurospecError(f"NEUROSPEC_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def join_process_group(device: str | None = None) -> str | None:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE > 1``); returns this rank's device.

    The backend follows the device (:func:`rank_device`); with NCCL the rank's GPU becomes the current CUDA
    device, so that object collectives and barriers use it. Without ``torchrun`` returns ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    backend, device = rank_device(device)
    if is_distributed():
        return device
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group(backend, timeout=default_timeout())
    return device


def leave_process_group() -> None:
    """Leave the process group. On success every rank first waits at a barrier (a rank that exits while another
    still talks to it can abort in the communication library's threads). Called while an exception propagates,
    it leaves at once: the other ranks may be inside another collective, and a barrier would wait for them until
    the timeout; the launcher ends them when this rank exits."""
    if not is_distributed():
        return
    if sys.exc_info()[1] is None:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------- agreement


def gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` of the other ranks is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, NeurospecError) else f"{type(e).__name__}: {e}"


@contextmanager
def together(group=None) -> Iterator[None]:
    """Run a block of checks on every rank; at its end every rank learns whether any rank failed.

    A rank whose block raised an ``Exception`` re-raises it; every other rank then raises
    :class:`~neurospec.errors.NeurospecError` naming the failing ranks and their messages. So a condition that
    only one rank sees ends all ranks at once, instead of leaving them in the next collective until the timeout.
    One small all-gather; every rank must enter the block.
    """
    try:
        yield
    except Exception as e:
        if is_distributed():
            gather_objects(_describe(e), group)
        raise
    if is_distributed():
        failed = [(rank, msg) for rank, msg in enumerate(gather_objects(None, group)) if msg is not None]
        if failed:
            raise NeurospecError("; ".join(f"rank {rank}: {msg}" for rank, msg in failed))


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def check_same(what: str, value: Any, remedy: str, group=None, width: int = 40) -> None:
    """Raise :class:`~neurospec.errors.NeurospecError` on every rank unless all ranks hold equal ``value``.

    The message names which ranks hold which value (shortened to ``width`` characters; 0 = in full), then
    ``remedy``. One all-gather of ``value`` (picklable).
    """
    values = gather_objects(value, group)
    groups: list[tuple[Any, list[int]]] = []
    for rank, v in enumerate(values):
        for held, ranks in groups:
            if held == v:
                ranks.append(rank)
                break
        else:
            groups.append((v, [rank]))
    if len(groups) > 1:
        def short(v: Any) -> str:
            text = str(v)
            return text if width <= 0 or len(text) <= width else text[: max(width - 3, 1)] + "..."

        seen = "; ".join(f"{_ranks(ranks)}: {short(v)}" for v, ranks in groups)
        raise NeurospecError(f"the ranks see different {what} ({seen}); {remedy}")


# ----------------------------------------------------------------------------------------------- accumulators


def _comm_device(group) -> torch.device:
    return collective_device(str(torch.distributed.get_backend(group)))


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


def all_reduce_(acc: Accumulator, group=None) -> Accumulator:
    """Combine ``acc`` in place with its counterparts in every process of ``group``; returns ``acc``.

    Afterwards every process holds the same result as one process that saw all the data (sums up to the order
    of float additions). Raises ``ValueError`` (on every process) if ``"same"`` states disagree, e.g. reservoirs
    that share a seed.
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
                f"all_reduce_: state {name!r} differs between processes; states merged as 'same' must agree on "
                "every process"
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
