"""A task's data from its spec, whatever the spec names: text (tokenised and packed) or an image class.

:func:`task_data` turns one spec (a string like ``"python"``, ``"name=path"`` or ``"digit-3"``, a
:class:`~neurospec.data.tasks.TaskSpec`, or data already built) into :class:`~neurospec.data.tasks.TaskData` or
:class:`~neurospec.data.images.ImageTaskData`; :func:`build_tasks` does it for several tasks and checks their names.
The recorder and every pipeline build their tasks here, so the same spec always gives the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from neurospec.data.images import ImageTaskData, image_task
from neurospec.data.tasks import TaskData, TaskSpec, build_task_data, check_task_names, parse_task_spec
from neurospec.errors import TaskError


def task_data(spec: Any, tokenizer: Any, *, seq_len: int, collect_tokens: int, eval_tokens: int,
              seed: int) -> TaskData | ImageTaskData:
    """The data of one task: ``spec`` itself when it is already data, the image class it names, or its text
    tokenised with ``tokenizer`` into blocks of ``seq_len`` (see :func:`~neurospec.data.tasks.build_task_data`)."""
    if isinstance(spec, TaskData | ImageTaskData):
        return spec
    if isinstance(spec, str):
        image = image_task(spec)
        if image is not None:
            return image
    spec = spec if isinstance(spec, TaskSpec) else parse_task_spec(str(spec))
    return build_task_data(spec, tokenizer, seq_len=seq_len, collect_tokens=collect_tokens,
                           eval_tokens=eval_tokens, seed=seed)


def build_tasks(loaded: Any, specs: Sequence[Any], cfg: Any) -> dict[str, TaskData | ImageTaskData]:
    """``{name: data}`` for every spec, built with ``loaded.tokenizer`` and the sizes of ``cfg`` (``seq_len``,
    ``tokens``, ``eval_tokens``, ``seed``: a :class:`~neurospec.record.recorder.RecordConfig`).

    TaskError for the same name twice, names that differ only by case, or a task without evaluation blocks.
    """
    out: dict[str, TaskData | ImageTaskData] = {}
    for s in specs:
        data = task_data(s, loaded.tokenizer, seq_len=cfg.seq_len, collect_tokens=cfg.tokens,
                         eval_tokens=cfg.eval_tokens, seed=cfg.seed)
        check_task_names([*out, data.name])  # the same name twice, or names that differ only by case
        if data.eval.shape[0] == 0:
            raise TaskError(f"task {data.name!r} has no evaluation blocks; give it more data or lower --seq-len")
        out[data.name] = data
    return out
