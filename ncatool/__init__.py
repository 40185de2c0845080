"""ncatool: Neural Cellular Automata for medical images, as a command-line toolkit and a Python API.

The API is what the ``ncatool`` commands call::

    import ncatool

    summary = ncatool.train("grow", epochs=2, iters_per_epoch=5, out="runs/grow")
    runner = ncatool.load("runs/grow/checkpoints/best.pt")  # the task's runner; .model is the NCA
    ncatool.predict("runs/seg/checkpoints/best.pt", "images/", "masks/")
    scores = ncatool.evaluate(pred="masks/", gt="labels/")

* :func:`train` (:func:`ncatool.api.train`): ``ncatool train``;
* :func:`predict` (:func:`ncatool.predict.predict`): ``ncatool predict``;
* :func:`evaluate` (:func:`ncatool.evaluate.evaluate`): ``ncatool eval``;
* :func:`load` (:func:`ncatool.runtime.load`): a checkpoint's runner, whose ``model`` steps;
* the automata: :class:`NCA`, :class:`NCAConfig`, :class:`SegmentationNCA`, :class:`SegModelConfig`,
  :class:`ConditionalNCA`; and :class:`NcaError`, the one exception for user errors.

Every name is imported on first use (a module ``__getattr__``), so ``import ncatool`` and
``ncatool --help`` stay instant. ``train``, ``predict`` and ``evaluate`` are also the names of
modules of this package (``from ncatool.train import Trainer`` reaches the module); on the package
they stay the functions, whichever of those modules has been imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → (module, attribute), imported on first use.
_API: dict[str, tuple[str, str]] = {
    "train": ("ncatool.api", "train"),
    "predict": ("ncatool.predict", "predict"),
    "evaluate": ("ncatool.evaluate", "evaluate"),
    "load": ("ncatool.runtime", "load"),
    "NCA": ("ncatool.models.nca", "NCA"),
    "NCAConfig": ("ncatool.models.nca", "NCAConfig"),
    "SegmentationNCA": ("ncatool.models.segmentation", "SegmentationNCA"),
    "SegModelConfig": ("ncatool.models.segmentation", "SegModelConfig"),
    "ConditionalNCA": ("ncatool.models.growing", "ConditionalNCA"),
    "NcaError": ("ncatool.errors", "NcaError"),
}

__all__ = [
    "NCA",
    "ConditionalNCA",
    "NCAConfig",
    "NcaError",
    "SegModelConfig",
    "SegmentationNCA",
    "__version__",
    "evaluate",
    "load",
    "predict",
    "train",
]

if TYPE_CHECKING:
    from ncatool.api import train
    from ncatool.errors import NcaError
    from ncatool.evaluate import evaluate
    from ncatool.models.growing import ConditionalNCA
    from ncatool.models.nca import NCA, NCAConfig
    from ncatool.models.segmentation import SegmentationNCA, SegModelConfig
    from ncatool.predict import predict
    from ncatool.runtime import load


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'ncatool' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """The package module: importing ``ncatool.train`` (or ``.predict``, ``.evaluate``) binds that
    submodule on the package; keep the API function under that name instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
