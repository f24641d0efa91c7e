"""Image tasks: one image class per task, for the vision models of the zoo.

``digit-C`` (C in 0-9) is the class C of scikit-learn's bundled 8x8 hand-written digits (UCI ML hand-written digits,
via scikit-learn, BSD-3-Clause), split once into training images (the collection split: recorded) and test images
(the evaluation split), as in :func:`neurospec.data.digits.digits_split`. Every image of a task has the task's
class as its label, so a task's metric is the classifier's accuracy on its own class.

Dimensions: ``images [n, channels, height, width]`` float32 pixel values in [0, 1].
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import torch

from neurospec.data.digits import digits_split, task_images

_DIGIT_RE = re.compile(r"^digit-([0-9])$")
LICENCE = "BSD-3-Clause (UCI ML hand-written digits, via scikit-learn)"


@dataclass(frozen=True)
class ImageSpec:
    name: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ImageSpec", "version": 1, "name": self.name, "source": self.source}


@dataclass(frozen=True)
class ImageTaskData:
    """An image task: ``collect`` (recorded) and ``eval`` (held out) images of one class ``label``."""

    name: str
    spec: ImageSpec
    collect: torch.Tensor
    eval: torch.Tensor
    label: int
    fingerprint: str
    licence: str = LICENCE


def is_image_task(name: str) -> bool:
    return isinstance(name, str) and _DIGIT_RE.match(name.split("=", 1)[-1]) is not None


def image_task(spec: str) -> ImageTaskData | None:
    """The image task named by ``spec`` (``digit-3`` or ``name=digit-3``), or ``None`` if it is not one."""
    name, _, source = spec.partition("=") if "=" in spec else (spec, "", spec)
    m = _DIGIT_RE.match(source)
    if m is None:
        return None
    data = digits_split()
    collect, _ = task_images(source, "train", data)
    held, _ = task_images(source, "test", data)
    h = hashlib.sha256(f"{source}|".encode())
    h.update(collect.numpy().tobytes())
    h.update(held.numpy().tobytes())
    return ImageTaskData(name, ImageSpec(name, source), collect, held, int(m.group(1)), h.hexdigest())
