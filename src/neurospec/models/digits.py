"""The two small image classifiers of the digits (:mod:`neurospec.data.digits`): definitions, logits, and reading one
saved to a directory.

A plain ReLU MLP (``nn.Sequential``; weight-graph clusterability, METHODS.md section 3) and a tiny transformers ViT (so
every transformer method runs on a vision model too). A saved model is a directory with ``zoo.json`` (kind, seed,
accuracies, architecture and training settings) and ``model.safetensors``; the ViT is written with
``save_pretrained`` (``config.json`` too). Training and saving: :mod:`neurospec.experiments.zoo`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

KINDS = ("digits-mlp", "digits-vit")
ZOO_FILE = "zoo.json"
SCHEMA_VERSION = 1


@dataclass
class ZooModel:
    """A trained model and what is known about it. ``config``: the architecture and training settings."""

    model: nn.Module
    kind: str
    seed: int
    train_accuracy: float
    test_accuracy: float
    config: dict = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, 10]`` logits of images ``[n, 1, 8, 8]``."""
        return image_logits(self.model, x)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of either zoo model (or any model taking ``pixel_values``) for images ``[n, 1, 8, 8]``."""
    if getattr(model, "config", None) is not None:
        return model(pixel_values=x).logits
    return model(x)


def image_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of either digits model (or any model taking ``pixel_values``) for images ``[n, 1, 8, 8]``."""
    if getattr(model, "config", None) is not None:
        return model(pixel_values=x).logits
    return model(x)


def build_digits_mlp(hidden: Sequence[int] = (256, 256, 256)) -> nn.Sequential:
    """``Flatten -> Linear(64, h1) -> ReLU -> ... -> Linear(h_last, 10)`` (untrained)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build_digits_vit(
    hidden_size: int = 64, num_hidden_layers: int = 4, num_attention_heads: int = 4, intermediate_size: int = 128
) -> nn.Module:
    """A transformers ``ViTForImageClassification`` for 8x8 one-channel images, patch 2 (16 patches + CLS)."""
    from transformers import ViTConfig, ViTForImageClassification  # lazy: transformers is heavy

    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    return ViTForImageClassification(cfg)


def read_zoo(directory: str | Path) -> ZooModel:
    """Open a directory written by :func:`save` (only safetensors and JSON are read)."""
    from safetensors.torch import load_file

    path = Path(directory)
    meta_path = path / ZOO_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {ZOO_FILE}: not a directory written by neurospec.experiments.zoo.save")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    expected = {"format", "schema_version", "kind", "seed", "train_accuracy", "test_accuracy", "config", "data"}
    if meta.get("format") != "neurospec-zoo" or set(meta) != expected:
        raise ValueError(f"{meta_path} is not a neurospec zoo manifest (keys {sorted(meta)})")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{meta_path} has schema version {meta['schema_version']}; this neurospec reads {SCHEMA_VERSION}")
    kind = meta["kind"]
    if kind == "digits-vit":
        from transformers import ViTForImageClassification

        model: nn.Module = ViTForImageClassification.from_pretrained(str(path))
    elif kind == "digits-mlp":
        model = build_digits_mlp(meta["config"]["hidden"])
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    else:
        raise ValueError(f"{meta_path}: unknown kind {kind!r}; expected one of {KINDS}")
    return ZooModel(model.eval(), kind, int(meta["seed"]), float(meta["train_accuracy"]),
                    float(meta["test_accuracy"]), dict(meta["config"]))
