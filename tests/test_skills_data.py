"""Labelled classification tasks: balanced, seeded, disjoint splits; user files; clear errors."""

import json

import numpy as np
import pytest
import torch

from neurospec.data.labelled import load_labelled, make_labelled, min_class_size
from neurospec.errors import TaskError


def _texts(n, prefix):
    return [f"{prefix} example number {i}" for i in range(n)]


def test_splits_are_balanced_disjoint_seeded_and_deduplicated():
    texts = _texts(30, "a") + _texts(50, "b") + ["same text"] * 4
    labels = ["x"] * 30 + ["y"] * 50 + ["x", "x", "y", "y"]
    t = make_labelled("t", texts, labels, seed=3)
    idx = {s: set(t.splits[s].tolist()) for s in ("train", "dev", "test")}
    assert not (idx["train"] & idx["dev"]) and not (idx["train"] & idx["test"]) and not (idx["dev"] & idx["test"])
    seen = [t.items[i] for s in idx for i in idx[s]]
    assert len(seen) == len(set(seen))  # the duplicated text is used once at most
    for s in ("train", "dev", "test"):
        counts = np.bincount(t.labels[t.splits[s]], minlength=2)
        assert counts[0] == counts[1]  # balanced: the larger class is cut to the smaller one
    assert t.sizes() == {"classes": ["x", "y"], "train": 38, "dev": 12, "test": 12}
    again = make_labelled("t", texts, labels, seed=3)
    assert all(np.array_equal(again.splits[s], t.splits[s]) for s in idx) and again.fingerprint == t.fingerprint
    other = make_labelled("t", texts, labels, seed=4)
    assert not np.array_equal(other.splits["train"], t.splits["train"])


def test_bad_labelled_input_errors():
    with pytest.raises(TaskError, match="single class"):
        make_labelled("t", _texts(20, "a"), ["x"] * 20)
    with pytest.raises(TaskError, match="example 3 has no label"):
        make_labelled("t", _texts(20, "a"), ["x", "y", "x", None] + ["y"] * 16)
    need = min_class_size((0.6, 0.2, 0.2), 2)
    assert need == 8
    with pytest.raises(TaskError, match=f"at least {need} distinct examples.*x: 5"):
        make_labelled("t", _texts(5, "a") + _texts(20, "b"), ["x"] * 5 + ["y"] * 20)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "saved"])
def test_user_files_with_chosen_columns(tmp_path, fmt):
    rows = [{"body": f"text {i}", "tag": "pos" if i % 2 else "neg"} for i in range(40)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("body,tag\n" + "".join(f"{r['body']},{r['tag']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    t = load_labelled(f"mine={path}?text=body&label=tag", seed=0)
    assert t.name == "mine" and t.classes == ("neg", "pos") and t.sizes()["train"] == 24
    texts, labels = t.split("dev")
    assert all((int(s.split()[1]) % 2 == 1) == (lab == 1) for s, lab in zip(texts, labels, strict=True))
    with pytest.raises(TaskError, match="no label column 'label'.*body, tag"):
        load_labelled(f"mine={path}?text=body")


def test_bundled_python_vs_c_and_digits():
    t = load_labelled("python-vs-c?per_class=20", seed=0)
    assert t.classes == ("c", "python") and t.sizes()["train"] == 24
    texts, labels = t.split("train")
    assert sum(labels) == 12 and all(len(s) <= 300 for s in texts)
    d = load_labelled("digits?per_class=30")
    from neurospec.data.digits import digits_split

    test_images, _ = d.split("test")
    held = digits_split().x_test
    # every test image is one of the zoo's held-out images, none a training image
    flat = held.reshape(len(held), -1)
    assert all(bool((flat == img.reshape(-1)).all(1).any()) for img in test_images)
    assert isinstance(test_images, torch.Tensor) and d.n_classes == 10
