"""Where a task's text comes from: documents with stable ids, read lazily.

A *source string* names one of:

- a bundled corpus (``python``, ``c``, ``prose``, ``dialog``, ``dialog-french``, ... see ``neurospec.data.corpora``);
  the name wins over a same-named path (write ``./python`` for a directory called ``python``);
- a local ``.txt`` file: documents are separated by one or more blank lines (lines holding only whitespace);
  a file with no blank line is one document;
- a local directory of ``.txt`` files, searched recursively (hidden files and folders skipped): one document per
  file, the id is its path relative to the directory;
- a local ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json`` (a list of objects, or an object whose
  ``column`` key holds a list), ``.csv``, ``.tsv`` or ``.parquet`` file: one document per row, taken from the text
  column (``text`` unless ``column`` is given); the id is the row number;
- a local directory written by ``datasets`` ``save_to_disk``: a ``Dataset`` or a ``DatasetDict`` (then ``split``
  picks one, unless it holds a single split);
- ``hf:NAME``: a dataset loaded with ``datasets.load_dataset(NAME, config, split=..., data_files=...)``. It works
  when the hub is reachable or the dataset is in the local Hugging Face cache (set ``HF_HUB_OFFLINE=1`` to skip
  the network). ``NAME`` may be a packaged builder (``json``, ``csv``, ``parquet``, ``text``) with ``data_files``.
  ``load_dataset`` downloads and prepares the whole split, which may take much disk and time for a large
  dataset: a slice such as ``split=train[:20000]`` (percent-encoded in a source string) keeps it small.

Options follow a ``?`` as ``key=value`` pairs joined by ``&`` (values may be percent-encoded):
``column`` (text column), ``split``, ``config`` (hub configuration), ``data_files`` (hub builders) and
``streaming=true`` (``hf:`` only: read the dataset lazily, see ``neurospec.data.streaming``). Examples::

    notes.txt
    corpus/essays
    reviews.jsonl?column=body
    hf:wikitext?config=wikitext-2-raw-v1&split=test
    hf:json?data_files=data/train.jsonl
    hf:json?data_files=huge.jsonl&split=train&streaming=true

An option that a source does not use is an error, never ignored. Blank documents (empty or only whitespace, a
null cell, a JSON row without the column) are kept as documents here and skipped when tokenising; a table where no
row has the column is an error that lists the columns it has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from neurospec.data.corpora import corpus_names, get_corpus, resolve_corpus_name
from neurospec.data.documents import (
    DEFAULT_COLUMN,
    ColumnSource,
    Document,
    DocumentSource,
    FileTreeSource,
    MemorySource,
    missing_column,
    quiet_datasets,
)
from neurospec.data.streaming import open_streaming, parse_streaming
from neurospec.errors import TaskError

OPTION_KEYS = ("column", "split", "config", "data_files", "streaming")
HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
TEXT_SUFFIXES = (".txt",)
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


# --------------------------------------------------------------------------------------------------------------
# Parsing source strings


def split_options(text: str) -> tuple[str, dict[str, str]]:
    """Split ``SOURCE?key=value&...`` into the source and its options (see the module docstring).

    A string that names an existing path is taken whole, even if it holds a ``?``.
    """
    if "?" not in text or Path(text).exists():
        return text, {}
    source, _, query = text.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise TaskError(
            f"cannot parse the options {query!r} of {text!r}: write them as key=value pairs joined by '&', "
            f"e.g. {source}?column=body&split=train"
        ) from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTION_KEYS:
            raise TaskError(f"unknown option {key!r} in {text!r}; the options are {', '.join(OPTION_KEYS)}")
        if key in options:
            raise TaskError(f"option {key!r} is given twice in {text!r}")
        if not value:
            raise TaskError(f"option {key!r} has an empty value in {text!r}")
        options[key] = value
    return source, options


def source_kind(source: str) -> str:
    """One of ``corpus``, ``hub``, ``text-file``, ``text-dir``, ``table``, ``saved-dataset``; TaskError if none."""
    if source.startswith(HUB_PREFIX):
        return "hub"
    if resolve_corpus_name(source) is not None:
        return "corpus"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved-dataset"
        return "text-dir"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            return "text-file"
        if suffix in TABLE_SUFFIXES:
            return "table"
        raise TaskError(
            f"cannot read {source!r}: unsupported file type {path.suffix!r}. Use a .txt file, a directory of .txt "
            f"files, a {'/'.join(TABLE_SUFFIXES)} file, a directory saved by datasets' save_to_disk, "
            "or hf:NAME for a datasets name"
        )
    if path.exists():
        raise TaskError(f"{source!r} is neither a regular file nor a directory")
    raise TaskError(_not_found_message(source))


def _not_found_message(source: str) -> str:
    import difflib

    names = corpus_names()
    close = difflib.get_close_matches(source, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"no bundled corpus and no file or directory named {source!r}.{hint} Bundled corpora: {', '.join(names)}; "
        "or give a path to a .txt/.jsonl/.json/.csv/.tsv/.parquet file, a directory, or hf:NAME for a datasets name"
    )


_KIND_LABELS = {
    "corpus": "bundled corpus",
    "text-file": "text file",
    "text-dir": "directory of .txt files",
    "table": "table file",
    "saved-dataset": "saved dataset",
    "hub": "datasets name",
}
_ALLOWED_OPTIONS = {
    "corpus": (),
    "text-file": (),
    "text-dir": (),
    "table": ("column",),
    "saved-dataset": ("column", "split"),
    "hub": ("column", "split", "config", "data_files", "streaming"),
}


def open_source(
    source: str,
    *,
    column: str | None = None,
    split: str | None = None,
    config: str | None = None,
    data_files: str | None = None,
    streaming: str | None = None,
) -> DocumentSource:
    """Open the documents that ``source`` names (see the module docstring for the forms it takes).

    ``streaming="true"`` (``hf:`` sources only) opens a :class:`~neurospec.data.streaming.StreamingSource`, read
    lazily in stream order (see :mod:`neurospec.data.streaming`).

    Raises TaskError when the source does not exist or cannot be read, lacks the text column, holds no document,
    or is given an option it does not use.
    """
    options = {"column": column, "split": split, "config": config, "data_files": data_files, "streaming": streaming}
    kind = source_kind(source)
    unused = [k for k, v in options.items() if v is not None and k not in _ALLOWED_OPTIONS[kind]]
    if unused:
        allowed = ", ".join(_ALLOWED_OPTIONS[kind]) or "none"
        raise TaskError(
            f"option {', '.join(unused)} does not apply to {source!r} (a {_KIND_LABELS[kind]}); "
            f"its options: {allowed}"
        )
    if kind == "corpus":
        opened = get_corpus(source).open()
    elif kind == "hub" and streaming is not None:
        if parse_streaming(streaming, repr(source)):
            return open_streaming(source[len(HUB_PREFIX) :], column=column, split=split, config=config,
                                  data_files=data_files)
        opened = _open_hub(source[len(HUB_PREFIX) :], column=column, split=split, config=config,
                           data_files=data_files)
    elif kind == "hub":
        opened = _open_hub(
            source[len(HUB_PREFIX) :], column=column, split=split, config=config, data_files=data_files
        )
    elif kind == "saved-dataset":
        opened = _open_saved_dataset(Path(source).expanduser(), column=column, split=split)
    elif kind == "text-dir":
        opened = _open_text_dir(Path(source).expanduser())
    elif kind == "text-file":
        opened = _open_text_file(Path(source).expanduser())
    else:
        opened = _open_table(Path(source).expanduser(), column or DEFAULT_COLUMN)
    if len(opened) == 0:
        raise TaskError(f"{source!r} holds no documents ({opened.description}); give it some text")
    return opened


# --------------------------------------------------------------------------------------------------------------
# Local files


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_utf8(data, str(path))


def decode_utf8(data: bytes, where: str) -> str:
    """Decode UTF-8 (a leading BOM is dropped); TaskError naming the byte offset if it is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskError(
            f"{where} is not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None


def split_paragraphs(text: str) -> list[str]:
    """Documents of a .txt file: the text split at runs of blank lines, each stripped, empty ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def _open_text_file(path: Path) -> DocumentSource:
    paragraphs = split_paragraphs(_read_utf8(path))
    return MemorySource(
        [Document(str(i), p) for i, p in enumerate(paragraphs)],
        description=f"text file {path} (documents separated by blank lines)",
        licence="user data",
        identity=_file_identity(path),
    )


def _open_text_dir(path: Path) -> DocumentSource:
    source = FileTreeSource(
        path,
        ".txt",
        decode=decode_utf8,
        description=f"directory {path} (one document per .txt file)",
        licence="user data",
        skip_hidden=True,
    )
    if not source.ids():
        raise TaskError(
            f"directory {path} holds no .txt files; a directory is read as .txt files (one document each) "
            "or as a dataset saved by datasets' save_to_disk"
        )
    return source


def _open_table(path: Path, column: str) -> DocumentSource:
    suffix = path.suffix.lower()
    description = f"{path} column {column!r} (one document per row)"
    if suffix in (".jsonl", ".ndjson"):
        values: Any = _read_jsonl(path, column)
    elif suffix == ".json":
        values = _read_json(path, column)
    elif suffix in (".csv", ".tsv"):
        values = _read_csv(path, column, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        values = _read_parquet(path, column)
    if isinstance(values, list):
        return ColumnSource(
            values, description=description, licence="user data", identity=_file_identity(path)
        )
    return ColumnSource(
        values,
        description=description,
        licence="user data",
        identity=_file_identity(path),
        getter=lambda col, i: col[i].as_py(),
    )


def _text_value(value: Any, where: str, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TaskError(
        f"{where}: column {column!r} holds {type(value).__name__} values, not text; choose a text column with "
        "?column=NAME"
    )


def _column_of_rows(rows: Iterable[tuple[str, Any]], path: Path, column: str) -> list[str | None]:
    """The text column of JSON rows ``(where, row)``: a row without it is a null cell; no row with it is an error."""
    values: list[str | None] = []
    keys: dict[str, None] = {}
    found = False
    for where, row in rows:
        if not isinstance(row, dict):
            raise TaskError(f"{where} is a JSON {type(row).__name__}, not an object with a text column")
        if column in row:
            found = True
        keys.update(dict.fromkeys(row))
        values.append(_text_value(row.get(column), where, column))
    if values and not found:
        raise missing_column(str(path), column, list(keys))
    return values


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        handle = path.open(encoding="utf-8-sig")
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskError(
                        f"{where} is not valid JSON ({exc.msg}); a .jsonl file holds one JSON object per line"
                    ) from None
        except UnicodeDecodeError as exc:
            raise TaskError(f"{path} is not UTF-8 text (invalid byte {exc.object[exc.start]:#x})") from None


def _read_jsonl(path: Path, column: str) -> list[str | None]:
    return _column_of_rows(_jsonl_rows(path), path, column)


def _read_json(path: Path, column: str) -> list[str | None]:
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as exc:
        raise TaskError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); for one object per line, "
            "name the file .jsonl"
        ) from None
    if isinstance(data, dict):
        if column not in data:
            raise missing_column(str(path), column, list(data))
        rows = data[column]
        if not isinstance(rows, list):
            raise TaskError(f"{path}: key {column!r} holds a {type(rows).__name__}, not a list of texts")
        return [_text_value(v, f"{path} item {i}", column) for i, v in enumerate(rows)]
    if not isinstance(data, list):
        raise TaskError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects")
    return _column_of_rows(((f"{path} item {i}", row) for i, row in enumerate(data)), path, column)


def _read_csv(path: Path, column: str, delimiter: str) -> Any:
    import csv

    import pyarrow as pa
    from pyarrow import csv as pacsv

    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), [])
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
    if column not in header:
        raise missing_column(str(path), column, header)
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=[column], column_types={column: pa.string()}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise TaskError(f"cannot parse {path} as {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}") from None
    return table.column(column)


def _read_parquet(path: Path, column: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise missing_column(str(path), column, schema.names)
        table = pq.read_table(path, columns=[column])
    except (pa.ArrowInvalid, OSError) as exc:
        raise TaskError(f"cannot read {path} as Parquet: {exc}") from None
    values = table.column(column)
    kind = values.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise TaskError(
            f"{path}: column {column!r} has type {kind}, not text; choose a text column with ?column=NAME"
        )
    return values


# --------------------------------------------------------------------------------------------------------------
# datasets: saved to disk, or by name


def _pick_split(obj: Any, split: str | None, where: str) -> Any:
    """A Dataset from a Dataset or DatasetDict; the split must be named unless there is only one."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            if len(names) == 1:
                return obj[names[0]]
            raise TaskError(
                f"{where} has the splits {', '.join(names)}; choose one with ?split=NAME (e.g. ?split={names[0]})"
            )
        if split not in obj:
            raise TaskError(f"{where} has no split {split!r}; its splits are {', '.join(names)}")
        return obj[split]
    if isinstance(obj, datasets.Dataset):
        if split is not None and (obj.split is None or str(obj.split) != split):
            raise TaskError(
                f"{where} is a single Dataset, not a DatasetDict with a split {split!r}; drop ?split="
            )
        return obj
    raise TaskError(f"{where} is a {type(obj).__name__}, not a Dataset or DatasetDict")


def dataset_source(dataset: Any, column: str | None, where: str, licence: str) -> DocumentSource:
    """Documents from one text column of a ``datasets.Dataset`` (read lazily, row by row)."""
    import datasets

    column = column or DEFAULT_COLUMN
    if column not in dataset.column_names:
        raise missing_column(where, column, dataset.column_names)
    feature = dataset.features[column]
    if not (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "string_view")
    ):
        raise TaskError(
            f"{where}: column {column!r} has type {feature}, not text; choose one with ?column=NAME"
        )
    values = dataset.select_columns([column])
    return ColumnSource(
        values,
        description=f"{where} column {column!r} ({len(values)} rows)",
        licence=licence,
        identity=f"datasets\0{dataset._fingerprint}\0{column}",
        getter=lambda ds, i: ds[i][column],
    )


