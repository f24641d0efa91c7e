"""The registry of pruning methods: name -> per-layer function and what it needs.

A method's ``prune(weight, stat, pattern, **options)`` takes the weight as ``[out, in]`` (a tensor it must not
change), the layer's calibration statistic (``None``, the input norms ``[in]`` or the Hessian ``[in, in]``, as
its ``stats`` field says) and a :class:`~neurospec.sparsity.patterns.SparsityPattern`, and returns a
:class:`LayerResult`. CLI choices, docs and test parametrisation read :func:`methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neurospec.sparsity.patterns import SparsityError

STATS = ("none", "norms", "hessian")


@dataclass(frozen=True)
class LayerResult:
    """``weight``: the pruned ``[out, in]`` weight (a new tensor); ``pruned``: ``BoolTensor[out, in]``, True where
    the method set the weight to zero (dead inputs that SparseGPT zeroes included)."""

    weight: torch.Tensor
    pruned: torch.Tensor

    @property
    def sparsity(self) -> float:
        return float(self.pruned.float().mean()) if self.pruned.numel() else 0.0


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method.

    ``stats``: the calibration statistic it needs (``"none"``, ``"norms"``: :class:`~neurospec.sparsity.stats.
    InputNorms`, ``"hessian"``: :class:`~neurospec.sparsity.stats.InputHessian`). ``updates_weights``: whether kept
    weights change. ``options``: the keyword options ``prune`` accepts (anything else is an error).
    ``min_tokens(width)``: the fewest calibration tokens it accepts for a layer with ``width`` inputs.
    """

    name: str
    prune: Callable[..., LayerResult]
    stats: str
    updates_weights: bool
    description: str
    options: tuple[str, ...] = ()
    min_tokens: Callable[[int], int] = lambda width: 1

    def __post_init__(self) -> None:
        if self.stats not in STATS:
            raise ValueError(f"stats must be one of {STATS}, got {self.stats!r}")


_METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod, *, replace: bool = False) -> PruningMethod:
    """Add a method; a name already taken is an error unless ``replace``."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"pruning method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, PruningMethod]:
    """The registered methods by name: the built-in ones in the order of :data:`_BUILTIN` (whichever module was
    imported first), then any others in the order they were registered."""
    _load_builtin()
    order = [n for n in _BUILTIN if n in _METHODS] + [n for n in _METHODS if n not in _BUILTIN]
    return {n: _METHODS[n] for n in order}


def get_method(name: str) -> PruningMethod:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise SparsityError(f"unknown pruning method {name!r}; known methods: {', '.join(_METHODS)}") from None


_BUILTIN = ("magnitude", "wanda", "sparsegpt")  # modules of neurospec.sparsity that register themselves, in order


def _load_builtin() -> None:
    import importlib

    for name in _BUILTIN:
        importlib.import_module(f"neurospec.sparsity.{name}")
