"""Bundled corpora: text that every installation has, so tasks work offline and out of the box.

==================  ============================================================  ===================================
name                documents                                                     licence
==================  ============================================================  ===================================
``python``          the running interpreter's standard-library ``*.py`` files     PSF License
``c``               the interpreter's C headers (``*.h``)                         PSF License
``prose``           the English help topics of ``pydoc_data.topics``              PSF License
``dialog``          the English conversations of chatterbot-corpus                BSD-3-Clause, (c) Gunther Cox
``dialog-<lang>``   the same for each language chatterbot-corpus ships            BSD-3-Clause, (c) Gunther Cox
==================  ============================================================  ===================================

``python`` skips ``site-packages`` and ``pydoc_data`` (the latter is the ``prose`` corpus written as a Python
literal: keeping it would put the same English text in two tasks). A chatterbot conversation is one document, its
turns joined by newlines; exact duplicate conversations are dropped (the English files repeat some hundreds of
times). ``dialog-fr``, ``dialog-de``, ... are aliases of ``dialog-french``, ``dialog-german``, ...

Every corpus yields ``Document(id, text)`` in a deterministic order and reports its size lazily; for the file
corpora the size is an estimate from file sizes, so listing corpora reads no file.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from neurospec.data.documents import Document, DocumentSource, FileTreeSource, MemorySource
from neurospec.errors import TaskError

PSF = "PSF License (Python standard library)"
CHATTERBOT = "BSD-3-Clause, (c) Gunther Cox (chatterbot-corpus)"


@dataclass(frozen=True)
class CorpusSize:
    """Documents and characters of a corpus; ``exact`` is False where characters are estimated from bytes."""

    documents: int
    characters: int
    exact: bool


@dataclass(frozen=True)
class Corpus:
    """A bundled corpus: ``open()`` returns its documents (reading lazily where it can)."""

    name: str
    description: str
    origin: str
    licence: str
    open: Callable[[], DocumentSource] = field(repr=False)
    measure: Callable[[], CorpusSize] = field(repr=False)

    def documents(self) -> Iterator[Document]:
        """All documents, in a deterministic order."""
        return self.open().documents()

    def size(self) -> CorpusSize:
        """Documents and characters (cached; estimated from file sizes for file corpora). TaskError if missing."""
        return _cached_size(self.name, self.measure)


@functools.cache
def _cached_size(name: str, measure: Callable[[], CorpusSize]) -> CorpusSize:
    return measure()


_REGISTRY: dict[str, Corpus] = {}
_ALIASES: dict[str, str] = {}


def register_corpus(corpus: Corpus) -> Corpus:
    """Add a corpus; a name that is already a corpus or an alias is an error."""
    if corpus.name in _REGISTRY or corpus.name in _ALIASES:
        raise ValueError(f"corpus {corpus.name!r} is already registered")
    _REGISTRY[corpus.name] = corpus
    return corpus


def register_alias(alias: str, name: str) -> None:
    """Let ``alias`` stand for the registered corpus ``name``."""
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"corpus name {alias!r} is already registered")
    if name not in _REGISTRY:
        raise ValueError(f"alias {alias!r} points to the unknown corpus {name!r}")
    _ALIASES[alias] = name


def resolve_corpus_name(name: str) -> str | None:
    """The registered name that ``name`` (a name or an alias) stands for, or None."""
    if name in _REGISTRY:
        return name
    return _ALIASES.get(name)


def corpus_names() -> tuple[str, ...]:
    """Registered names (no aliases), in registration order."""
    return tuple(_REGISTRY)


def list_corpora() -> tuple[Corpus, ...]:
    return tuple(_REGISTRY.values())


def corpus_rows() -> list[dict[str, object]]:
    """One JSON-ready row per corpus for listings: name, description, origin, licence, documents, characters,
    exact (False where characters are estimated), aliases; ``error`` instead of the sizes if it is unavailable."""
    rows: list[dict[str, object]] = []
    for corpus in _REGISTRY.values():
        row: dict[str, object] = {
            "name": corpus.name,
            "description": corpus.description,
            "origin": corpus.origin,
            "licence": corpus.licence,
            "aliases": [alias for alias, target in _ALIASES.items() if target == corpus.name],
        }
        try:
            size = corpus.size()
        except TaskError as exc:
            row["error"] = str(exc)
        else:
            row.update(documents=size.documents, characters=size.characters, exact=size.exact)
        rows.append(row)
    return rows


def get_corpus(name: str) -> Corpus:
    """The corpus called ``name`` (or an alias of it); TaskError listing the corpora if there is none."""
    resolved = resolve_corpus_name(name)
    if resolved is None:
        import difflib

        close = difflib.get_close_matches(name, [*_REGISTRY, *_ALIASES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TaskError(f"no bundled corpus named {name!r}.{hint} Bundled corpora: {', '.join(_REGISTRY)}")
    return _REGISTRY[resolved]


# --------------------------------------------------------------------------------------------------------------
# python and c: files of the running interpreter


def _decode_python(data: bytes, where: str) -> str:
    """Decode Python source as the interpreter would (coding cookie, else UTF-8); bad bytes become U+FFFD."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:
        encoding = "utf-8"
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _decode_lenient(data: bytes, where: str) -> str:
    return data.decode("utf-8", errors="replace")


def _stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise TaskError(f"the Python standard library is not at {root}; the python corpus needs it")
    return root


def _include_root() -> Path:
    root = Path(sysconfig.get_paths()["include"])
    if not root.is_dir() or not any(root.rglob("*.h")):
        raise TaskError(
            f"the C headers of this Python are not installed (looked in {root}); install them (the python3-dev "
            "package or your distribution's equivalent), or choose another task"
        )
    return root


