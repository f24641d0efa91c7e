"""Streamed ``datasets`` sources: ``hf:NAME?streaming=true`` reads a dataset lazily, example by example.

A streamed source (``datasets.load_dataset(..., streaming=True)``, an ``IterableDataset``) has no list of ids and no
random access, so a task of billions of tokens never downloads, prepares or holds the whole dataset: a task reads
examples in the dataset's own order and stops as soon as both of its splits have their tokens.

Splits: each example's id is its row number in the stream, and it goes to the evaluation split exactly as in a
non-streamed source (:func:`neurospec.data.tasks.assign_split`: a seeded hash of ``(seed, id)`` below
``eval_fraction``), so the split is reproducible and disjoint without materialising the dataset, and row ``i`` lands
in the same split whether streamed or not. What differs is the *order* in which a split's documents are read: a
non-streamed task visits every id in a seeded shuffle, which needs every id up front; a streamed task reads them in
stream order. So when the budgets take only part of the data, a streamed task takes each split's first documents in
stream order (different documents, hence different blocks, than the non-streamed task); when the budgets take all
of it, both take the same documents of each split, packed in a different order. Tokenised blocks of a streamed task
are not cached (the stream has no cheap identity); the task's fingerprint still covers every document it used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from neurospec.data.documents import DEFAULT_COLUMN, DocumentSource, missing_column, quiet_datasets
from neurospec.errors import TaskError

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")


def parse_streaming(value: str | None, where: str = "") -> bool:
    """The ``streaming`` option: ``true``/``false`` (also ``1``/``0``, ``yes``/``no``); None is false."""
    if value is None:
        return False
    low = value.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise TaskError(f"option streaming must be true or false{' in ' + where if where else ''}, got {value!r}")


class StreamingSource(DocumentSource):
    """The documents of one text column of an ``IterableDataset``, read in stream order (see the module docstring).

    It has no list of ids and no random access: :meth:`in_order` is the only way to read it.
    """

    streaming = True

    def __init__(self, dataset: Any, column: str, *, description: str, licence: str):
        self._dataset = dataset
        self._column = column
        self.description = description
        self.licence = licence

    def in_order(self) -> Iterator[tuple[str, str]]:
        """``(id, text)`` of every document, in stream order; the id is the row number, a null cell reads as ''."""
        for i, row in enumerate(self._dataset):
            value = row.get(self._column)
            if value is not None and not isinstance(value, str):
                raise TaskError(f"{self.description}: row {i} of column {self._column!r} is not text ({value!r:.40})")
            yield str(i), value or ""

    def ids(self):
        raise TaskError(f"{self.description} is streamed: it has no list of document ids (read it with in_order())")

    def read(self, doc_id: str) -> str:
        raise TaskError(f"{self.description} is streamed: its documents cannot be read by id")

    def __len__(self) -> int:
        raise TypeError("a streamed source has no length")


def open_streaming(
    name: str, *, column: str | None, split: str | None, config: str | None, data_files: str | None
) -> StreamingSource:
    """``datasets.load_dataset(name, config, split=..., data_files=..., streaming=True)`` as a document source.

    Nothing is downloaded or prepared beyond the first example, read here to check the text column.
    """
    import datasets

    if not name:
        raise TaskError("hf: needs a dataset name, e.g. hf:json?data_files=big.jsonl&streaming=true")
    where = f"dataset {name!r}" + (f" config {config!r}" if config else "") + " (streamed)"
    kwargs: dict[str, Any] = {} if data_files is None else {"data_files": data_files}
    try:
        with quiet_datasets():
            obj = datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise TaskError(
            f"cannot stream {where} with datasets ({type(exc).__name__}: {exc}). It needs the Hugging Face hub or "
            "local data files (hf:json?data_files=FILE&streaming=true)"
        ) from None
    if isinstance(obj, datasets.IterableDatasetDict):
        names = list(obj)
        if len(names) != 1:
            raise TaskError(f"{where} has the splits {', '.join(names)}; choose one with ?split=NAME")
        obj = obj[names[0]]
    column = column or DEFAULT_COLUMN
    with quiet_datasets():
        first = next(iter(obj.take(1)), None)
    if first is None:
        raise TaskError(f"{where} holds no documents; give it some text")
    if column not in first:
        raise missing_column(where, column, list(first))
    licence = "user data" if data_files is not None else f"see the card of dataset {name!r}"
    return StreamingSource(obj, column, description=f"{where} column {column!r}", licence=licence)
