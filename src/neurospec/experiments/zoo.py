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
opens it as an image classifier. :func:`load` opens either kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurospec.record import layout

DIGITS_SOURCE = (
    "UCI ML hand-written digits (E. Alpaydin, C. Kaynak), via scikit-learn's sklearn.datasets.load_digits "
    "(BSD-3-Clause)"
)
KINDS = ("digits-mlp", "digits-vit")
ZOO_FILE = layout.ZOO
SCHEMA_VERSION = 1
_SPLIT_SEED = 0
_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split: ``x_*`` ``[n, 1, 8, 8]`` float32 in ``[0, 1]``, ``y_*`` ``[n]`` int64 classes 0-9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_split() -> DigitsSplit:
    """The digits, scaled and split once and for all (stratified, 25% test, split seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=data.target
    )
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


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
        return logits(self.model, x)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of either zoo model (or any model taking ``pixel_values``) for images ``[n, 1, 8, 8]``."""
    if getattr(model, "config", None) is not None:
        return model(pixel_values=x).logits
    return model(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` with classes ``y`` (evaluation mode; restores the mode), by the
    one rule of :func:`neurospec.evaluate.metrics.topk_hits` (ties and non-finite rows count as wrong)."""
    from neurospec.evaluate.metrics import topk_hits

    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int(topk_hits(logits(model, x[i:i + batch_size]).float(), y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


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
    from transformers import ViTConfig, ViTForImageClassification

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
            loss = nn.functional.cross_entropy(logits(model, split.x_train[b]), split.y_train[b])
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
    return ZooModel(model, "digits-mlp", seed, accuracy(model, split.x_train, split.y_train),
                    accuracy(model, split.x_test, split.y_test), config)


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
    return ZooModel(model, "digits-vit", seed, accuracy(model, split.x_train, split.y_train),
                    accuracy(model, split.x_test, split.y_test), config)


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
    from neurospec.record.layout import write_result_text

    write_result_text(out / ZOO_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(directory: str | Path) -> ZooModel:
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


# ------------------------------------------------------------------------------------------- classes as tasks

DIGIT_TASKS = tuple(f"digit-{c}" for c in range(10))
"""The image classes of the digits as task names: ``digit-0`` ... ``digit-9``."""
ALL_DIGITS = "all"
"""The task name of the whole split (every class); its metric is the overall top-1 accuracy."""


def parse_digit_tasks(names: Sequence[str] | None) -> tuple[str, ...]:
    """Check task names for a zoo model: ``digit-C`` (C in 0-9) or ``all``; ``None`` or empty -> all ten classes."""
    if not names:
        return DIGIT_TASKS
    out: list[str] = []
    for n in names:
        if n not in (*DIGIT_TASKS, ALL_DIGITS):
            raise ValueError(
                f"unknown task {n!r} for a digits model: its tasks are the image classes digit-0 ... digit-9, and "
                f"{ALL_DIGITS!r} (every class)"
            )
        if n in out:
            raise ValueError(f"task {n!r} is named more than once")
        out.append(n)
    return tuple(out)


def task_images(task: str, split: str = "test", data: DigitsSplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 1, 8, 8], classes [n])`` of one task (a class, or ``all``) on the ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = data or digits_split()
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    (name,) = parse_digit_tasks([task])
    if name == ALL_DIGITS:
        return x, y
    keep = y == int(name.split("-")[1])
    return x[keep], y[keep]


def class_batches(split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{task: images [n, 1, 8, 8]}``, one batch per image class (or per named task), for recording and analyses."""
    data = digits_split()
    return {t: task_images(t, split, data)[0] for t in parse_digit_tasks(tasks)}
