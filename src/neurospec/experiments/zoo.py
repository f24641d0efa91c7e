"""Small vision models trained here, in seconds, on the 8x8 digits bundled with scikit-learn.

They are neurospec's "vision models with image classes as tasks": a plain ReLU MLP (for weight-graph clusterability,
METHODS.md section 3) and a tiny transformers ViT (so every transformer method runs on a vision model too).

Data: the UCI ML hand-written digits data set (Alpaydin and Kaynak; 1,797 grey 8x8 images of the digits 0-9, pixel
values 0..16), as bundled with scikit-learn (``sklearn.datasets.load_digits``; scikit-learn is BSD-3-Clause). Images
are scaled to ``[0, 1]`` and shaped ``[n, 1, 8, 8]`` (``pixel_values`` for the ViT; the MLP flattens them). The
train/test split is fixed (stratified, 25% test, independent of the training seed), so test accuracies are
comparable across seeds and runs.

Training is seeded and deterministic on CPU for a given seed (it runs on one torch thread by default). Files: :func:`save` writes
``model.safetensors`` and ``zoo.json`` (kind, seed, accuracies, architecture); the ViT is written with
``save_pretrained`` (``config.json`` + ``model.safetensors``), so ``neurospec.models.loading.load_model(directory)``
opens either kind (:func:`neurospec.models.digits.read_zoo`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from neurospec.data.digits import DIGITS_SOURCE, DigitsSplit, digits_split
from neurospec.evaluate.metrics import image_accuracy
from neurospec.models.digits import (
    KINDS,
    SCHEMA_VERSION,
    ZOO_FILE,
    ZooModel,
    build_digits_mlp,
    build_digits_vit,
    image_logits,
)
from neurospec.record.layout import write_result_text


def _train(
    build: Callable[[], nn.Module], split: DigitsSplit, seed: int, epochs: int, lr: float, batch_size: int,
    weight_decay: float, threads: int | None,
) -> nn.Module:
    if threads is None:
        return _train_loop(build, split, seed, epochs, lr, batch_size, weight_decay)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_loop(build, split, seed, epochs, lr, batch_size, weight_decay)
    finally:
        torch.set_num_threads(before)


def _train_loop(
    build: Callable[[], nn.Module], split: DigitsSplit, seed: int, epochs: int, lr: float, batch_size: int,
    weight_decay: float,
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(split.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            b = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(image_logits(model, split.x_train[b]), split.y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_digits_mlp(
    seed: int = 0,
    *,
    hidden: Sequence[int] = (256, 256, 256),
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    threads: int | None = 1,
) -> ZooModel:
    """Train the 64-256-256-256-10 ReLU MLP on the fixed digits split (a few seconds on one CPU core).

    ``threads``: torch threads while training (restored afterwards). One thread is the default: these models are
    too small to gain from more, and the result then does not depend on the machine's core count. ``None`` leaves
    torch's setting alone. Measured test accuracy: 0.969 (seed 0), 0.973 (seed 1).
    """
    split = digits_split()
    model = _train(lambda: build_digits_mlp(hidden), split, seed, epochs, lr, batch_size, weight_decay,
                   threads)
    config = {"hidden": [int(h) for h in hidden], "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "threads": threads}
    return ZooModel(model, "digits-mlp", seed, image_accuracy(model, split.x_train, split.y_train),
                    image_accuracy(model, split.x_test, split.y_test), config)


def train_digits_vit(
    seed: int = 0,
    *,
    epochs: int = 40,
    lr: float = 2e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    threads: int | None = 1,
) -> ZooModel:
    """Train the tiny ViT (hidden 64, 4 layers, 4 heads, MLP 128, patch 2) on the fixed digits split.

    AdamW with linear warm-up and cosine decay; about 20-25 s on one busy CPU core. ``threads`` as for
    :func:`train_digits_mlp`. Measured test accuracy: 0.964 (seed 0).
    """
    split = digits_split()
    model = _train(build_digits_vit, split, seed, epochs, lr, batch_size, weight_decay, threads)
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "threads": threads}
    return ZooModel(model, "digits-vit", seed, image_accuracy(model, split.x_train, split.y_train),
                    image_accuracy(model, split.x_test, split.y_test), config)


def save(zoo_model: ZooModel, directory: str | Path) -> Path:
    """Write the model (safetensors) and ``zoo.json`` to ``directory`` (created if needed); returns the path."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if zoo_model.kind == "digits-vit":
        zoo_model.model.save_pretrained(out)
    elif zoo_model.kind == "digits-mlp":
        state = {k: v.detach().contiguous() for k, v in zoo_model.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
    else:
        raise ValueError(f"unknown zoo model kind {zoo_model.kind!r}; expected one of {KINDS}")
    meta = {
        "format": "neurospec-zoo",
        "schema_version": SCHEMA_VERSION,
        "kind": zoo_model.kind,
        "seed": zoo_model.seed,
        "train_accuracy": zoo_model.train_accuracy,
        "test_accuracy": zoo_model.test_accuracy,
        "config": zoo_model.config,
        "data": DIGITS_SOURCE,
    }
    write_result_text(out / ZOO_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
