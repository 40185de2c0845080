"""Segmentation NCAs (``seg2d``: Med-NCA, ``seg3d``: M3D-NCA), the whole life of the task:

* :mod:`.task` — the run's settings (:class:`Seg2DConfig`, :class:`Seg3DConfig`) and the training task
  for the one loop (batches of an nnU-Net dataset, Dice+Focal loss, validation Dice);
* :mod:`.runner` — a checkpoint at work (:class:`SegmentationRunner`): masks that keep the input's
  geometry, ensembles with uncertainty, scores of a dataset split;
* :mod:`.animation` — every NCA step of one case drawn with its predicted mask.
"""

from __future__ import annotations

from ncatool.tasks.segmentation.runner import SegmentationRunner
from ncatool.tasks.segmentation.task import (
    Seg2DConfig,
    Seg3DConfig,
    SegConfig,
    SegmentationTask,
    check_seg_task_config,
    common_crop,
)

__all__ = [
    "Seg2DConfig",
    "Seg3DConfig",
    "SegConfig",
    "SegmentationRunner",
    "SegmentationTask",
    "check_seg_task_config",
    "common_crop",
]
