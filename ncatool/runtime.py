"""How a checkpoint becomes a model that runs: checkpoint files, devices and autocast, in one place.

Every inference command takes the same path, and names no task on the way::

    RUN/checkpoints/best.pt
      └─ read_checkpoint          safe loading (tensors and plain containers only, no code)
      └─ load_checkpoint          → Checkpoint(task, config rebuilt with the task's defaults, weights)
      └─ ncatool.tasks.runner     → the task's Runner (its module says how to rebuild and run it)
           ├─ runner.predict(PredictRequest)    masks or generated images on disk
           ├─ runner.evaluate(EvalRequest)      scores
           └─ runner.animation(AnimateRequest)  a frame source for ``ncatool animate``

Training writes checkpoints through :func:`write_checkpoint`, so the two sides share one format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ncatool.errors import NcaError

if TYPE_CHECKING:
    import torch

    from ncatool.config import TrainConfig

#: The ``format`` entry of every checkpoint ncatool writes.
CHECKPOINT_FORMAT = "ncatool-checkpoint-1"
#: Autocast modes (``none`` = float32).
AMP_CHOICES: tuple[str, ...] = ("none", "bf16", "fp16")


# --------------------------------------------------------------------------------------------------
# Devices and autocast
# --------------------------------------------------------------------------------------------------


def select_device(name: str) -> torch.device:
    """Resolve ``auto`` to cuda, mps or cpu; check an explicit device exists.

    Raises:
        NcaError: The requested device is not available.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise NcaError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NcaError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NcaError(f"device {name!r} requested but MPS is not available on this machine")
    return dev


