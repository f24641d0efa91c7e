"""neurospec.experiments.zoo: digits models trained in-process, their accuracy, determinism and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neurospec.data.digits import digits_split
from neurospec.evaluate.metrics import image_accuracy
from neurospec.experiments import zoo
from neurospec.models.digits import read_zoo


@pytest.fixture(scope="module")
def mlp():
    return zoo.train_digits_mlp(seed=0)


def test_digits_split_is_fixed_disjoint_and_stratified():
    a, b = digits_split(), digits_split()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    train_rows = {tuple(r) for r in a.x_train.reshape(-1, 64).tolist()}
    test_rows = {tuple(r) for r in a.x_test.reshape(-1, 64).tolist()}
    assert len(train_rows & test_rows) <= 5  # a handful of identical images exist in the data set itself
    counts = np.bincount(a.y_test.numpy(), minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_mlp_accuracy_and_determinism(mlp):
    assert mlp.test_accuracy > 0.95 and mlp.train_accuracy > 0.98
    split = digits_split()
    assert image_accuracy(mlp.model, split.x_test, split.y_test) == pytest.approx(mlp.test_accuracy)
    again = zoo.train_digits_mlp(seed=0)
    for (k, v), (_, w) in zip(mlp.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    other = zoo.train_digits_mlp(seed=1, epochs=2)
    assert not torch.equal(other.model[1].weight, mlp.model[1].weight)


def test_mlp_save_load_roundtrip(mlp, tmp_path):
    zoo.save(mlp, tmp_path / "mlp")
    meta = json.loads((tmp_path / "mlp" / "zoo.json").read_text())
    assert meta["kind"] == "digits-mlp" and "scikit-learn" in meta["data"]
    back = read_zoo(tmp_path / "mlp")
    x = digits_split().x_test[:20]
    torch.testing.assert_close(back.logits(x), mlp.logits(x), rtol=0, atol=0)
    assert back.test_accuracy == mlp.test_accuracy and back.config == mlp.config
    with pytest.raises(FileNotFoundError, match="zoo.json"):
        read_zoo(tmp_path)


def test_the_digits_mlp_is_a_loaded_model_like_any_other(mlp, tmp_path):
    """One handle: the saved MLP loads with load_model, an in-memory one wraps with from_module, both as plain MLPs."""
    from neurospec.models.loading import from_module, load_model

    zoo.save(mlp, tmp_path / "mlp")
    loaded = load_model(str(tmp_path / "mlp"))
    assert loaded.zoo is not None and loaded.zoo.kind == "digits-mlp" and loaded.analysis_kind == "image"
    assert loaded.is_plain and loaded.sites.family == "plain-mlp" and loaded.spec == str((tmp_path / "mlp").resolve())
    assert [s.name for s in loaded.mlp_sites()] == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    assert [(s.module, s.inputs, s.width) for s in loaded.sites] == [("3", ("1",), 256), ("5", ("3",), 256),
                                                                     ("7", ("5",), 256)]
    d = loaded.describe()
    assert d["model_type"] == "plain-mlp" and d["zoo"]["test_accuracy"] == mlp.test_accuracy
    wrapped = from_module(mlp.model, name="mlp")
    assert wrapped.sites == loaded.sites and wrapped.fingerprint == loaded.fingerprint and wrapped.zoo is None
    assert wrapped.analysis_kind == "none" and wrapped.describe()["model_type"] == "plain-mlp"


def test_vit_is_deterministic_and_opens_with_load_model(tmp_path):
    from neurospec.models.loading import load_model

    a = zoo.train_digits_vit(seed=3, epochs=1)
    b = zoo.train_digits_vit(seed=3, epochs=1)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    zoo.save(a, tmp_path / "vit")
    loaded = load_model(str(tmp_path / "vit"))
    assert loaded.head == "image-classification"
    mlp_sites = loaded.sites.of_kind("mlp")
    assert [s.width for s in mlp_sites] == [128] * 4
    x = digits_split().x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(pixel_values=x).logits, a.logits(x))
        torch.testing.assert_close(read_zoo(tmp_path / "vit").logits(x), a.logits(x))


@pytest.mark.slow
def test_vit_accuracy():
    vit = zoo.train_digits_vit(seed=0)
    assert vit.test_accuracy > 0.93 and vit.train_accuracy > 0.97
