"""Prune one weight matrix (or some of its rows) with a registered method."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neurospec.sparsity.patterns import SparsityError, SparsityPattern
from neurospec.sparsity.registry import LayerResult, PruningMethod, get_method


def as_rows(rows: Sequence[int] | torch.Tensor | None, n_rows: int, name: str = "the layer") -> torch.Tensor | None:
    """Validated, sorted, unique output-row indices (``LongTensor``), or ``None`` for all rows."""
    if rows is None:
        return None
    idx = torch.as_tensor(rows).reshape(-1)
    if idx.dtype == torch.bool:
        if idx.numel() != n_rows:
            raise SparsityError(f"a boolean row mask for {name} needs {n_rows} entries, got {idx.numel()}")
        idx = idx.nonzero().reshape(-1)
    if idx.is_floating_point():
        raise SparsityError(f"row indices for {name} must be integers, got {idx.dtype}")
    idx = torch.unique(idx.long())
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise SparsityError(f"row indices for {name} must lie in [0, {n_rows}); got {idx.min()}..{idx.max()}")
    return idx


def prune_weight(
    method: str | PruningMethod,
    weight: torch.Tensor,
    stat: torch.Tensor | None,
    pattern: SparsityPattern,
    *,
    rows: Sequence[int] | torch.Tensor | None = None,
    name: str = "the layer",
    **options,
) -> LayerResult:
    """Prune ``weight [out, in]`` (not changed) with ``method``; ``stat`` is what the method's ``stats`` names.

    ``rows``: only these output rows (neurons) are pruned, the others are returned unchanged; the method sees the
    chosen rows as its whole matrix (magnitude's one threshold is over those rows). Returns a full-size
    :class:`~neurospec.sparsity.registry.LayerResult`.
    """
    m = get_method(method) if isinstance(method, str) else method
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise SparsityError(f"method {m.name!r} takes no option {unknown}; its options are {list(m.options) or 'none'}")
    if weight.dim() != 2:
        raise SparsityError(f"{name}: a weight matrix [out, in] is needed, got shape {tuple(weight.shape)}")
    pattern.check_width(weight.shape[1], name)
    if m.stats != "none" and stat is None:
        raise SparsityError(f"method {m.name!r} needs calibration statistics ({m.stats}) for {name}")
    idx = as_rows(rows, weight.shape[0], name)
    if idx is None:
        return m.prune(weight, stat, pattern, **options)
    part = m.prune(weight.detach()[idx], stat, pattern, **options)
    new = weight.detach().clone()
    new[idx] = part.weight
    pruned = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    pruned[idx] = part.pruned
    return LayerResult(new, pruned)
