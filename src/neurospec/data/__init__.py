"""Tasks: named text from bundled corpora, local files or ``datasets``, packed into disjoint token-block splits.

- ``corpora``: the bundled corpora (``python``, ``c``, ``prose``, ``dialog``, ``dialog-<language>``) and their
  registry;
- ``sources``: source strings (corpus name, path, ``hf:NAME``, ``?key=value`` options) -> documents;
- ``tasks``: ``TaskSpec``/``parse_task_spec`` and ``build_task_data`` -> ``TaskData``.

Names are imported lazily, so listing corpora does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Corpus": "neurospec.data.corpora",
    "CorpusSize": "neurospec.data.corpora",
    "get_corpus": "neurospec.data.corpora",
    "list_corpora": "neurospec.data.corpora",
    "corpus_rows": "neurospec.data.corpora",
    "corpus_names": "neurospec.data.corpora",
    "register_corpus": "neurospec.data.corpora",
    "Document": "neurospec.data.documents",
    "DocumentSource": "neurospec.data.documents",
    "open_source": "neurospec.data.sources",
    "TaskSpec": "neurospec.data.tasks",
    "TaskData": "neurospec.data.tasks",
    "SplitInfo": "neurospec.data.tasks",
    "parse_task_spec": "neurospec.data.tasks",
    "build_task_data": "neurospec.data.tasks",
    "tokenizer_identity": "neurospec.data.tasks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurospec.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
