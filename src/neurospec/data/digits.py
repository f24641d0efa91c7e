"""The 8x8 hand-written digits bundled with scikit-learn, split once: the images of the digits models and image tasks.

Data: the UCI ML hand-written digits data set (Alpaydin and Kaynak; 1,797 grey 8x8 images of the digits 0-9, pixel
values 0..16), as bundled with scikit-learn (``sklearn.datasets.load_digits``; scikit-learn is BSD-3-Clause). Images
are scaled to ``[0, 1]`` and shaped ``[n, 1, 8, 8]``. The train/test split is fixed (stratified, 25% test,
independent of any training seed), so test accuracies are comparable across seeds and runs.

The image classes are tasks: ``digit-0`` ... ``digit-9``, and ``all`` (every class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DIGITS_SOURCE = (
    "UCI ML hand-written digits (E. Alpaydin, C. Kaynak), via scikit-learn's sklearn.datasets.load_digits "
    "(BSD-3-Clause)"
)
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
    from sklearn.datasets import load_digits  # lazy: scikit-learn is heavy
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=data.target
    )
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


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
