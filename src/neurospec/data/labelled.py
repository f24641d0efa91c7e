"""Labelled classification tasks: texts (or images) with class labels and disjoint train/dev/test splits.

A labelled task spec is written ``NAME=SOURCE?key=value&...`` or ``SOURCE``. Sources:

===========================  ==================================================================================
``language-id``              which chatterbot-corpus language a conversation is in (multi-class; option
                             ``languages=english,french,...``, default: the eight with the most conversations
                             among the Latin-script ones)
``python-vs-c``              a snippet of the Python standard library vs one of CPython's C headers (binary)
``topic-<category>``         an English chatterbot-corpus conversation of ``<category>`` vs one of any other
                             category (binary one-vs-rest), for each category with at least 20 conversations
``digits``                   scikit-learn's 8x8 hand-written digits, ten classes (images, for the ViT)
a ``.csv``/``.tsv``/         the user's rows: options ``text=COLUMN`` (default ``text``), ``label=COLUMN``
``.jsonl``/``.parquet`` file (default ``label``), ``split=NAME`` for a saved ``DatasetDict``
or a saved dataset folder
===========================  ==================================================================================

Common options: ``per_class=N`` caps the examples per class (default 200 for bundled text tasks, none for user
data).

Splitting (:func:`make_labelled`): exact duplicate items are dropped (the first in a seeded order is kept), so
no text is in two splits. Every class is cut to the size of the smallest one (balanced), and each class is split
by the fractions (default 60/20/20) in a seeded order: a stable hash (sha256) of the seed, the class and the
item, never Python's salted ``hash()``. Each split must hold at least ``min_per_split`` examples of every class.
The ``digits`` task keeps the fixed test images of :func:`neurospec.data.digits.digits_split` as its test
split (the zoo's models never trained on them) and splits the training images into train and dev.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from neurospec.data.corpora import CHATTERBOT, PSF, chatterbot_data, dialog_documents, get_corpus
from neurospec.data.digits import DIGITS_SOURCE, digits_split
from neurospec.errors import TaskError

SPLITS = ("train", "dev", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
DEFAULT_LANGUAGES = ("english", "french", "german", "spanish", "italian", "portuguese", "dutch", "turkish")
MIN_TOPIC = 20
OPTIONS = ("text", "label", "split", "per_class", "languages")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SNIPPET_LINES = 8
_MAX_CHARS = 300


@dataclass(frozen=True, eq=False)
class LabelledTask:
    """A classification task. ``items``: texts (a tuple of str) or images ``[n, channels, height, width]``;
    ``labels`` int64 ``[n]`` indexes ``classes``; ``splits`` maps train/dev/test to disjoint index arrays."""

    name: str
    classes: tuple[str, ...]
    items: tuple[str, ...] | torch.Tensor
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    fingerprint: str
    licence: str
    source: str

    @property
    def kind(self) -> str:
        return "image" if isinstance(self.items, torch.Tensor) else "text"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> tuple[Any, np.ndarray]:
        """``(items, labels)`` of one split: a list of texts or an image tensor, and int64 labels."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; the splits are {SPLITS}")
        idx = self.splits[name]
        if isinstance(self.items, torch.Tensor):
            return self.items[torch.as_tensor(idx, dtype=torch.long)], self.labels[idx]
        return [self.items[i] for i in idx], self.labels[idx]

    def sizes(self) -> dict[str, Any]:
        return {"classes": list(self.classes), **{s: int(len(self.splits[s])) for s in SPLITS}}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
                "licence": self.licence, **self.sizes()}


# ----------------------------------------------------------------------------------------------- splitting


