"""Sparsity patterns: unstructured (any fraction in [0, 1)) or N:M (N of every M consecutive inputs of a row are zero).

The 2:4 convention: in every group of 4 consecutive inputs of an output row, exactly 2 weights are pruned (set to
zero), so a 2:4 pattern has sparsity 1/2; a 4:8 pattern prunes 4 of every 8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from neurospec.errors import NeurospecError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class SparsityError(NeurospecError):
    """A sparsity, pattern, layer selection or calibration set that cannot be used."""


@dataclass(frozen=True)
class SparsityPattern:
    """``n``/``m`` set: N:M (``sparsity == n / m``); both ``None``: unstructured at ``sparsity``."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not (
            0.0 <= float(self.sparsity) < 1.0
        ):
            raise SparsityError(
                f"sparsity must be a fraction in [0, 1) (0.5 prunes half the weights), got {self.sparsity!r}"
            )
        if (self.n is None) != (self.m is None):
            raise SparsityError("an N:M pattern needs both N and M")
        if self.n is not None:
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 1 <= self.n < self.m:
                raise SparsityError(
                    f"N:M pattern {self.n}:{self.m} is not valid: N (weights pruned per group) must satisfy "
                    "1 <= N < M (M = group size), e.g. 2:4 or 4:8"
                )
            if abs(float(self.sparsity) - self.n / self.m) > 1e-12:
                raise SparsityError(
                    f"pattern {self.n}:{self.m} prunes {self.n / self.m:g} of the weights, but sparsity "
                    f"{self.sparsity} was asked for: leave the sparsity out with an N:M pattern"
                )

    @property
    def structured(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        """``"unstructured"`` or ``"N:M"`` (the JSON form)."""
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    def check_width(self, width: int, name: str = "the layer") -> None:
        """Raise when an N:M group size does not divide ``width`` (the layer's input features)."""
        if self.structured and width % self.m:
            raise SparsityError(
                f"{name} has {width} inputs, which is not a multiple of the N:M group size M={self.m}; use a "
                f"pattern whose M divides {width}, or unstructured sparsity"
            )

    def to_dict(self) -> dict:
        return {"sparsity": float(self.sparsity), "pattern": self.label}


def make_pattern(sparsity: float | None = None, pattern: str | None = None) -> SparsityPattern:
    """A pattern from a sparsity and/or a pattern string (``"unstructured"``, ``"2:4"``, ``"4:8"``, ...).

    With an N:M pattern the sparsity is N/M (a different sparsity is an error); unstructured sparsity defaults to 0.5.
    """
    if pattern is None or pattern.strip().lower() == "unstructured":
        return SparsityPattern(0.5 if sparsity is None else sparsity)
    match = _NM_RE.match(pattern)
    if match is None:
        raise SparsityError(f"pattern {pattern!r} is not 'unstructured' or N:M (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise SparsityError(
            f"N:M pattern {pattern!r} is not valid: N (weights pruned per group) must satisfy 1 <= N < M "
            "(M = group size), e.g. 2:4 or 4:8"
        )
    return SparsityPattern(n / m if sparsity is None else sparsity, n, m)


def lowest_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``BoolTensor[out, in]``: in every group of ``m`` consecutive columns of each row, the ``n`` lowest scores
    (ties: the earlier column)."""
    rows, cols = score.shape
    grouped = score.reshape(rows, cols // m, m)
    idx = torch.argsort(grouped, dim=-1, stable=True)[..., :n]
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """``BoolTensor[out, in]``: the ``k`` lowest scores of each row (ties: the earlier column)."""
    idx = torch.argsort(score, dim=-1, stable=True)[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def lowest_overall(score: torch.Tensor, k: int) -> torch.Tensor:
    """``BoolTensor`` of ``score``'s shape: its ``k`` lowest entries (one threshold over the whole tensor)."""
    flat = score.reshape(-1)
    idx = torch.argsort(flat, stable=True)[:k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).reshape(score.shape)
