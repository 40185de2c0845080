"""The fixed choices of command-line options, in one place, so that ``--help`` lists them.

Light on purpose (the registry and the autocast names only): every command module imports it while
``ncatool --help`` is built.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated

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


def adapt_steps_option(what: str) -> typer.models.OptionInfo:
    """``--adapt-steps`` of in-context checkpoints (``predict``, ``eval``): the fine-tuning steps on
    ``what`` before segmenting (:mod:`ncatool.tasks.incontext.adapt`)."""
    return typer.Option(
        "--adapt-steps",
        min=0,
        help=f"incontext: first fine-tune a copy of the model on {what} for this many steps "
        "(leave-one-out episodes of the context pairs; 0 = pure in-context).",
    )


#: ``--context-size`` of in-context checkpoints (``predict``, ``animate``).
ContextSizeOption = Annotated[
    int | None,
    typer.Option("--context-size", min=1, help="incontext: example pairs per label (default: the run's)."),
]