def _key(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _item_digest(item: Any) -> str:
    if isinstance(item, str):
        return hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()
    return hashlib.sha256(item.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """``(train, dev, test)`` examples of a class of ``n``: dev and test rounded, train the rest."""
    dev, test = round(n * fractions[1]), round(n * fractions[2])
    return n - dev - test, dev, test


def min_class_size(fractions: Sequence[float], min_per_split: int) -> int:
    """The smallest class size whose every split gets ``min_per_split`` examples."""
    n = 1
    while min(split_counts(n, fractions)) < min_per_split:
        n += 1
        if n > 1_000_000:
            raise TaskError(f"fractions {tuple(fractions)} leave a split empty: give every split a share")
    return n


def make_labelled(
    name: str,
    items: Sequence[str] | torch.Tensor,
    labels: Sequence[Any],
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    per_class: int | None = None,
    min_per_split: int = 2,
    fixed_test: Sequence[bool] | None = None,
    licence: str = "user data",
    source: str = "memory",
    classes: Sequence[str] | None = None,
) -> LabelledTask:
    """Balance, deduplicate and split labelled items (module docstring). ``labels``: any values (their strings name
    the classes, sorted) or ints indexing ``classes``. ``fixed_test``: per item, True puts it in the test split
    (then the other items are split into train and dev by the ratio of the first two fractions)."""
    if not _NAME_RE.fullmatch(name or ""):
        raise TaskError(f"task name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.'")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise TaskError(f"fractions must be three non-negative numbers (train, dev, test) summing to 1, got {fractions}")
    n = len(items)
    if len(labels) != n:
        raise TaskError(f"task {name!r}: {n} items but {len(labels)} labels")
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, float) and math.isnan(lab)) or (isinstance(lab, str) and not lab.strip()):
            raise TaskError(f"task {name!r}: example {i} has no label; every example needs one")
    if classes is None:
        names = sorted({str(lab) for lab in labels})
        index = {c: k for k, c in enumerate(names)}
        y = np.array([index[str(lab)] for lab in labels], dtype=np.int64)
    else:
        names = [str(c) for c in classes]
        y = np.asarray(labels, dtype=np.int64)
    if len(names) < 2:
        raise TaskError(
            f"task {name!r} has a single class ({names[0] if names else 'none'}): a classification task needs "
            "examples of at least two labels"
        )
    is_text = not isinstance(items, torch.Tensor)
    test_mask = np.zeros(n, dtype=bool) if fixed_test is None else np.asarray(fixed_test, dtype=bool)
    digests = [_item_digest(items[i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: (_key("item", str(seed), digests[i]), i))
    seen: set[str] = set()
    by_class: dict[tuple[int, bool], list[int]] = {}
    for i in order:
        if is_text and not items[i].strip():
            continue
        if digests[i] in seen:
            continue
        seen.add(digests[i])
        by_class.setdefault((int(y[i]), bool(test_mask[i])), []).append(i)
    groups = [False, True] if fixed_test is not None else [False]
    counts = {(c, g): len(by_class.get((c, g), [])) for c in range(len(names)) for g in groups}
    need = min_class_size(fractions, min_per_split)
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    for g in groups:
        m = min(counts[(c, g)] for c in range(len(names)))
        if per_class is not None:
            m = min(m, per_class)
        if fixed_test is None:
            short = [names[c] for c in range(len(names)) if counts[(c, g)] < need]
            if short or m < need:
                have = ", ".join(f"{names[c]}: {counts[(c, g)]}" for c in range(len(names)))
                raise TaskError(
                    f"task {name!r} is too small: every class needs at least {need} distinct examples (so that "
                    f"train/dev/test get {min_per_split} each at fractions {tuple(fractions)}); it has {have}"
                    + (f" (per_class={per_class})" if per_class is not None else "")
                )
            tr, dv, _ = split_counts(m, fractions)
        elif g:  # the fixed test images
            if m < min_per_split:
                raise TaskError(f"task {name!r}: its fixed test split has only {m} examples of a class; "
                                f"at least {min_per_split} are needed")
        else:
            ratio = fractions[1] / (fractions[0] + fractions[1])
            dv = round(m * ratio)
            tr = m - dv
            if min(tr, dv) < min_per_split:
                raise TaskError(f"task {name!r}: {m} training examples per class give train {tr} and dev {dv}; "
                                f"at least {min_per_split} each are needed")
        for c in range(len(names)):
            chosen = by_class[(c, g)][:m]
            if g:
                splits["test"] += chosen
            else:
                splits["train"] += chosen[:tr]
                splits["dev"] += chosen[tr : tr + dv]
                if fixed_test is None:
                    splits["test"] += chosen[tr + dv :]
    final = {s: np.array(sorted(v, key=lambda i: _key(s, str(seed), digests[i])), dtype=np.int64)
             for s, v in splits.items()}
    h = hashlib.sha256(json.dumps({"name": name, "classes": names, "seed": seed}).encode())
    for s in SPLITS:
        for i in final[s]:
            h.update(f"{s}\0{digests[i]}\0{int(y[i])}\n".encode())
    kept_items: tuple[str, ...] | torch.Tensor = tuple(items) if is_text else items
    return LabelledTask(name, tuple(names), kept_items, y, final, h.hexdigest()[:16], licence, source)


# ----------------------------------------------------------------------------------------------- bundled tasks


def _truncate(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS].rsplit(" ", 1)[0]


def _language_id(name: str, opts: dict[str, str], seed: int) -> LabelledTask:
    data = chatterbot_data()
    if data is None:
        raise TaskError("language-id needs the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3")
    available = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.yml")))
    langs = [x.strip() for x in opts["languages"].split(",")] if "languages" in opts else list(DEFAULT_LANGUAGES)
    unknown = [x for x in langs if x not in available]
    if unknown:
        raise TaskError(f"language-id: unknown language(s) {unknown}; chatterbot-corpus has {', '.join(available)}")
    texts, labels = [], []
    for lang in langs:
        for doc in dialog_documents(lang):
            texts.append(_truncate(doc.text))
            labels.append(lang)
    return make_labelled(name, texts, labels, seed=seed, per_class=_per_class(opts, 200), licence=CHATTERBOT,
                         source="language-id")


def _snippet(text: str, doc_id: str, seed: int) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        return ""
    start = _key("snippet", str(seed), doc_id) % max(1, len(lines) - _SNIPPET_LINES + 1)
    return _truncate("\n".join(lines[start : start + _SNIPPET_LINES]))


def _python_vs_c(name: str, opts: dict[str, str], seed: int) -> LabelledTask:
    cap = _per_class(opts, 200)
    texts, labels = [], []
    for lang in ("c", "python"):
        src = get_corpus(lang).open()
        ids = sorted(src.ids(), key=lambda d: _key("file", str(seed), d))
        got = 0
        for doc_id in ids:
            snip = _snippet(src.read(doc_id), doc_id, seed)
            if snip:
                texts.append(snip)
                labels.append(lang)
                got += 1
            if cap is not None and got >= cap + 10:  # a few spare for duplicates
                break
    return make_labelled(name, texts, labels, seed=seed, per_class=cap, licence=PSF, source="python-vs-c")


def topic_categories() -> list[str]:
    """English chatterbot-corpus categories with at least :data:`MIN_TOPIC` conversations."""
    if chatterbot_data() is None:
        return []
    counts: dict[str, int] = {}
    for doc in dialog_documents("english"):
        cat = doc.id.split("/")[0]
        counts[cat] = counts.get(cat, 0) + 1
    return sorted(c for c, k in counts.items() if k >= MIN_TOPIC)


def _topic(category: str) -> Callable[[str, dict[str, str], int], LabelledTask]:
    def build(name: str, opts: dict[str, str], seed: int) -> LabelledTask:
        texts, labels = [], []
        for doc in dialog_documents("english"):
            texts.append(_truncate(doc.text))
            labels.append(category if doc.id.split("/")[0] == category else "other")
        return make_labelled(name, texts, labels, seed=seed, per_class=_per_class(opts, 200), licence=CHATTERBOT,
                             source=f"topic-{category}")

    return build


def _digits(name: str, opts: dict[str, str], seed: int) -> LabelledTask:
    d = digits_split()
    x = torch.cat([d.x_train, d.x_test])
    y = torch.cat([d.y_train, d.y_test]).tolist()
    fixed = [False] * len(d.y_train) + [True] * len(d.y_test)
    return make_labelled(name, x, y, seed=seed, per_class=_per_class(opts, None), fixed_test=fixed,
                         classes=[str(k) for k in range(10)], licence=DIGITS_SOURCE, source="digits")


def bundled_tasks() -> dict[str, Callable[[str, dict[str, str], int], LabelledTask]]:
    """Bundled labelled task sources by name."""
    table: dict[str, Callable[[str, dict[str, str], int], LabelledTask]] = {
        "language-id": _language_id, "python-vs-c": _python_vs_c, "digits": _digits,
    }
    for cat in topic_categories():
        table[f"topic-{cat}"] = _topic(cat)
    return table


# ----------------------------------------------------------------------------------------------- user files


def _per_class(opts: dict[str, str], default: int | None) -> int | None:
    if "per_class" not in opts:
        return default
    try:
        value = int(opts["per_class"])
    except ValueError:
        value = 0
    if value < 1:
        raise TaskError(f"per_class must be a positive integer, got {opts['per_class']!r}")
    return value


def _read_rows(path: Path, text: str, label: str, split: str | None) -> tuple[list[Any], list[Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        try:
            obj = datasets.load_from_disk(str(path))
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise TaskError(f"cannot load the dataset saved at {path}: {exc}") from None
        if isinstance(obj, datasets.DatasetDict):
            if split is None:
                raise TaskError(f"{path} has the splits {', '.join(obj)}; choose one with ?split=NAME")
            if split not in obj:
                raise TaskError(f"{path} has no split {split!r}; its splits are {', '.join(obj)}")
            obj = obj[split]
        columns = {c: obj[c] for c in obj.column_names if c in (text, label)}
        names = obj.column_names
    elif suffix in (".csv", ".tsv"):
        import csv

        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            names = list(reader.fieldnames or [])
        columns = {c: [r.get(c) for r in rows] for c in (text, label) if c in names}
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise TaskError(f"{path} line {lineno} is not JSON: {exc}") from None
        names = sorted({k for r in rows if isinstance(r, dict) for k in r})
        columns = {c: [r.get(c) if isinstance(r, dict) else None for r in rows] for c in (text, label)}
        columns = {c: v for c, v in columns.items() if c in names}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        names = table.column_names
        columns = {c: table.column(c).to_pylist() for c in (text, label) if c in names}
    else:
        raise TaskError(f"{path}: labelled data must be .csv, .tsv, .jsonl, .parquet or a saved dataset folder")
    for role, col in (("text", text), ("label", label)):
        if col not in columns:
            raise TaskError(f"{path} has no {role} column {col!r}; its columns are {', '.join(names)}; "
                            f"choose with ?{role}=COLUMN")
    return list(columns[text]), list(columns[label])


def parse_labelled_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``NAME=SOURCE?opts`` -> ``(name, source, options)``."""
    spec = spec.strip()
    head, sep, rest = spec.partition("=")
    name = None
    if sep and _NAME_RE.fullmatch(head) and not Path(spec).exists():
        name, spec = head, rest
    source, opts = spec, {}
    if "?" in spec and not Path(spec).exists():
        source, _, query = spec.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise TaskError(f"cannot parse the options {query!r}: write key=value pairs joined by '&'") from None
        for k, v in pairs:
            if k not in OPTIONS:
                raise TaskError(f"unknown option {k!r} in {spec!r}; the options are {', '.join(OPTIONS)}")
            opts[k] = v
    if not source:
        raise TaskError("empty task source: write NAME=SOURCE (e.g. langs=language-id)")
    if name is None:
        name = source if source in bundled_tasks() else re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source).stem)
    return name, source, opts


def load_labelled(spec: str, *, seed: int = 0) -> LabelledTask:
    """The labelled task of ``spec`` (module docstring)."""
    name, source, opts = parse_labelled_spec(spec)
    table = bundled_tasks()
    if source in table:
        return table[source](name, opts, seed)
    path = Path(source).expanduser()
    if not path.exists():
        raise TaskError(f"no bundled labelled task or file {source!r}; bundled: {', '.join(table)}")
    texts, labels = _read_rows(path, opts.get("text", "text"), opts.get("label", "label"), opts.get("split"))
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TaskError(f"{path}: the text of row {bad[0]} is {texts[bad[0]]!r}, not a string")
    return make_labelled(name, texts, labels, seed=seed, per_class=_per_class(opts, None), source=str(path))
