"""The fixed choices of command-line options, in one place, so that ``--help`` lists them.

Light on purpose (the registry and the autocast names only): every command module imports it while
``ncatool --help`` is built.
"""

from __future__ import annotations

import re
from enum import Enum

import typer

from ncatool.runtime import AMP_CHOICES
from ncatool.tasks import TASKS


class _Choice(str, Enum):
    """A str enum whose ``str()`` is its value (plain ``str, Enum`` gives ``Class.member``)."""

    def __str__(self) -> str:
        return str(self.value)


#: ``--task``: the registered tasks (:data:`ncatool.tasks.TASKS`).
TaskName = _Choice("TaskName", {name: name for name in TASKS})  # type: ignore[misc]
#: ``--amp`` of training: autocast modes (:data:`ncatool.runtime.AMP_CHOICES`).
TrainAmp = _Choice("TrainAmp", {name: name for name in AMP_CHOICES})  # type: ignore[misc]

#: ``--device`` values: a device name, or ``cuda:N`` (so not an enum; checked when parsed).
DEVICE_METAVAR = "<auto|cpu|cuda|cuda:N|mps>"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(value: str | None) -> str | None:
    """Typer callback of ``--device``: one of :data:`DEVICE_METAVAR`'s choices.

    Raises:
        typer.BadParameter: Anything else (the usage error names the choices).
    """
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def device_option(help_text: str = "Where to run.") -> typer.models.OptionInfo:
    """The ``--device`` option of every command that runs a model."""
    return typer.Option("--device", metavar=DEVICE_METAVAR, callback=check_device, help=help_text)


__all__ = ["DEVICE_METAVAR", "TaskName", "TrainAmp", "check_device", "device_option"]
