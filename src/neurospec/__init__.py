"""neurospec: which neurons of a transformer serve which task, how separable they are, and what ablating them does.

The public API is re-exported lazily so that ``import neurospec`` stays cheap (torch and transformers load on
first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "neurospec.models.loading",
    "LoadedModel": "neurospec.models.loading",
    "Site": "neurospec.models.sites",
    "NeuronId": "neurospec.models.sites",
    "find_sites": "neurospec.models.sites",
    "build_task_data": "neurospec.data.tasks",
    "parse_task_spec": "neurospec.data.tasks",
    "TaskSpec": "neurospec.data.tasks",
    "TaskData": "neurospec.data.tasks",
    "record": "neurospec.record.recorder",
    "random_init_copy": "neurospec.models.loading",
    "RecordConfig": "neurospec.record.recorder",
    "open_run": "neurospec.record.store",
    "NeurospecError": "neurospec.errors",
    "tune_allocator": "neurospec.allocator",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurospec' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
