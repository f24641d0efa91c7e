"""The shared machinery of neurospec's mergeable streaming accumulators.

An accumulator declares its state once, in the class attribute ``reductions``: a mapping from each state tensor's
name to the rule that combines two partial states of that name:

- ``"sum"``: add (counts, sums, histograms);
- ``"min"`` / ``"max"``: elementwise minimum / maximum;
- ``"same"``: both sides must hold the same value (e.g. histogram edges). NaN means "not set yet" and takes the
  other side's value; two set values that differ make ``merge`` raise ``ValueError``;
- ``"custom"``: the class combines these in ``_merge_custom`` (e.g. a reservoir keeps the k smallest keys).

``merge``, ``state_dict``, ``load_state_dict``, ``from_state_dict`` and the distributed all-reduce in
:mod:`neurospec.record.distributed` all follow from that declaration, so a new accumulator only writes
``_initial_state``, ``update``, ``compute`` and ``meta``.

Persistence: ``state_dict()`` holds only tensors (flat, string keys, contiguous CPU tensors, ready for
``safetensors.torch.save_file``); ``meta()`` holds the constructor's hyperparameters as JSON-able values, so
``cls.from_state_dict(state, **meta)`` rebuilds an equal accumulator. :func:`to_safetensors` and
:func:`from_safetensors` bundle both (plus a type tag) into the ``(tensors, metadata)`` pair that a safetensors
file stores.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

REDUCTIONS = ("sum", "min", "max", "same", "custom")
FORMAT_VERSION = 1

_A = TypeVar("_A", bound="Accumulator")
_REGISTRY: dict[str, type[Accumulator]] = {}


class Accumulator:
    """Base class of all streaming statistics: ``update`` batches, ``merge`` partial results, ``compute`` answers.

    Subclasses set ``kind`` (a unique string tag, used in saved files) and ``reductions`` (see the module
    docstring), and may set ``merge_ignores``: names in ``meta()`` that may differ between two accumulators that
    are merged (e.g. a reservoir's seed). All other ``meta()`` values must be equal for a merge.
    """

    kind: ClassVar[str] = ""
    reductions: ClassVar[Mapping[str, str]] = {}
    merge_ignores: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = {name: rule for name, rule in cls.reductions.items() if rule not in REDUCTIONS}
        if bad:
            raise TypeError(f"{cls.__name__}.reductions has unknown rules {bad}; known rules: {REDUCTIONS}")
        if cls.kind:
            if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
                raise TypeError(
                    f"accumulator kind {cls.kind!r} is already used by {_REGISTRY[cls.kind].__name__}"
                )
            _REGISTRY[cls.kind] = cls

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = self._checked_initial_state()

    # ----------------------------------------------------------------------------------------- to implement
    def _initial_state(self) -> dict[str, Tensor]:
        """Fresh state tensors (CPU), one per name in ``reductions``."""
        raise NotImplementedError

    def update(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """The constructor's keyword arguments as JSON-able values: ``type(self)(**self.meta())`` is a fresh twin."""
        raise NotImplementedError

    @classmethod
    def _check_states(cls, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` if states ``a`` and ``b`` cannot be merged; called before anything changes.

        Both hold at least the ``"custom"`` states (the distributed all-reduce passes only those, and checks every
        pair of processes so that all of them raise alike).
        """

    def _merge_custom(self, other: Mapping[str, Tensor]) -> None:
        """Combine the ``"custom"`` states of ``other`` into ``self``; read only custom states from ``other``."""
        raise NotImplementedError(f"{type(self).__name__} declares custom states but no _merge_custom")

    def _state_changed(self) -> None:
        """Hook called after the state was replaced or merged (e.g. to drop caches derived from it)."""

    # ----------------------------------------------------------------------------------------- shared
    def _checked_initial_state(self) -> dict[str, Tensor]:
        # State tensors are only ever updated in place. Creating them outside inference mode keeps them usable
        # (merge, all-reduce, load) after an inference-mode recording loop.
        with torch.inference_mode(False):
            state = self._initial_state()
        if set(state) != set(self.reductions):
            raise TypeError(
                f"{type(self).__name__}._initial_state gives {sorted(state)}, reductions declare {sorted(self.reductions)}"
            )
        return state

    def reset(self) -> None:
        """Forget everything seen (hyperparameters stay)."""
        self._state = self._checked_initial_state()
        self._state_changed()

    def merge(self: _A, other: _A) -> _A:
        """Fold ``other``'s partial result into ``self`` (in place) and return ``self``.

        Raises ``ValueError`` if the two are incompatible (different type or settings, or ``"same"`` states such as
        histogram edges that differ). ``other`` is not modified.
        """
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        mine, theirs = self._merge_key(), other._merge_key()
        if mine != theirs:
            raise ValueError(
                f"cannot merge {type(self).__name__}s with different settings: {mine} vs {theirs}"
            )
        self._merge_state(other._state)
        return self

    def _merge_key(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta().items() if k not in self.merge_ignores}

    def _merge_state(self, other: Mapping[str, Tensor]) -> None:
        # Check everything before changing anything, so that a failed merge leaves self untouched.
        self._check_states(self._state, other)
        merged_same = {
            name: _merge_same(name, self._state[name], other[name])
            for name, rule in self.reductions.items()
            if rule == "same"
        }
        has_custom = False
        for name, rule in self.reductions.items():
            mine, theirs = self._state[name], other[name].to(self._state[name].device)
            if rule == "sum":
                mine.add_(theirs)
            elif rule == "min":
                torch.minimum(mine, theirs, out=mine)
            elif rule == "max":
                torch.maximum(mine, theirs, out=mine)
            elif rule == "same":
                mine.copy_(merged_same[name])
            else:
                has_custom = True
        if has_custom:
            self._merge_custom(other)
        self._state_changed()

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the state: ``{name: contiguous CPU tensor}``, directly writable with safetensors."""
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self._state.items()}

    def state_view(self) -> Mapping[str, Tensor]:
        """The live state tensors themselves (no copy): read them, e.g. to write them to a file, before the next
        ``update`` or ``merge`` changes them, and never modify them. :meth:`state_dict` gives a copy."""
        return MappingProxyType(self._state)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the state by ``state`` (as returned by ``state_dict``); names, shapes and dtypes must match."""
        missing = sorted(set(self._state) - set(state))
        unknown = sorted(set(state) - set(self._state))
        if missing or unknown:
            raise ValueError(f"{type(self).__name__} state: missing keys {missing}, unknown keys {unknown}")
        for name, t in state.items():
            ref = self._state[name]
            if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                raise ValueError(
                    f"{type(self).__name__} state {name!r}: expected {ref.dtype} of shape {tuple(ref.shape)}, "
                    f"got {t.dtype} of shape {tuple(t.shape)} (saved with other settings?)"
                )
        for name, t in state.items():
            self._state[name].copy_(t.detach())
        self._state_changed()

    @classmethod
    def from_state_dict(cls: type[_A], state: Mapping[str, Tensor], **meta: Any) -> _A:
        """Rebuild an accumulator from ``state_dict()`` and ``meta()`` (plus any runtime-only arguments)."""
        acc = cls(**meta)
        acc.load_state_dict(state)
        return acc

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.meta().items())
        return f"{type(self).__name__}({args})"


def as_rows(x: Tensor, width: int, who: str) -> Tensor:
    """``x`` ``[..., width]`` as a detached ``[tokens, width]`` tensor in its compute dtype (float32 or float64).

    Half-precision input (float16, bfloat16) is converted to float32; float32 and float64 stay as they are.
    """
    if x.ndim < 2 or x.shape[-1] != width:
        raise ValueError(f"{who}.update expects activations of shape [tokens, {width}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{who}.update expects floating-point activations, got {x.dtype}")
    x = x.detach().reshape(-1, width)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


_SCRATCH = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable uninitialised CPU buffer of ``shape`` for per-batch temporaries (one per thread and ``slot``).

    Reusing one batch-sized buffer instead of allocating a fresh one per update avoids the page faults of big
    fresh allocations (a sizeable share of the cost on the CPU). Accelerators get a fresh tensor: their
    caching allocators already reuse memory. The buffer is overwritten by the next call with the same slot.
    """
    numel = 1
    for n in shape:
        numel *= n
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype)
        pool[(slot, dtype)] = buf
    return buf[:numel].view(shape)


def _merge_same(name: str, mine: Tensor, theirs: Tensor) -> Tensor:
    theirs = theirs.to(mine.device)
    mine_set, theirs_set = ~torch.isnan(mine), ~torch.isnan(theirs)
    differ = mine_set & theirs_set & (mine != theirs)
    if differ.any():
        first = differ.nonzero()[0].tolist()
        raise ValueError(
            f"cannot merge: state {name!r} differs between the two accumulators ({int(differ.sum())} entries, "
            f"first at index {first}: {mine[tuple(first)].item()} vs {theirs[tuple(first)].item()}); states merged as "
            "'same' must agree"
        )
    return torch.where(mine_set, mine, theirs)


def accumulator_class(kind: str) -> type[Accumulator]:
    """The accumulator class registered under ``kind`` (e.g. ``"neuron_stats"``)."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown accumulator kind {kind!r}; known: {sorted(_REGISTRY)}") from None


def to_safetensors(acc: Accumulator) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` for ``safetensors.torch.save_file(tensors, path, metadata=metadata)``.

    The metadata holds the type tag, the format version and ``json.dumps(acc.meta())``.
    """
    metadata = {
        "neurospec.accumulator": acc.kind,
        "neurospec.accumulator.version": str(FORMAT_VERSION),
        "neurospec.accumulator.meta": json.dumps(acc.meta(), sort_keys=True),
    }
    return acc.state_dict(), metadata


def from_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], **runtime: Any
) -> Accumulator:
    """Inverse of :func:`to_safetensors`; ``runtime`` adds constructor arguments that are not saved (callables)."""
    try:
        kind = metadata["neurospec.accumulator"]
        version = int(metadata["neurospec.accumulator.version"])
        meta = json.loads(metadata["neurospec.accumulator.meta"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a neurospec accumulator file (metadata {dict(metadata)}): {err}") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"accumulator format version {version} is not supported (this is {FORMAT_VERSION})")
    return accumulator_class(kind).from_state_dict(tensors, **meta, **runtime)
