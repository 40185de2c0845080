"""Training from Python: :func:`train`, the function behind ``ncatool.train`` and ``ncatool train``.

The other entry points of the API live where their work is done and are re-exported by the package:
:func:`ncatool.predict.predict`, :func:`ncatool.evaluate.evaluate` and :func:`ncatool.runtime.load`
(see :mod:`ncatool`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def train(
    task: str | None = None,
    data: str | Path | Sequence[str | Path] | None = None,
    *,
    config: str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
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
            NPZ (digits), several datasets (incontext: a list, as ``--data`` repeated); grow and digits
            default to the data shipped in the package.
        config: A config file, e.g. a run's ``config.json``.
        out: The run folder (default ``runs/<task>_<time>``).
        resume: Continue the run in this folder from ``checkpoints/last.pt``.
        init: Start from this checkpoint's weights (``--init``: new optimizer and counters), e.g.
            stage 2 of ``incontext`` from stage 1.
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
    if isinstance(data, str | Path):
        values["data"] = str(data)
    elif data is not None:  # as the command line passes a repeated --data
        items = [str(d) for d in data]
        values["data"] = items if len(items) > 1 else items[0]
    return run_training(
        task,
        Path(config) if config is not None else None,
        Path(out) if out is not None else None,
        Path(resume) if resume is not None else None,
        values,
        [],
        Path(init) if init is not None else None,
    )


__all__ = ["train"]
