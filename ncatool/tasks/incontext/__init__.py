"""In-context segmentation (``incontext``): one NCA segments structures it was never trained on,
from k example pairs (image, mask) of the same structure.

* :mod:`.episodes` — the datasets in memory, the tasks (labels and unions of labels) and episodes;
* :mod:`.task` — the run's settings (:class:`InContextConfig`) and the training task for the one loop
  (stages 1 and 2, chunked context, Dice+Focal plus the prior's own loss, validation Dice);
* :mod:`.runner` — a checkpoint at work (:class:`InContextRunner`): label maps of new images from a
  context dataset, Dice per context size;
* :mod:`.pictures` — the training sample picture (context pairs, query, reference, prediction).

The model itself is :class:`ncatool.models.incontext.InContextNCA`.
"""

from __future__ import annotations

from ncatool.tasks.incontext.runner import InContextRunner
from ncatool.tasks.incontext.task import InContextConfig, InContextTask

__all__ = ["InContextConfig", "InContextRunner", "InContextTask"]