def _open_saved_dataset(path: Path, *, column: str | None, split: str | None) -> DocumentSource:
    import datasets

    try:
        with quiet_datasets():
            obj = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise TaskError(f"cannot load the dataset saved at {path}: {exc}") from None
    dataset = _pick_split(obj, split, f"dataset saved at {path}")
    return dataset_source(dataset, column, f"dataset saved at {path}", licence="user data")


def _open_hub(
    name: str, *, column: str | None, split: str | None, config: str | None, data_files: str | None
) -> DocumentSource:
    import datasets

    if not name:
        raise TaskError("hf: needs a dataset name, e.g. hf:wikitext?config=wikitext-2-raw-v1&split=test")
    where = f"dataset {name!r}" + (f" config {config!r}" if config else "")
    kwargs: dict[str, Any] = {}
    if data_files is not None:
        kwargs["data_files"] = data_files
    try:
        with quiet_datasets():
            obj = datasets.load_dataset(name, config, split=split, **kwargs)
    except (
        Exception
    ) as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise TaskError(
            f"cannot load {where} with datasets ({type(exc).__name__}: {exc}). It needs the Hugging Face hub or "
            "a copy in the local cache; offline, pass a local file instead (.txt, .jsonl, .csv, .parquet) or a "
            "directory written by Dataset.save_to_disk"
        ) from None
    # With a split, load_dataset has already chosen it and returns a Dataset.
    dataset = _pick_split(obj, None, where)
    if data_files is not None:
        licence = "user data"
    else:
        licence = getattr(dataset.info, "license", None) or f"see the card of dataset {name!r}"
    return dataset_source(dataset, column, where, licence=licence)