def _python_source() -> FileTreeSource:
    return FileTreeSource(
        _stdlib_root(),
        ".py",
        decode=_decode_python,
        description=f"Python {sys.version.split()[0]} standard library",
        licence=PSF,
        skip_dirs=("site-packages", "dist-packages", "__pycache__", "pydoc_data"),
    )


def _c_source() -> FileTreeSource:
    return FileTreeSource(
        _include_root(),
        ".h",
        decode=_decode_lenient,
        description=f"CPython {sys.version.split()[0]} C headers",
        licence="PSF License (CPython C headers)",
    )


def _tree_size(open_source: Callable[[], FileTreeSource]) -> Callable[[], CorpusSize]:
    def measure() -> CorpusSize:
        source = open_source()
        return CorpusSize(documents=len(source.ids()), characters=source.total_bytes(), exact=False)

    return measure


def _memory_size(open_source: Callable[[], DocumentSource]) -> Callable[[], CorpusSize]:
    def measure() -> CorpusSize:
        docs = list(open_source().documents())
        return CorpusSize(documents=len(docs), characters=sum(len(d.text) for d in docs), exact=True)

    return measure


# --------------------------------------------------------------------------------------------------------------
# prose: pydoc help topics


@functools.lru_cache(maxsize=1)
def _prose_documents() -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    return tuple(Document(key, topics[key]) for key in sorted(topics))


def _prose_source() -> MemorySource:
    return MemorySource(
        _prose_documents(),
        description=f"Python {sys.version.split()[0]} help topics (pydoc_data.topics)",
        licence=PSF,
        identity=f"prose\0{sys.version}",
    )


# --------------------------------------------------------------------------------------------------------------
# dialog: chatterbot-corpus


def chatterbot_data() -> Path | None:
    """The data folder of the installed ``chatterbot_corpus`` package, or ``None`` when it is not installed."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if data.is_dir() else None


@functools.cache
def dialog_documents(language: str) -> tuple[Document, ...]:
    """The conversations of the bundled dialog corpus in ``language``, one document per conversation file."""
    import yaml

    data = chatterbot_data()
    if data is None:
        raise TaskError(
            "the dialog corpora need the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs: list[Document] = []
    seen: set[str] = set()
    for path in sorted((data / language).glob("*.yml")):
        with path.open(encoding="utf-8") as handle:
            content = yaml.load(handle, Loader=loader)
        conversations = content.get("conversations", []) if isinstance(content, dict) else []
        for index, conversation in enumerate(conversations):
            if isinstance(conversation, list):
                text = "\n".join(str(turn).strip() for turn in conversation if turn is not None)
            else:  # a few entries are a single string (an indentation slip in the YAML)
                text = str(conversation).strip()
            if text and text not in seen:
                seen.add(text)
                docs.append(Document(f"{path.stem}/{index}", text))
    return tuple(docs)


def _dialog_opener(language: str) -> Callable[[], DocumentSource]:
    def open_dialog() -> DocumentSource:
        import chatterbot_corpus

        return MemorySource(
            dialog_documents(language),
            description=f"chatterbot-corpus {chatterbot_corpus.__version__}, {language} conversations",
            licence=CHATTERBOT,
            identity=f"dialog\0{language}\0{chatterbot_corpus.__version__}",
        )

    return open_dialog


# ISO 639-1 codes (zh-tw for traditional Chinese) of the languages chatterbot-corpus ships.
_LANGUAGE_CODES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
    "hebrew": "he", "hindi": "hi", "indonesian": "id", "italian": "it", "japanese": "ja", "korean": "ko",
    "marathi": "mr", "oriya": "or", "persian": "fa", "portuguese": "pt", "russian": "ru", "spanish": "es",
    "swedish": "sv", "tamil": "ta", "telugu": "te", "thai": "th", "traditionalchinese": "zh-tw", "turkish": "tr",
    "ukrainian": "uk", "urdu": "ur", "yoruba": "yo",
}  # fmt: skip


def _register_builtin() -> None:
    register_corpus(
        Corpus(
            "python",
            "Python source: the standard library of the running interpreter (*.py)",
            "sysconfig stdlib path, without site-packages and pydoc_data",
            PSF,
            _python_source,
            _tree_size(_python_source),
        )
    )
    register_corpus(
        Corpus(
            "c",
            "C source: the running interpreter's C headers (*.h)",
            "sysconfig include path",
            "PSF License (CPython C headers)",
            _c_source,
            _tree_size(_c_source),
        )
    )
    register_corpus(
        Corpus(
            "prose",
            "English technical prose: the Python help topics, one document per topic",
            "pydoc_data.topics",
            PSF,
            _prose_source,
            _memory_size(_prose_source),
        )
    )
    data = chatterbot_data()
    languages = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.yml"))) if data else []
    register_corpus(
        Corpus(
            "dialog",
            "English dialogue: chatterbot-corpus conversations, one document per conversation",
            "chatterbot-corpus data/english",
            CHATTERBOT,
            _dialog_opener("english"),
            _memory_size(_dialog_opener("english")),
        )
    )
    register_alias("dialog-english", "dialog")
    register_alias("dialog-en", "dialog")
    for language in languages:
        if language == "english":
            continue
        name = f"dialog-{language}"
        register_corpus(
            Corpus(
                name,
                f"{language.capitalize()} dialogue: chatterbot-corpus conversations",
                f"chatterbot-corpus data/{language}",
                CHATTERBOT,
                _dialog_opener(language),
                _memory_size(_dialog_opener(language)),
            )
        )
        if language in _LANGUAGE_CODES:
            register_alias(f"dialog-{_LANGUAGE_CODES[language]}", name)


_register_builtin()
