"""Task specs, and turning a task's documents into fixed-length token blocks with disjoint splits.

A *task spec* is written ``NAME=SOURCE`` or just ``SOURCE`` (see ``neurospec.data.sources`` for sources and their
``?key=value`` options)::

    python                              the bundled corpus, task name "python"
    dialog-fr                           alias of dialog-french, task name "dialog-french"
    mycode=path/to/dir                  a directory of .txt files, task name "mycode"
    reviews.jsonl?column=body           task name "reviews" (the file's stem)
    wiki=hf:wikitext?config=wikitext-2-raw-v1&split=test
    qa=data/qa?split=train,eval=data/qa?split=test
                                        collection split from one source, evaluation split from another
    code=train.txt,eval=test.txt

``SOURCE,eval=EVAL_SOURCE`` (each with its own ``?options``) takes the whole collection split from ``SOURCE`` and
the whole evaluation split from ``EVAL_SOURCE`` (say, a saved dataset's ``train`` and ``test`` splits, the
published protocol); neither source is split again, and the two are not checked for shared documents.

A name is 1-64 letters, digits, ``_``, ``-`` or ``.``, starting with a letter or digit; ``NAME=`` is recognised
only when the text before the first ``=`` is such a name (so ``./a=b.txt`` is a path).

How ``build_task_data`` makes the blocks, for each split (``collect`` and ``eval``):

1. Every document goes to the evaluation split when a stable hash of ``(seed, doc_id)`` falls below
   ``eval_fraction``, else to the collection split, so no document feeds both splits (with a separate evaluation
   source, every document of ``SOURCE`` goes to the collection split and every one of ``EVAL_SOURCE`` to the
   evaluation split). An exact duplicate of a
   document already used (in either split) is skipped, so no text appears twice.
2. Documents are visited in a seeded shuffle (sorting by a stable hash of ``(seed, doc_id)``); blank ones are
   skipped. A streamed source (``hf:...&streaming=true``) is visited in stream order instead, with the same split
   of each document (``neurospec.data.streaming``). Only documents of a split that still needs tokens are read and tokenised, so a large corpus is never
   tokenised whole.
3. Each document is tokenised without special tokens; documents are joined with one separator token between
   neighbours: the tokenizer's eos token, else its sep token, else nothing.
4. The stream is cut into ``ceil(tokens / seq_len)`` blocks of exactly ``seq_len`` tokens; the rest is dropped. If
   the split runs out of documents, it gets as many whole blocks as there are (``SplitInfo.complete`` is False).

Dimensions: ``blocks`` sequences of ``seq`` = ``seq_len`` token ids (int64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import numpy as np
import torch

from neurospec.data.corpora import resolve_corpus_name
from neurospec.data.sources import HUB_PREFIX, OPTION_KEYS, DocumentSource, open_source, split_options
from neurospec.data.streaming import StreamingSource
from neurospec.errors import TaskError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("collect", "eval")
DATA_FORMAT = 1  # bump when the packing changes what a spec and a tokenizer produce
SPEC_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
EVAL_MARK = ",eval="  # NAME=SOURCE,eval=EVAL_SOURCE
_PROBE = (
    "neurospec tokenizer probe. The quick brown fox jumps over the lazy dog; déjà vu, naïve café, 3.14159 and "
    "1,000,000.\n\tdef f(x):\n\t\treturn x ** 2  # comment\n<html>&amp;</html> 日本語 Ελληνικά русский 😀 "
    "UPPER lower MiXeD   spaces\r\n"
)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: a name and where its text comes from (``source`` plus the options that apply to it)."""

    name: str
    source: str
    column: str | None = None
    split: str | None = None
    config: str | None = None
    data_files: str | None = None
    streaming: str | None = None  # "true": an hf: source read lazily (neurospec.data.streaming)
    evaluation: TaskSpec | None = None  # a separate source of the evaluation split (same name, no evaluation)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise TaskError(
                f"task name {self.name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                "letter or digit"
            )
        if not isinstance(self.source, str) or not self.source.strip():
            raise TaskError(f"task {self.name!r} has an empty source")
        for key, value in self.options().items():
            if not isinstance(value, str) or not value:
                raise TaskError(f"task {self.name!r}: option {key} must be a non-empty string, got {value!r}")
        if self.evaluation is not None:
            ev = self.evaluation
            if not isinstance(ev, TaskSpec) or ev.evaluation is not None or ev.name != self.name:
                raise TaskError(
                    f"task {self.name!r}: its evaluation source must be a TaskSpec of the same name without an "
                    f"evaluation source of its own, got {ev!r}"
                )

    def options(self) -> dict[str, str]:
        """The options that are set (``column``, ``split``, ``config``, ``data_files``)."""
        values = {key: getattr(self, key) for key in OPTION_KEYS}
        return {key: value for key, value in values.items() if value is not None}

    def open(self) -> DocumentSource:
        """The documents of this task (TaskError if the source cannot be read)."""
        return open_source(self.source, **self.options())

    def _body(self) -> str:
        body = self.source
        if self.options():
            body += "?" + urlencode(self.options(), safe="/:,*")
        return body

    def to_string(self) -> str:
        """The spec as ``parse_task_spec`` reads it: ``parse_task_spec(spec.to_string()) == spec``."""
        body = self._body()
        if self.evaluation is not None:
            return f"{self.name}={body}{EVAL_MARK}{self.evaluation._body()}"
        if self.name == self.source and not self.options():
            return body
        return f"{self.name}={body}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``evaluation`` appears only when set (so a plain spec's dict, and its fingerprints, are
        those of earlier versions)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evaluation"}
        if self.streaming is None:  # absent when unset, so earlier specs keep their dicts and fingerprints
            del data["streaming"]
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation.to_dict()
        return {"type": "task_spec", "version": SPEC_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        data = dict(data)
        if data.pop("type", None) != "task_spec" or data.pop("version", None) != SPEC_VERSION:
            raise TaskError(f"not a version-{SPEC_VERSION} task_spec: {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskError(f"unknown task_spec keys {unknown}; known keys are {sorted(known)}")
        if data.get("evaluation") is not None:
            data["evaluation"] = cls.from_dict(data["evaluation"])
        return cls(**data)


def parse_task_spec(text: str) -> TaskSpec:
    """Read ``NAME=SOURCE[?options]`` or ``SOURCE[?options]`` (see the module docstring).

    Without a name, a bundled corpus keeps its own name; a path gives its file stem (or directory name); ``hf:NAME``
    gives the last part of NAME (or the stem of ``data_files``). Corpus aliases are resolved here.
    """
    if not isinstance(text, str) or not text.strip():
        raise TaskError("empty task spec; write a bundled corpus name (e.g. python), a path, or NAME=SOURCE")
    text = text.strip()
    if EVAL_MARK in text and not Path(text).exists():
        head, _, eval_text = text.partition(EVAL_MARK)
        if EVAL_MARK in eval_text:
            raise TaskError(f"task spec {text!r} has {EVAL_MARK!r} more than once; give one evaluation source")
        spec = parse_task_spec(head)
        eval_source, eval_options = split_options(eval_text.strip())
        if not eval_source:
            raise TaskError(f"task {spec.name!r} has an empty evaluation source; write NAME=SOURCE,eval=SOURCE")
        evaluation = TaskSpec(name=spec.name, source=resolve_corpus_name(eval_source) or eval_source, **eval_options)
        return dataclasses.replace(spec, evaluation=evaluation)
    name: str | None = None
    head, sep, rest = text.partition("=")
    if sep and _NAME_RE.fullmatch(head) and not Path(text).exists():
        name, text = head, rest
    source, options = split_options(text)
    if not source:
        raise TaskError(f"task {name!r} has an empty source; write NAME=SOURCE")
    source = resolve_corpus_name(source) or source
    if name is None:
        name = _default_name(source, options)
    return TaskSpec(name=name, source=source, **options)


def _default_name(source: str, options: Mapping[str, str]) -> str:
    if resolve_corpus_name(source) is not None:
        return source
    if source.startswith(HUB_PREFIX):
        files = options.get("data_files")
        base = Path(files).stem if files else source[len(HUB_PREFIX) :].rstrip("/").split("/")[-1]
    else:
        path = Path(source).expanduser()
        base = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-._")[:64]
    if not _NAME_RE.fullmatch(name):
        raise TaskError(f"cannot derive a task name from {source!r}; name the task: NAME={source}")
    return name


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SplitInfo:
    """How one split was filled.

    ``requested_blocks`` = ceil(requested tokens / seq_len); ``blocks`` = rows of the split's tensor (fewer when the
    split ran out of documents: ``exhausted``). ``doc_ids`` are the documents with tokens in the blocks, in stream
    order; ``tokens_read`` counts the tokens of every document read for the split (separators included);
    ``duplicates`` counts documents skipped as exact copies of one already used.
    """

    requested_blocks: int
    blocks: int
    doc_ids: tuple[str, ...]
    tokens_read: int
    exhausted: bool
    duplicates: int = 0

    @property
    def documents(self) -> int:
        return len(self.doc_ids)

    @property
    def complete(self) -> bool:
        return self.blocks >= self.requested_blocks

    def to_dict(self, *, with_ids: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["doc_ids"] = list(self.doc_ids)
        if not with_ids:
            del data["doc_ids"]
            data["documents"] = self.documents
        return data


@dataclass(frozen=True, eq=False)
class TaskData:
    """A task's token blocks: ``collect`` and ``eval`` are int64 tensors of shape ``[blocks, seq]``.

    ``fingerprint`` is a sha256 over the spec, the tokenizer's identity, seq_len, seed, budgets and eval fraction,
    the ids and contents of the documents used and the resulting blocks: identical inputs give the identical
    fingerprint. ``licence`` is the source's licence or attribution.
    """

    name: str
    spec: TaskSpec
    collect: torch.Tensor
    eval: torch.Tensor
    fingerprint: str
    n_documents: int
    licence: str
    seq_len: int
    seed: int
    eval_fraction: float
    separator_id: int | None
    collect_info: SplitInfo
    eval_info: SplitInfo

    def info(self, split: str) -> SplitInfo:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; the splits are {SPLITS}")
        return self.collect_info if split == "collect" else self.eval_info

    @property
    def available(self) -> dict[str, int]:
        """Tokens in the blocks of each split (a multiple of seq_len)."""
        return {split: self.info(split).blocks * self.seq_len for split in SPLITS}

    @property
    def requested(self) -> dict[str, int]:
        """Tokens asked for, rounded up to whole blocks."""
        return {split: self.info(split).requested_blocks * self.seq_len for split in SPLITS}

    @property
    def complete(self) -> bool:
        """Whether both splits got every block asked for."""
        return self.collect_info.complete and self.eval_info.complete

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for manifests (document ids left out)."""
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "fingerprint": self.fingerprint,
            "licence": self.licence,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "separator_id": self.separator_id,
            "n_documents": self.n_documents,
            "splits": {split: self.info(split).to_dict(with_ids=False) for split in SPLITS},
        }


# --------------------------------------------------------------------------------------------------------------
# Tokenizer helpers


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token put between documents: eos, else sep, else None (documents simply abut)."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return encoded["input_ids"]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, *, exact: bool = False) -> dict[str, Any]:
    """What identifies a tokenizer: vocabulary size, a hash of a fixed probe's token ids and the separator.

    With ``exact``, also a hash of the fast tokenizer's full definition (without padding and truncation
    settings), or None when there is none.
    """
    probe = _encode(tokenizer, [_PROBE])[0]
    identity: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "probe_sha256": hashlib.sha256(json.dumps(probe).encode()).hexdigest(),
        "separator_id": separator_id(tokenizer),
    }
    if exact:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        definition = None
        if backend is not None:
            spec = json.loads(backend.to_str())
            spec.pop("truncation", None)
            spec.pop("padding", None)
            definition = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        identity["definition_sha256"] = definition
    return identity


# --------------------------------------------------------------------------------------------------------------
# Splitting and packing


def _hash64(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_split(doc_id: str, *, eval_fraction: float, seed: int) -> str:
    """``"eval"`` or ``"collect"``: stable for a document id, seed and fraction."""
    return "eval" if _hash64("split", str(seed), doc_id) < eval_fraction * 2**64 else "collect"


def shuffled_ids(ids: Sequence[str], seed: int) -> list[str]:
    """The ids in a seeded order that does not depend on their input order."""
    return sorted(ids, key=lambda doc_id: (_hash64("order", str(seed), doc_id), doc_id))


@dataclass
class _Stream:
    """One split's token stream while it is filled: pieces (documents and separators) and document offsets."""

    wanted: int  # tokens: requested blocks * seq_len
    pieces: list[np.ndarray] = dataclasses.field(default_factory=list)
    starts: list[tuple[str, int, bytes]] = dataclasses.field(
        default_factory=list
    )  # (id, offset, text sha256)
    length: int = 0
    duplicates: int = 0

    @property
    def full(self) -> bool:
        return self.length >= self.wanted


def _fill_streams(
    source: DocumentSource,
    tokenizer: PreTrainedTokenizerBase,
    separator: int | None,
    streams: dict[str, _Stream],
    *,
    eval_fraction: float,
    seed: int,
) -> None:
    """Read, tokenise and append documents until every stream is full or the documents run out.

    Documents are read and tokenised in batches (bounded by characters) for speed; the batch is then consumed in
    order, so the result is the same as one document at a time.
    """
    if isinstance(source, StreamingSource):  # stream order: no ids up front (neurospec.data.streaming)
        pending = source.in_order()
    else:
        pending = ((doc_id, None) for doc_id in shuffled_ids(source.ids(), seed))
    used: set[bytes] = set()
    while not all(stream.full for stream in streams.values()):
        remaining = sum(s.wanted - s.length for s in streams.values() if not s.full)
        budget = min(max(4 * remaining, 4_000), 2_000_000)
        batch: list[tuple[str, str, str]] = []
        chars = 0
        for doc_id, text in pending:
            split = assign_split(doc_id, eval_fraction=eval_fraction, seed=seed)
            if streams[split].full:
                continue
            if text is None:
                text = source.read(doc_id)
            if not text.strip():
                continue
            batch.append((doc_id, split, text))
            chars += len(text)
            if chars >= budget:
                break
        if not batch:
            return
        for (doc_id, split, text), ids in zip(
            batch, _encode(tokenizer, [t for _, _, t in batch]), strict=True
        ):
            stream = streams[split]
            if stream.full or not ids:
                continue
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if digest in used:
                stream.duplicates += 1
                continue
            used.add(digest)
            if stream.length and separator is not None:
                stream.pieces.append(np.array([separator], dtype=np.int64))
                stream.length += 1
            stream.starts.append((doc_id, stream.length, digest))
            stream.pieces.append(np.asarray(ids, dtype=np.int64))
            stream.length += len(ids)


def _blocks(stream: _Stream, seq_len: int) -> torch.Tensor:
    kept = min(stream.length, stream.wanted) // seq_len * seq_len
    flat = np.concatenate(stream.pieces) if stream.pieces else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(flat[:kept].copy()).reshape(-1, seq_len)


def _check_budgets(
    seq_len: Any, collect_tokens: Any, eval_tokens: Any, eval_fraction: Any, seed: Any
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(seq_len) or seq_len < 1:
        raise TaskError(f"seq_len must be a positive integer, got {seq_len!r}")
    for label, value in (("collect_tokens", collect_tokens), ("eval_tokens", eval_tokens)):
        if not is_int(value) or value < 0:
            raise TaskError(f"{label} must be a non-negative integer, got {value!r}")
    if collect_tokens == 0 and eval_tokens == 0:
        raise TaskError("both collect_tokens and eval_tokens are 0: ask for some tokens")
    if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction <= 1.0:
        raise TaskError(f"eval_fraction must be between 0 and 1, got {eval_fraction!r}")
    if not is_int(seed):
        raise TaskError(f"seed must be an integer, got {seed!r}")


def _too_small(
    spec: TaskSpec, split: str, info: SplitInfo, seq_len: int, eval_fraction: float, total: int | None
) -> TaskError:
    label = "collection" if split == "collect" else "evaluation"
    fraction = "larger" if split == "eval" else "smaller"
    whole = f"; the whole source holds {total} tokens" if total is not None else ""
    return TaskError(
        f"task {spec.name!r}: its {label} split ({info.documents} documents, eval_fraction={eval_fraction}) holds "
        f"only {info.tokens_read} tokens{whole}, less than one block of seq_len={seq_len}. Use a smaller "
        f"--seq-len, give the task more text, or a {fraction} eval fraction"
    )


def _too_small_source(spec: TaskSpec, split: str, info: SplitInfo, seq_len: int) -> TaskError:
    label, where = ("collection", spec.source) if split == "collect" else ("evaluation", spec.evaluation.source)
    return TaskError(
        f"task {spec.name!r}: its {label} source {where!r} ({info.documents} documents) holds only "
        f"{info.tokens_read} tokens, less than one block of seq_len={seq_len}. Use a smaller --seq-len or give "
        "that source more text"
    )


def check_task_names(names: Sequence[str]) -> None:
    """TaskError when two tasks have the same name, or names that differ only by case: a task's name becomes file
    names (``stats/NAME.safetensors``, ``prune/NAME/``), and those collide on case-insensitive file systems
    (macOS and Windows by default)."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.get(name.casefold())
        if other == name:
            raise TaskError(f"task {name!r} is named more than once")
        if other is not None:
            raise TaskError(
                f"tasks {other!r} and {name!r} differ only by case: their files would collide on case-insensitive "
                "file systems (macOS, Windows); rename one of them (NAME=SOURCE)"
            )
        seen[name.casefold()] = name


def build_task_data(
    spec: TaskSpec | str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    collect_tokens: int,
    eval_tokens: int,
    eval_fraction: float = 0.2,
    seed: int = 0,
    cache: bool = True,
) -> TaskData:
    """Tokenise and pack a task into ``collect`` and ``eval`` blocks of ``seq_len`` tokens (module docstring).

    ``spec`` is a TaskSpec or a string for ``parse_task_spec``; ``tokenizer`` a ``transformers`` tokenizer. Each
    split gets ``ceil(tokens / seq_len)`` blocks, or fewer if the data runs out (see ``SplitInfo.complete``); a
    split asked for tokens that gets no block at all is a TaskError. Only the documents needed are read and
    tokenised. With ``cache``, the blocks are stored under ``$NEUROSPEC_CACHE/tasks`` (default: the user cache
    directory) as safetensors, keyed by the spec, the source's files (sizes and times) or dataset fingerprint,
    the tokenizer's full definition and the arguments; the cache is skipped for sources it cannot identify.
    """
    if isinstance(spec, str):
        spec = parse_task_spec(spec)
    _check_budgets(seq_len, collect_tokens, eval_tokens, eval_fraction, seed)
    source = spec.open()
    eval_source = spec.evaluation.open() if spec.evaluation is not None else None
    arguments = {
        "seq_len": seq_len,
        "collect_tokens": collect_tokens,
        "eval_tokens": eval_tokens,
        "eval_fraction": float(eval_fraction),
        "seed": seed,
    }
    cache_path = _cache_path(spec, [source, eval_source], tokenizer, arguments) if cache else None
    if cache_path is not None:
        cached = _load_cached(cache_path, spec)
        if cached is not None:
            return cached

    separator = separator_id(tokenizer)
    budgets = {"collect": collect_tokens, "eval": eval_tokens}
    streams = {split: _Stream(wanted=math.ceil(budgets[split] / seq_len) * seq_len) for split in SPLITS}
    if eval_source is None:
        _fill_streams(source, tokenizer, separator, streams, eval_fraction=float(eval_fraction), seed=seed)
    else:  # each split wholly from its own source: fraction 0 sends every document to collect, 1 to eval
        _fill_streams(source, tokenizer, separator, {"collect": streams["collect"]}, eval_fraction=0.0, seed=seed)
        _fill_streams(eval_source, tokenizer, separator, {"eval": streams["eval"]}, eval_fraction=1.0, seed=seed)

    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, SplitInfo] = {}
    header = {
        "format": DATA_FORMAT,
        "spec": spec.to_dict(),
        "tokenizer": tokenizer_identity(tokenizer),
        **arguments,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for split in SPLITS:
        stream = streams[split]
        tensors[split] = _blocks(stream, seq_len)
        kept = tensors[split].numel()
        used = [(doc_id, sha) for doc_id, start, sha in stream.starts if start < kept]
        infos[split] = SplitInfo(
            requested_blocks=stream.wanted // seq_len,
            blocks=tensors[split].shape[0],
            doc_ids=tuple(doc_id for doc_id, _ in used),
            tokens_read=stream.length,
            exhausted=not stream.full,
            duplicates=stream.duplicates,
        )
        digest.update(f"\0split\0{split}\0".encode())
        for doc_id, sha in used:
            digest.update(doc_id.encode("utf-8", "surrogatepass") + b"\0" + sha)
        digest.update(tensors[split].numpy().tobytes())

    total = sum(s.length for s in streams.values()) if all(not s.full for s in streams.values()) else None
    for split in SPLITS:
        if infos[split].requested_blocks > 0 and infos[split].blocks == 0:
            if eval_source is not None:
                raise _too_small_source(spec, split, infos[split], seq_len)
            raise _too_small(spec, split, infos[split], seq_len, float(eval_fraction), total)

    data = TaskData(
        name=spec.name,
        spec=spec,
        collect=tensors["collect"],
        eval=tensors["eval"],
        fingerprint=digest.hexdigest(),
        n_documents=infos["collect"].documents + infos["eval"].documents,
        licence=source.licence if eval_source is None or eval_source.licence == source.licence
        else f"collection: {source.licence}; evaluation: {eval_source.licence}",
        seq_len=seq_len,
        seed=seed,
        eval_fraction=float(eval_fraction),
        separator_id=separator,
        collect_info=infos["collect"],
        eval_info=infos["eval"],
    )
    if cache_path is not None:
        _store_cached(cache_path, data)
    return data




# --------------------------------------------------------------------------------------------------------------
# Cache of tokenised tasks (safetensors + JSON metadata; never pickle)


def cache_dir() -> Path:
    """``$NEUROSPEC_CACHE`` if set, else the user cache directory of neurospec."""
    configured = os.environ.get("NEUROSPEC_CACHE")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("neurospec"))


def _cache_path(
    spec: TaskSpec, sources: Sequence[DocumentSource | None], tokenizer: PreTrainedTokenizerBase,
    arguments: dict[str, Any]
) -> Path | None:
    identities = [s.identity() for s in sources if s is not None]
    if any(i is None for i in identities):
        return None
    source_identity = identities[0] if len(identities) == 1 else "\0eval\0".join(identities)
    tokenizer_id = tokenizer_identity(tokenizer, exact=True)
    if tokenizer_id["definition_sha256"] is None:
        return None
    key = {
        "format": DATA_FORMAT,
        "spec": spec.to_dict(),
        "source": source_identity,
        "tokenizer": tokenizer_id,
        **arguments,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "tasks" / f"{spec.name}-{digest[:32]}.safetensors"


def _load_cached(path: Path, spec: TaskSpec) -> TaskData | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["neurospec_task"])
            tensors = {split: handle.get_tensor(split) for split in SPLITS}
        if TaskSpec.from_dict(meta["spec"]) != spec:
            return None
        infos = {split: SplitInfo(**{**meta["splits"][split], "doc_ids": tuple(meta["splits"][split]["doc_ids"])})
                 for split in SPLITS}  # fmt: skip
        return TaskData(
            name=spec.name,
            spec=spec,
            collect=tensors["collect"],
            eval=tensors["eval"],
            fingerprint=meta["fingerprint"],
            n_documents=meta["n_documents"],
            licence=meta["licence"],
            seq_len=meta["seq_len"],
            seed=meta["seed"],
            eval_fraction=meta["eval_fraction"],
            separator_id=meta["separator_id"],
            collect_info=infos["collect"],
            eval_info=infos["eval"],
        )
    except Exception:  # an unreadable or outdated entry is a cache miss; it is rewritten
        return None


def _store_cached(path: Path, data: TaskData) -> None:
    from safetensors.torch import save_file

    meta = data.describe()
    meta["splits"] = {split: data.info(split).to_dict() for split in SPLITS}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"collect": data.collect.contiguous(), "eval": data.eval.contiguous()},
            str(tmp),
            metadata={"neurospec_task": json.dumps(meta)},
        )
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the task cache {path}: {exc}", stacklevel=3)
