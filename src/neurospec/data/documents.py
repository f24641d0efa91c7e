"""Documents and the sources that hold them: the types every text source of :mod:`neurospec.data.sources` and every
bundled corpus of :mod:`neurospec.data.corpora` returns.

A :class:`DocumentSource` yields :class:`Document` ``(id, text)`` pairs with ids that are stable and unique within the
source; it is read lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from neurospec.errors import TaskError

DEFAULT_COLUMN = "text"


class Document(NamedTuple):
    """One document: a stable id (unique within its source) and its text."""

    id: str
    text: str


class DocumentSource(ABC):
    """A fixed collection of documents with stable string ids.

    ``ids()`` is cheap (no document is read); ``read(doc_id)`` reads one document. ``documents()`` yields all of them
    in the order of ``ids()``, which is deterministic.
    """

    description: str
    licence: str

    @abstractmethod
    def ids(self) -> Sequence[str]:
        """All document ids, in a deterministic order."""

    @abstractmethod
    def read(self, doc_id: str) -> str:
        """The text of one document."""

    def identity(self) -> str | None:
        """A cheap string that changes when the documents change (file sizes and times, versions), or None.

        Used only to key the tokenised-data cache; sources that cannot tell return None and are never cached.
        """
        return None

    def documents(self) -> Iterator[Document]:
        for doc_id in self.ids():
            yield Document(doc_id, self.read(doc_id))

    def __len__(self) -> int:
        return len(self.ids())


class MemorySource(DocumentSource):
    """Documents already in memory (a list of ``Document``)."""

    def __init__(
        self, docs: Sequence[Document], *, description: str, licence: str, identity: str | None = None
    ):
        self._ids = [d.id for d in docs]
        self._texts = {d.id: d.text for d in docs}
        if len(self._texts) != len(self._ids):
            raise ValueError(f"{description}: document ids are not unique")
        self.description = description
        self.licence = licence
        self._identity = identity

    def ids(self) -> Sequence[str]:
        return self._ids

    def read(self, doc_id: str) -> str:
        return self._texts[doc_id]

    def identity(self) -> str | None:
        return self._identity


class ColumnSource(DocumentSource):
    """One document per row of a text column (a list, a pyarrow array or a ``datasets`` column); ids are row numbers.

    Null cells read as empty documents.
    """

    def __init__(
        self,
        column: Any,
        *,
        description: str,
        licence: str,
        identity: str | None = None,
        getter: Callable[[Any, int], str | None] | None = None,
    ):
        self._column = column
        self._ids = [str(i) for i in range(len(column))]
        self._get = getter or (lambda col, i: col[i])
        self.description = description
        self.licence = licence
        self._identity = identity

    def ids(self) -> Sequence[str]:
        return self._ids

    def read(self, doc_id: str) -> str:
        value = self._get(self._column, int(doc_id))
        return "" if value is None else value

    def identity(self) -> str | None:
        return self._identity


class FileTreeSource(DocumentSource):
    """One document per file under ``root`` whose name ends with ``suffix``, recursively, in sorted path order.

    Folders named in ``skip_dirs`` and, if ``skip_hidden``, names starting with ``.`` are not entered.
    Ids are paths relative to ``root`` with ``/`` separators.
    """

    def __init__(
        self,
        root: Path,
        suffix: str,
        *,
        decode: Callable[[bytes, str], str],
        description: str,
        licence: str,
        skip_dirs: Sequence[str] = (),
        skip_hidden: bool = False,
    ):
        self.root = Path(root)
        self.suffix = suffix
        self._decode = decode
        self._skip_dirs = frozenset(skip_dirs)
        self._skip_hidden = skip_hidden
        self._paths: list[str] | None = None
        self.description = description
        self.licence = licence

    def ids(self) -> Sequence[str]:
        if self._paths is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if d not in self._skip_dirs and not self._hidden(d)]
                rel = Path(dirpath).relative_to(self.root)
                for name in filenames:
                    if name.endswith(self.suffix) and not self._hidden(name):
                        found.append((rel / name).as_posix())
            self._paths = sorted(found)
        return self._paths

    def _hidden(self, name: str) -> bool:
        return self._skip_hidden and name.startswith(".")

    def read(self, doc_id: str) -> str:
        path = self.root / doc_id
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
        return self._decode(data, str(path))

    def total_bytes(self) -> int:
        """Sum of the file sizes: an upper bound on the characters, read without opening any file."""
        return sum((self.root / p).stat().st_size for p in self.ids())

    def identity(self) -> str | None:
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for p in self.ids():
            st = (self.root / p).stat()
            digest.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return digest.hexdigest()


def missing_column(where: str, column: str, columns: Sequence[str]) -> TaskError:
    return TaskError(
        f"{where} has no column {column!r}; its columns are {', '.join(map(repr, columns)) or 'none'}. "
        "Choose the text column with ?column=NAME"
    )


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence the progress bars of ``datasets`` for the duration (library code never prints)."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
