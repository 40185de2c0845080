"""Training from Python: :func:`train`, the function behind ``ncatool.train`` and ``ncatool train``.

The other entry points of the API live where their work is done and are re-exported by the package:
:func:`ncatool.predict.predict`, :func:`ncatool.evaluate.evaluate` and :func:`ncatool.runtime.load`
(see :mod:`ncatool`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train(
    task: str | None = None,
    data: str | Path | None = None,
    *,
    config: str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train an NCA of ``task`` (``seg2d``, ``seg3d``, ``grow``, ``digits``): ``ncatool train``.

    Settings resolve as on the command line: the task's defaults < the ``config`` file (TOML, JSON or
    YAML) < ``data`` and ``settings``. A setting is any field of the task's config (``ncatool config
    TASK`` lists them), typed or as the command line writes it: ``steps=(32, 32)`` or
    ``steps="32,32"``. Unknown names raise :class:`~ncatool.errors.NcaError` listing the valid ones.

    Args:
        task: The task; may come from ``config`` or ``resume`` instead.
        data: The data: an nnU-Net raw dataset (segmentation), a target image (grow), MNIST IDX or
            NPZ (digits); grow and digits default to the data shipped in the package.
        config: A config file, e.g. a run's ``config.json``.
        out: The run folder (default ``runs/<task>_<time>``).
        resume: Continue the run in this folder from ``checkpoints/last.pt``.
        **settings: Config fields, e.g. ``epochs=5``, ``lr=1e-3``, ``device="cpu"``.

    Returns:
        The run summary (what ``ncatool train --json`` prints): ``run_dir``, ``epochs``,
        ``best_<score>``, ``best_epoch``, ``last`` (the last epoch's metrics), ``params``...

    Raises:
        NcaError: Bad settings or data; a stopped run raises :class:`ncatool.train.Stopped`.
    """
    # The command and this function share one path: config resolution, device, run folder, loop.
    from ncatool.commands.train import run_training

    values = dict(settings)
    if data is not None:
        values["data"] = str(data)
    return run_training(
        task,
        Path(config) if config is not None else None,
        Path(out) if out is not None else None,
        Path(resume) if resume is not None else None,
        values,
        [],
    )


__all__ = ["train"]
