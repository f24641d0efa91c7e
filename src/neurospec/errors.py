"""Errors raised at the public boundary. Each message says what was wrong and what to do."""

from __future__ import annotations


class NeurospecError(ValueError):
    """Base class: bad input or a state the user can fix. The CLI prints these without a traceback."""


class UnknownModelError(NeurospecError):
    """A model spec that is neither a bundled alias, a local path, a .gguf file nor a reachable hub id."""


class ArchitectureError(NeurospecError):
    """A model whose neuron sites cannot be found."""


class TaskError(NeurospecError):
    """A task that cannot be read or is too small."""


class RunStoreError(NeurospecError):
    """A run directory that cannot be written, or holds a different configuration."""


class NeuronSetError(NeurospecError):
    """Neuron ids or sets that do not exist in the model."""
