"""Streamed hf: sources (``streaming=true``): lazy reading, deterministic disjoint splits, and the relation to the
non-streamed split, through the real ``datasets`` path on local files."""

from __future__ import annotations

import json

import pytest

from neurospec.data import tasks as T
from neurospec.data.sources import open_source
from neurospec.data.streaming import StreamingSource
from neurospec.data.tasks import assign_split, build_task_data, parse_task_spec
from neurospec.errors import TaskError

from tiny import char_tokenizer

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma")
SEED, FRACTION = 3, 0.25


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))


def _jsonl(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(WORDS[(i * j) % 6] for j in range(1, 6))}) + "\n")
    return path


def _build(spec, collect, evaluate):
    return build_task_data(spec, char_tokenizer(), seq_len=16, collect_tokens=collect, eval_tokens=evaluate,
                           eval_fraction=FRACTION, seed=SEED, cache=False)


def test_streamed_split_is_deterministic_disjoint_and_a_stream_order_prefix(tmp_path, offline):
    f = _jsonl(tmp_path / "d.jsonl", 200)
    spec = f"t=hf:json?data_files={f}&split=train&streaming=true"
    a, b = _build(spec, 320, 160), _build(spec, 320, 160)
    assert a.fingerprint == b.fingerprint and a.collect.equal(b.collect) and a.eval.equal(b.eval)
    collect, evaluate = a.collect_info.doc_ids, a.eval_info.doc_ids
    assert collect and evaluate and not set(collect) & set(evaluate)
    # each split takes its first documents in stream order, each document in the split its hash gives
    order = {s: [str(i) for i in range(200) if assign_split(str(i), eval_fraction=FRACTION, seed=SEED) == s]
             for s in ("collect", "eval")}
    assert list(collect) == order["collect"][: len(collect)]
    assert list(evaluate) == order["eval"][: len(evaluate)]
    assert _build("u=" + spec[2:], 320, 160).collect.equal(a.collect)  # the name does not change data


def test_streamed_and_plain_splits_hold_the_same_documents_when_the_data_is_used_up(tmp_path, offline):
    f = _jsonl(tmp_path / "d.jsonl", 60)
    plain = _build(f"t=hf:json?data_files={f}&split=train", 10**6, 10**6)
    streamed = _build(f"t=hf:json?data_files={f}&split=train&streaming=true", 10**6, 10**6)
    for split in ("collect", "eval"):
        p, s = plain.info(split), streamed.info(split)
        assert p.exhausted and s.exhausted
        assert sorted(p.doc_ids) == sorted(s.doc_ids) and len(s.doc_ids) > 0
    assert plain.collect.numel() == streamed.collect.numel()  # same text, packed in another order
    assert not plain.collect.equal(streamed.collect)


def test_a_streamed_task_reads_only_what_its_budgets_need(offline):
    import datasets

    read = []

    def rows():
        for i in range(100_000):
            read.append(i)
            yield {"text": f"document number {i} " + WORDS[i % 6] * 3}

    source = StreamingSource(datasets.IterableDataset.from_generator(rows), "text", description="gen",
                             licence="test")
    streams = {s: T._Stream(wanted=w) for s, w in (("collect", 640), ("eval", 160))}
    T._fill_streams(source, char_tokenizer(), 1, streams, eval_fraction=FRACTION, seed=SEED)
    assert all(s.full for s in streams.values())
    assert len(read) < 200  # about 800 tokens of ~35-token documents, not the 100,000 rows


def test_streaming_option_errors_and_spec_round_trip(tmp_path, offline):
    f = _jsonl(tmp_path / "d.jsonl", 5)
    with pytest.raises(TaskError, match="streaming must be true or false"):
        open_source("hf:json", data_files=str(f), streaming="maybe")
    with pytest.raises(TaskError, match="option streaming does not apply"):
        open_source(str(f), streaming="true")
    with pytest.raises(TaskError, match="no column 'body'"):
        open_source("hf:json", data_files=str(f), column="body", streaming="true")
    assert isinstance(open_source("hf:json", data_files=str(f), streaming="true"), StreamingSource)
    assert not isinstance(open_source("hf:json", data_files=str(f), streaming="false"), StreamingSource)
    spec = parse_task_spec(f"t=hf:json?data_files={f}&streaming=true")
    assert spec.streaming == "true" and parse_task_spec(spec.to_string()) == spec
    assert T.TaskSpec.from_dict(spec.to_dict()) == spec
    assert "streaming" not in parse_task_spec(f"t=hf:json?data_files={f}").to_dict()  # older specs unchanged
