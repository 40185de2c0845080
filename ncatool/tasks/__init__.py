"""The task registry: each ``ncatool train --task`` name maps to the module that owns the task.

A task module gives, under the names registered here:

* a frozen config dataclass (deriving from :class:`ncatool.config.TrainConfig`);
* a training task for the one loop (:class:`ncatool.train.Task`);
* a runner class with ``from_checkpoint(checkpoint, device, amp)`` that rebuilds the trained model
  from a checkpoint alone and predicts, evaluates and animates it (:class:`ncatool.runtime.Runner`).

``train``, ``predict``, ``eval`` and ``animate`` ask this registry and name no task themselves, so a
new task is its module plus one line here. Modules are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from ncatool.errors import NcaError

if TYPE_CHECKING:
    import torch

    from ncatool.runtime import Checkpoint, Runner


class TaskEntry(NamedTuple):
    """Where a task lives: its module (or package) and the names of its config, training task and
    runner in it."""

    module: str
    config: str
    task: str
    runner: str


#: task name → its entry.
TASKS: dict[str, TaskEntry] = {
    "seg2d": TaskEntry("ncatool.tasks.segmentation", "Seg2DConfig", "SegmentationTask", "SegmentationRunner"),
    "seg3d": TaskEntry("ncatool.tasks.segmentation", "Seg3DConfig", "SegmentationTask", "SegmentationRunner"),
    "grow": TaskEntry("ncatool.tasks.growing", "GrowConfig", "GrowTask", "GrowRunner"),
    "digits": TaskEntry("ncatool.tasks.digits", "DigitsConfig", "DigitsTask", "DigitsRunner"),
    "incontext": TaskEntry("ncatool.tasks.incontext", "InContextConfig", "InContextTask", "InContextRunner"),
}


def _member(task: str, which: str) -> Any:
    entry = TASKS.get(task)
    if entry is None:
        raise NcaError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    return getattr(importlib.import_module(entry.module), getattr(entry, which))


def config_class(task: str) -> type:
    """The frozen config dataclass of ``task``."""
    return _member(task, "config")


def make_task(cfg: Any, device: torch.device) -> Any:
    """The training task for a resolved config."""
    return _member(cfg.task, "task")(cfg, device)


def runner(checkpoint: Checkpoint, device: torch.device, amp: str = "none") -> Runner:
    """The inference runner of a loaded checkpoint, on ``device``."""
    return _member(checkpoint.task, "runner").from_checkpoint(checkpoint, device, amp)