def check_amp(amp: str) -> str:
    """``amp`` if it is one of :data:`AMP_CHOICES`.

    Raises:
        NcaError: Anything else.
    """
    if amp not in AMP_CHOICES:
        raise NcaError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return amp


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """The one autocast context of ncatool: bf16/fp16 autocast on ``device``, or float32 for ``none``.

    ``none`` returns an autocast context that is *disabled* (not a null context), so code called from
    inside an enclosing autocast still runs in float32.
    """
    import torch

    check_amp(amp)
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load an ncatool checkpoint file without running any code it may hold.

    ``torch.load(weights_only=True)`` unpickles only tensors and plain containers, which is all an
    ncatool checkpoint holds; a file whose pickle asks for anything else (a class, a function call)
    is refused before that object is built.

    Raises:
        NcaError: Missing, unreadable, unsafe, or not an ncatool checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise NcaError("checkpoint does not exist", path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NcaError(f"not a safe ncatool checkpoint: it holds more than tensors ({first})", path) from err
    except Exception as err:  # torch raises many types for corrupt files
        raise NcaError(f"cannot read checkpoint ({type(err).__name__})", path) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise NcaError("not an ncatool checkpoint", path)
    return payload


class _WriteRecorder:
    """A file wrapper that keeps the first ``OSError`` of a write: ``torch.save`` reports a failed
    write (disk full, quota) only as an opaque ``RuntimeError`` from its zip writer."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` (with ``format`` set) to ``path`` atomically: a temporary name, then rename.

    On failure the temporary file is removed and an existing ``path`` (the last good checkpoint) is
    untouched.

    Raises:
        NcaError: The file cannot be written (no space left, permission denied, read-only, ...).
    """
    import torch

    from ncatool.data.io import atomic_path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            sink = _WriteRecorder(fh)
            try:
                torch.save({"format": CHECKPOINT_FORMAT, **payload}, sink)
            except RuntimeError as err:
                if sink.error is None:
                    raise
                raise sink.error from err
    except OSError as err:
        raise NcaError(f"cannot write checkpoint: {err.strerror or err}", path) from err
    return path


def checkpoint_payload(
    config: TrainConfig, model: torch.nn.Module, task_state: dict[str, Any], **training: Any
) -> dict[str, Any]:
    """What a checkpoint holds: the task, its config, the weights, what the task needs besides
    weights (model shape, data split, ...), and for resuming the optimizer, scheduler and counters
    (``training``: ``optimizer``, ``scheduler``, ``run_state``)."""
    from ncatool.config import config_to_dict

    return {
        "task": config.task,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        "task_state": task_state,
        **training,
    }


@dataclass
class Checkpoint:
    """A checkpoint read back: its task, the run's config and what the task saved.

    Attributes:
        path: The file.
        task: Task name (a key of :data:`ncatool.tasks.TASKS`).
        config: The run's config, rebuilt with the task's current defaults and names (settings an
            older ncatool saved under another name are renamed).
        weights: The model's ``state_dict``.
        task_state: What the task stored besides weights (model shape, data split, ...).
        payload: The whole file (optimizer, counters), for resuming.
    """

    path: Path
    task: str
    config: TrainConfig
    weights: dict[str, Any]
    task_state: dict[str, Any]
    payload: dict[str, Any]


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read ``path`` and rebuild its run config through the task registry.

    Raises:
        NcaError: The file is not a usable ncatool checkpoint.
    """
    from ncatool.config import build_config
    from ncatool.tasks import config_class

    path = Path(path)
    payload = read_checkpoint(path, device)
    task = payload.get("task")
    if not isinstance(task, str):
        raise NcaError("checkpoint names no task", path)
    values = dict(payload.get("config") or {})
    values["task"] = task
    config = build_config(config_class(task), values, str(path))
    return Checkpoint(
        path=path,
        task=task,
        config=config,
        weights=payload.get("model") or {},
        task_state=dict(payload.get("task_state") or {}),
        payload=payload,
    )


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> torch.nn.Module:
    """``model`` (built from the checkpoint's config) with the checkpoint's weights.

    Raises:
        NcaError: The weights do not fit the model.
    """
    try:
        model.load_state_dict(checkpoint.weights)
    except (RuntimeError, KeyError) as err:
        raise NcaError(
            f"checkpoint weights do not fit its {checkpoint.task} model ({err})", checkpoint.path
        ) from err
    return model


# --------------------------------------------------------------------------------------------------
# What a task's runner is asked to do
# --------------------------------------------------------------------------------------------------


class _Options:
    """What the request dataclasses share: refusing options that do not apply to a task."""

    def refuse(self, task: str, *names: str) -> None:
        """Fail when an option in ``names`` was set away from its default.

        Raises:
            NcaError: Naming the option and the task it does not apply to.
        """
        defaults = {f.name: f.default for f in fields(self)}  # type: ignore[arg-type]
        for name in names:
            if getattr(self, name) != defaults[name]:
                raise NcaError(f"--{name.replace('_', '-')} does not apply to {task} checkpoints")


@dataclass(frozen=True)
class PredictRequest(_Options):
    """``ncatool predict`` options. A runner uses those that apply to it and refuses the others.

    Attributes:
        output: Output folder.
        input: Images to segment (segmentation runners).
        ensemble: Stochastic runs averaged per case.
        native: Run at each input's own size instead of the training size.
        seed: Seed of the stochastic cell updates.
        samples: Generated samples (per class for conditional generation).
        labels: Classes to generate (conditional generation).
        steps: NCA steps (generation); None = as validated.
        format: Segmentation mask files: ``auto`` (PNG for PNG/JPG/BMP/TIFF inputs, NIfTI for
            volumes), ``nifti`` or ``png``.
        on_case: Called with each case's result row as soon as it is written.
        context: In-context segmentation: the dataset whose examples say what to segment.
        context_size: In-context segmentation: example pairs per label (None = the run's).
        adapt_steps: In-context segmentation: fine-tune a copy of the model on each label's context
            for this many steps first (0: no adaptation; :mod:`ncatool.tasks.incontext.adapt`).
    """

    output: Path
    input: Path | None = None
    ensemble: int = 1
    native: bool = False
    seed: int = 0
    samples: int = 4
    labels: tuple[int, ...] | None = None
    steps: int | None = None
    format: str = "auto"
    on_case: Callable[[dict[str, Any]], None] | None = None
    context: Path | None = None
    context_size: int | None = None
    adapt_steps: int = 0


@dataclass(frozen=True)
class EvalRequest(_Options):
    """``ncatool eval --checkpoint`` options. A runner uses those that apply to it and refuses the others.

    Attributes:
        data: Dataset (segmentation) or replacement data path (generation); None = the run's own.
        split: ``val``, ``train``, ``test`` or ``all``.
        labels: Labels to score (None = all).
        output: Where to keep predictions and write ``summary.json`` (None = nowhere).
        ensemble: Stochastic runs per case.
        native: Predict at each input's own size.
        seed: Seed of the stochastic cell updates.
        context_size: In-context segmentation: the context sizes to score (None = the run's).
        adapt_steps: In-context segmentation: fine-tune a copy of the model on each context draw
            for this many steps before scoring the queries (0: no adaptation).
    """

    data: Path | None = None
    split: str = "val"
    labels: Sequence[int] | None = None
    output: Path | None = None
    ensemble: int = 1
    native: bool = False
    seed: int = 0
    context_size: tuple[int, ...] | None = None
    adapt_steps: int = 0


@dataclass(frozen=True)
class AnimateRequest(_Options):
    """``ncatool animate`` options (see :func:`ncatool.animate.animate`).

    Attributes:
        input: Segmentation: the image to segment.
        steps: Steps (``"N"``, or one per level ``"N1,N2"``); None = the run's.
        axis: 3D: the axis of the single slice or montage; 2D model on a volume: the slicing axis.
        slice_index: The slice shown (input voxels).
        montage: 3D: up to 16 slices along ``axis``.
        hidden: Hidden channels shown.
        overlay: Segmentation overlay, ``mask`` or ``prob``.
        damage: Growing: erase a circle part-way.
        damage_at: Step after which the circle is erased.
        damage_center: ``(y, x)`` in grid pixels.
        damage_radius: In grid pixels.
        seed: Seed of the cell updates and of random damage (in-context: also of the context's order).
        context: In-context segmentation: the dataset whose examples say what to segment.
        context_size: In-context segmentation: example pairs per label (None = the run's).
        labels: In-context segmentation: the context's labels to segment (None = all).
    """

    input: Path | None = None
    steps: str | None = None
    axis: int | None = None
    slice_index: int | None = None
    montage: bool = False
    hidden: int = 0
    overlay: str = "mask"
    damage: bool = False
    damage_at: int | None = None
    damage_center: tuple[float, float] | None = None
    damage_radius: float | None = None
    seed: int = 0
    context: Path | None = None
    context_size: int | None = None
    labels: tuple[int, ...] | None = None


class Runner(Protocol):
    """A trained model of one task, ready for inference (what :func:`ncatool.tasks.runner` returns)."""

    task: str
    device: torch.device
    amp: str

    def predict(self, request: PredictRequest) -> dict[str, Any]:
        """Write predictions (masks or generated images); return a JSON-ready summary."""
        ...

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Score the model; return a JSON-ready summary."""
        ...

    def animation(self, request: AnimateRequest) -> Any:
        """A frame source for ``ncatool animate`` (:class:`ncatool.animate.Source`)."""
        ...


def load(checkpoint: str | Path, device: str = "auto", amp: str = "none") -> Runner:
    """The runner of a checkpoint file: its task's model with its preprocessing, on ``device``.

    Raises:
        NcaError: Unreadable checkpoint, unknown task, weights that do not fit, unusable device.
    """
    from ncatool.distributed import rank_device, setup
    from ncatool.tasks import runner

    w = setup(device)  # under torchrun, join the ranks: the runner shares the cases among them
    return runner(load_checkpoint(checkpoint), select_device(rank_device(device, w)), check_amp(amp))


def no_grad_autocast(device: torch.device, amp: str) -> contextlib.ExitStack:
    """``torch.no_grad()`` and :func:`autocast` together (inference)."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(autocast(device, amp))
    return stack
