"""Where a training run reports besides ``metrics.jsonl`` and its PNGs: the ``logger`` setting.

* ``none`` (default): nothing more.
* ``tensorboard``: ``RUN/tensorboard/`` holds an event file with every number of an epoch's
  ``metrics.jsonl`` line as a scalar (``train/loss``, ``val/dice_train_res``, ``lr``, ...; x = epoch)
  and each ``samples/epoch_NNN.png`` as an image (``samples``). ``tensorboard --logdir runs`` shows
  every run side by side. Needs the ``tensorboard`` package: ``pip install 'ncatool[tensorboard]'``.

The training loop calls :meth:`RunLogger.log_metrics` once per epoch and :meth:`RunLogger.log_image`
for each sample picture; a logger flushes as it goes, so a run killed mid-way keeps what it logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ncatool.errors import NcaError

#: The values of the ``logger`` setting.
LOGGERS: tuple[str, ...] = ("none", "tensorboard")


class RunLogger:
    """Logs nothing (``logger = "none"``); the base of the others."""

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One epoch's ``metrics.jsonl`` record (``epoch`` and numbers)."""

    def log_image(self, path: Path, epoch: int) -> None:
        """A sample picture written to ``path`` after ``epoch``."""

    def close(self) -> None:
        """Flush and release files."""


class TensorBoardLogger(RunLogger):
    """Scalars and sample pictures in ``log_dir`` for TensorBoard.

    Raises:
        NcaError: The ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise NcaError(
                "logger=tensorboard needs the tensorboard package: pip install 'ncatool[tensorboard]' "
                "(or pip install tensorboard)"
            ) from err
        self.writer = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def tag(key: str) -> str:
        """``train_loss`` → ``train/loss``, ``val_psnr`` → ``val/psnr``; other keys unchanged."""
        for prefix in ("train", "val"):
            if key.startswith(prefix + "_"):
                return f"{prefix}/{key[len(prefix) + 1 :]}"
        return key

    def log_metrics(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(self.tag(key), float(value), epoch)
        self.writer.flush()

    def log_image(self, path: Path, epoch: int) -> None:
        import numpy as np
        from PIL import Image

        if not path.is_file():  # a task may have had nothing to draw
            return
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image("samples", pixels, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(name: str, run_dir: Path) -> RunLogger:
    """The logger the ``logger`` setting names, writing under ``run_dir``.

    Raises:
        NcaError: An unknown name, or a logger whose package is missing.
    """
    if name == "none":
        return RunLogger()
    if name == "tensorboard":
        return TensorBoardLogger(Path(run_dir) / "tensorboard")
    raise NcaError(f"logger must be one of {', '.join(LOGGERS)}, got {name!r}")


__all__ = ["LOGGERS", "RunLogger", "TensorBoardLogger", "make_logger"]
