"""A uniform random sample of token vectors, mergeable exactly across batches and processes.

Every token (row) that :class:`Reservoir` sees gets an independent uniform random key; the reservoir keeps the
``k`` rows with the smallest keys. That set is a uniform sample without replacement of all rows seen, and the
k smallest keys of a union are the k smallest of the two parts' k smallest, so merging is exact.

Dimensions: ``k`` sample capacity, ``width`` neurons of the site, ``tokens`` rows of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from neurospec.record import kernels
from neurospec.record.base import Accumulator, as_rows


class Reservoir(Accumulator):
    """Uniform sample of ``k`` rows out of all rows seen; ``compute()["samples"]`` is ``[min(k, seen), width]``.

    Keys are float64 uniforms drawn from a CPU ``torch.Generator`` seeded with ``seed``; each ``update`` draws
    one key per row, so the keys (and the sample) depend only on the seed and the sequence of batches. The
    generator's state is part of the saved state, so a reloaded reservoir continues the same key stream.

    Merging keeps the k smallest keys of both. Reservoirs that merge must have been built with different seeds
    (otherwise their key streams coincide and the merged sample is not uniform): merging two non-empty
    reservoirs with the same seed raises ``ValueError``. In data-parallel recording use e.g. ``seed + rank``.

    Samples are stored as float32 (exact for bfloat16/float16/float32 input) in increasing key order, i.e. in a
    random order, not the input order. Rows are stored as given, non-finite values included.

    Saved state: ``keys`` float64 ``[k]`` (``+inf`` in empty slots), ``values`` float32 ``[k, width]``,
    ``filled`` / ``seen`` / ``seed`` int64 0-d, ``rng_state`` uint8 (the generator's state).
    ``meta()``: ``width, k, seed``.
    """

    kind: ClassVar[str] = "reservoir"
    reductions: ClassVar[dict[str, str]] = {
        "keys": "custom",
        "values": "custom",
        "filled": "custom",
        "seed": "custom",
        "rng_state": "custom",
        "seen": "sum",
    }
    merge_ignores: ClassVar[tuple[str, ...]] = ("seed",)

    def __init__(self, width: int, k: int, *, seed: int) -> None:
        for name, value in (("width", width), ("k", k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Reservoir: {name} must be a positive int, got {value!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"Reservoir: seed must be an int in [0, 2**63), got {seed!r}")
        self.width, self.k, self.seed = width, k, seed
        super().__init__()
        self._gen = torch.Generator()
        self._gen.set_state(self._state["rng_state"])

    def _initial_state(self) -> dict[str, Tensor]:
        return {
            "keys": torch.full((self.k,), math.inf, dtype=torch.float64),
            "values": torch.zeros(self.k, self.width, dtype=torch.float32),
            "filled": torch.zeros((), dtype=torch.int64),
            "seed": torch.tensor(self.seed, dtype=torch.int64),
            "rng_state": torch.Generator().manual_seed(self.seed).get_state(),
            "seen": torch.zeros((), dtype=torch.int64),
        }

    def meta(self) -> dict[str, Any]:
        return {"width": self.width, "k": self.k, "seed": self.seed}

    def _state_changed(self) -> None:
        if int(self._state["seed"]) != self.seed:
            raise ValueError(
                f"Reservoir: saved state has seed {int(self._state['seed'])}, meta says {self.seed}"
            )
        self._gen.set_state(self._state["rng_state"])

    @property
    def filled(self) -> int:
        return int(self._state["filled"])

    def update(self, x: Tensor) -> None:
        """Offer the rows of ``x`` ``[tokens, width]`` (any float dtype, any device)."""
        x = as_rows(x, self.width, "Reservoir")
        n = x.shape[0]
        if n == 0:
            return
        keys = torch.rand(n, generator=self._gen, dtype=torch.float64)
        self._state["rng_state"].copy_(self._gen.get_state())
        self._state["seen"] += n
        if n > self.k:
            keys, idx = torch.topk(keys, self.k, largest=False, sorted=False)
        else:
            idx = torch.arange(n)
        filled = self.filled
        if filled == self.k:
            better = keys < self._state["keys"][-1]
            keys, idx = keys[better], idx[better]
            if keys.numel() == 0:
                return
        rows = x.index_select(0, idx.to(x.device)).to("cpu", torch.float32)
        if kernels.usable(rows):  # move only the rows that change, in place (same result)
            self._insert(keys, rows)
            return
        self._keep_smallest(
            torch.cat([self._state["keys"][:filled], keys]),
            torch.cat([self._state["values"][:filled], rows]),
        )

    def _insert(self, keys: Tensor, rows: Tensor) -> None:
        """``_keep_smallest`` of the current sample and new ``(keys, rows)``, moving only the rows that change."""
        s = self._state
        filled = self.filled
        all_keys = torch.cat([s["keys"][:filled], keys])
        order = torch.argsort(all_keys, stable=True)[: self.k]  # the old keys are sorted: old rows only move later
        m = order.numel()
        kernels.move_rows(s["values"], order, filled, rows)
        s["keys"][:m] = all_keys[order]
        s["filled"].fill_(m)

    def _keep_smallest(self, keys: Tensor, values: Tensor) -> None:
        order = torch.argsort(keys, stable=True)[: self.k]
        m = order.numel()
        s = self._state
        s["keys"].fill_(math.inf)
        s["keys"][:m] = keys[order]
        s["values"][:m] = values[order]
        s["values"][m:] = 0.0
        s["filled"].fill_(m)

    @classmethod
    def _check_states(cls, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        if int(a["filled"]) and int(b["filled"]) and int(a["seed"]) == int(b["seed"]):
            raise ValueError(
                f"cannot merge two non-empty Reservoirs built with the same seed {int(a['seed'])}: their samples "
                "are correlated; give each part its own seed (e.g. seed + rank)"
            )

    def _merge_custom(self, other: Mapping[str, Tensor]) -> None:
        mine, theirs = self.filled, int(other["filled"])
        self._keep_smallest(
            torch.cat([self._state["keys"][:mine], other["keys"][:theirs].cpu()]),
            torch.cat([self._state["values"][:mine], other["values"][:theirs].cpu()]),
        )

    def compute(self) -> dict[str, Tensor]:
        """``{"samples": [min(k, seen), width] float32}``, in increasing key order."""
        return {"samples": self._state["values"][: self.filled].clone()}
