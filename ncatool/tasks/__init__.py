"""The task registry: each ``ncatool train --task`` name maps to a config class and a task class.

A task adds a model wrapper and a loss here; the training loop (:mod:`ncatool.train`) is shared.
"""

from __future__ import annotations

import importlib
from typing import Any

from ncatool.errors import NcaError

#: task name → (module, config class, task class); modules are imported only when used.
TASKS: dict[str, tuple[str, str, str]] = {
    "seg2d": ("ncatool.tasks.segmentation", "Seg2DConfig", "SegmentationTask"),
    "seg3d": ("ncatool.tasks.segmentation", "Seg3DConfig", "SegmentationTask"),
    "grow": ("ncatool.tasks.growing", "GrowConfig", "GrowTask"),
    "digits": ("ncatool.tasks.digits", "DigitsConfig", "DigitsTask"),
}


def _lookup(task: str) -> tuple[Any, str, str]:
    if task not in TASKS:
        raise NcaError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    module, cfg_name, task_name = TASKS[task]
    return importlib.import_module(module), cfg_name, task_name


def config_class(task: str) -> type:
    """The frozen config dataclass of ``task``."""
    mod, cfg_name, _ = _lookup(task)
    return getattr(mod, cfg_name)


def make_task(cfg: Any, device: Any) -> Any:
    """Instantiate the task object for a resolved config."""
    mod, _, task_name = _lookup(cfg.task)
    return getattr(mod, task_name)(cfg, device)
