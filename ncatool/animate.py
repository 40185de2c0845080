"""Watch a trained NCA work: render its state step by step as a GIF, an MP4 or PNG frames.

What is drawn is the checkpoint's task's business (its runner's ``animation``):

* segmentation (:mod:`ncatool.tasks.segmentation.animation`): the input image, preprocessed as in
  training, with the predicted mask overlaid as it evolves, level after level; 3D volumes as three
  orthogonal slices, one slice or a montage;
* in-context segmentation (:mod:`ncatool.tasks.incontext.animation`): the query with the label map
  of the context's labels, as ``predict`` makes it, over the last level's steps;
* growing and digits (:mod:`ncatool.tasks.generation`): the state from the seed (RGBA over white, or
  the ten digits side by side), optionally damaged part-way to show the regrowth.

``hidden=K`` adds the first K hidden channels of the state (blue negative, white zero, red positive,
scaled per frame and channel by the 99th percentile of the magnitude).

Frames: one for the initial state (step 0), one after every ``every``-th step, one after the last
step, and (with damage) one right after the damage: :func:`frame_steps`. Without damage there are
``1 + ceil(total_steps / every)`` frames. Each frame carries a header with the step number.

This module is the orchestration: a :class:`Source` runs the model and renders each state, and
:func:`render` schedules the frames and hands them to the writers. How a picture is drawn lives in
:mod:`ncatool.viz` (colours, the grid, slices of volumes, the header, GIF/MP4/PNG writers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ncatool.console import ProgressBars
from ncatool.errors import NcaError
from ncatool.runtime import AnimateRequest
from ncatool.viz.text import FrameComposer
from ncatool.viz.writers import FrameWriter, PngFramesWriter, animation_writer, output_format

# --------------------------------------------------------------------------------------------------
# Frame schedule
# --------------------------------------------------------------------------------------------------


def frame_steps(total: int, every: int, extra: Sequence[int] = ()) -> list[int]:
    """The steps that get a frame: 0, every multiple of ``every``, ``total`` and ``extra``.

    Args:
        total: Total number of NCA steps (>= 1).
        every: Frame stride (>= 1).
        extra: Further steps to include (e.g. the damage step), within ``[0, total]``.

    Returns:
        Sorted unique steps; ``1 + ceil(total / every)`` of them when ``extra`` adds nothing new.
    """
    steps = set(range(0, total + 1, every)) | {total} | {s for s in extra if 0 <= s <= total}
    return sorted(steps)


# --------------------------------------------------------------------------------------------------
# What a source gives, and helpers for writing one (the sources use only these and ncatool.viz)
# --------------------------------------------------------------------------------------------------


StepCallback = Callable[[int, torch.Tensor, int], None]


class Source(Protocol):
    """A model run to animate."""

    task: str
    total_steps: int

    def run(self, on_step: StepCallback) -> None:
        """Call ``on_step(step, state, level)`` for step 0 (initial state) and after every step."""

    def render(self, state: torch.Tensor, level: int, scale: int) -> np.ndarray:
        """The panels ``(H, W, 3)`` uint8 for one state, enlarged ``scale`` times."""

    def label(self, step: int) -> str:
        """The header text of a frame."""

    def base_size(self) -> tuple[int, int]:
        """``(largest tile side, unscaled body width)``: for the automatic scale."""

    def describe(self) -> dict[str, Any]:
        """Task-specific facts for the JSON summary."""


def check_hidden(hidden: int, available: int, task: str) -> None:
    """Refuse ``--hidden`` below 0 or above the ``available`` hidden channels of the model.

    Raises:
        NcaError: Out of range.
    """
    if hidden < 0:
        raise NcaError(f"--hidden must be >= 0, got {hidden}")
    if hidden > available:
        raise NcaError(f"--hidden {hidden}: the {task} model has only {available} hidden channels")


def parse_steps(spec: str | int | None, levels: int) -> tuple[int, ...] | None:
    """``"N"`` (every level) or ``"N1,N2,..."`` (one per level) → steps per level; None stays None.

    Raises:
        NcaError: Not integers >= 1, or a list of the wrong length.
    """
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise NcaError(f"--steps must be an integer >= 1 (or one per level, comma-separated), got {spec!r}")
    if len(values) == 1:
        return values * levels
    if len(values) != levels:
        raise NcaError(f"--steps gives {len(values)} values but the model has {levels} level(s)")
    return values


# --------------------------------------------------------------------------------------------------
# Segmentation (seg2d, seg3d): the input with the predicted mask overlaid
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_source(checkpoint: str | Path, request: AnimateRequest, device: str = "auto") -> Source:
    """What to animate: the checkpoint's task runner makes the source (see :mod:`ncatool.runtime`).

    Raises:
        NcaError: Missing/corrupt checkpoint, options that do not apply to its task.
    """
    from ncatool.runtime import load

    return load(checkpoint, device).animation(request)


def auto_scale(source: Source) -> int:
    """A nearest-neighbour factor that makes tiles about 256 px (at most 16x, body <= ~1024 px)."""
    side, width = source.base_size()
    return int(max(1, min(16, 256 // max(side, 1), 1024 // max(width, 1))))


def render(
    source: Source,
    writers: Sequence[FrameWriter],
    every: int = 1,
    scale: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the source and feed every scheduled frame to the writers.

    Args:
        source: What to run and draw.
        writers: Where the frames go (closing them is the caller's part).
        every: Frame stride.
        scale: Nearest-neighbour enlargement; None picks one (:func:`auto_scale`).
        progress: A progress bar on stderr (never with ``--quiet`` or ``NCATOOL_NO_PROGRESS``).

    Returns:
        ``{"frames", "frame_steps", "size": [width, height], "scale", "total_steps"}``.
    """
    if every < 1:
        raise NcaError(f"--every must be >= 1, got {every}")
    if scale is not None and scale < 1:
        raise NcaError(f"--scale must be >= 1, got {scale}")
    total = source.total_steps
    if total < 1:
        raise NcaError("nothing to animate: the model runs 0 steps (set --steps)")
    damage = getattr(source, "damage", None)
    steps = frame_steps(total, every, [damage.step] if damage is not None else [])
    wanted = set(steps)
    factor = scale or auto_scale(source)
    composer = FrameComposer([source.label(s) for s in steps])
    written = 0

    with ProgressBars(progress) as bars:
        bar = bars.add("rendering", total + 1)

        def on_step(step: int, state: torch.Tensor, level: int) -> None:
            nonlocal written
            if step in wanted:
                frame = composer.compose(source.render(state, level, factor), source.label(step))
                for w in writers:
                    w.add(frame)
                written += 1
            bars.advance(bar)

        source.run(on_step)
    h, w = composer.size or (0, 0)
    return {"frames": written, "frame_steps": steps, "size": [w, h], "scale": factor, "total_steps": total}


def animate(
    checkpoint: str | Path,
    output: str | Path | None = None,
    input_spec: str | Path | None = None,
    steps: str | int | None = None,
    every: int = 1,
    fps: float = 10.0,
    scale: int | None = None,
    frames_dir: str | Path | None = None,
    axis: int | None = None,
    slice_index: int | None = None,
    montage: bool = False,
    hidden: int = 0,
    overlay: str = "mask",
    damage: bool = False,
    damage_at: int | None = None,
    damage_center: tuple[float, float] | None = None,
    damage_radius: float | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    context: str | Path | None = None,
    context_size: int | None = None,
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``ncatool animate``: render a checkpoint's NCA step by step.

    Args:
        checkpoint: A run's checkpoint (any task whose runner animates).
        output: ``.gif`` or ``.mp4`` (written atomically); may be None when ``frames_dir`` is given.
        input_spec: Segmentation and in-context: the image to segment (see
            :func:`ncatool.tasks.segmentation.animation.seg_record`).
        steps: Steps (segmentation: per level, ``"N"`` or ``"N1,N2"``); default the run's steps
            (grow with damage: twice the run's steps, damage half-way).
        every: Frame stride.
        fps: Frames per second of the animation.
        scale: Nearest-neighbour enlargement; None picks one (tiles of about 256 px).
        frames_dir: Also write every frame as ``frame_NNNNN.png`` here.
        axis: 3D: array axis of the single slice or montage; seg2d on a volume: the slicing axis.
        slice_index: 3D: the slice shown (input voxels); seg2d on a volume: the slice segmented.
        montage: 3D: a montage of up to 16 slices along ``axis``.
        hidden: Show the first ``hidden`` hidden channels.
        overlay: Segmentation overlay, ``mask`` or ``prob``.
        damage: Grow/digits: erase a circle at ``damage_at`` (default half-way).
        damage_at: Step after which the circle is erased (implies ``damage``).
        damage_center: ``(y, x)`` in grid pixels (implies ``damage``); default random.
        damage_radius: In grid pixels (implies ``damage``); default random in the run's range.
        seed: Seed of the stochastic cell updates and of random damage (in-context: also of the
            order the context cases are taken in, as ``predict --seed``).
        device: auto, cpu, cuda, cuda:N or mps.
        progress: Show a progress bar on stderr.
        context: In-context checkpoints: the nnU-Net dataset whose examples say what to segment.
        context_size: In-context checkpoints: example pairs per label (None: the run's).
        labels: In-context checkpoints: the context's labels to segment (None: all).

    Returns:
        A summary: ``checkpoint``, ``task``, ``output``, ``format``, ``frames_dir``, ``frames``,
        ``frame_steps``, ``size`` (width, height), ``scale``, ``total_steps``, ``every``, ``fps`` and
        task facts (input, model size, damage, ...).

    Raises:
        NcaError: Bad options, unsupported format or task, missing ffmpeg, unreadable input.
    """
    if output is None and frames_dir is None:
        raise NcaError("nothing to write: give --output (.gif or .mp4) and/or --frames DIR")
    fmt = output_format(output) if output is not None else None
    if fps <= 0:
        raise NcaError(f"--fps must be > 0, got {fps:g}")
    if every < 1:
        raise NcaError(f"--every must be >= 1, got {every}")
    if scale is not None and scale < 1:
        raise NcaError(f"--scale must be >= 1, got {scale}")
    request = AnimateRequest(
        input=Path(input_spec) if input_spec is not None else None,
        steps=str(steps) if steps is not None else None,
        axis=axis,
        slice_index=slice_index,
        montage=montage,
        hidden=hidden,
        overlay=overlay,
        damage=damage,
        damage_at=damage_at,
        damage_center=damage_center,
        damage_radius=damage_radius,
        seed=seed,
        context=Path(context) if context is not None else None,
        context_size=context_size,
        labels=tuple(labels) if labels is not None else None,
    )
    with torch.random.fork_rng(devices=[]):
        source = load_source(checkpoint, request, device)
        # seeded right before the run, as predict seeds each case: the last frame is predict's mask
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        result = _write(source, output, fmt, frames_dir, fps, every, scale, progress)
    return {
        "checkpoint": str(checkpoint),
        "task": source.task,
        "output": str(output) if output is not None else None,
        "format": fmt,
        "frames_dir": str(frames_dir) if frames_dir is not None else None,
        **result,
        "every": every,
        "fps": fps,
        **source.describe(),
    }


def _write(
    source: Source,
    output: str | Path | None,
    fmt: str | None,
    frames_dir: str | Path | None,
    fps: float,
    every: int,
    scale: int | None,
    progress: bool,
) -> dict[str, Any]:
    from ncatool.data.io import atomic_path

    with contextlib.ExitStack() as stack:
        writers: list[FrameWriter] = []
        if output is not None and fmt is not None:
            out = Path(output)
            out.parent.mkdir(parents=True, exist_ok=True)
            writers.append(animation_writer(stack.enter_context(atomic_path(out)), fmt, fps))
        if frames_dir is not None:
            writers.append(PngFramesWriter(Path(frames_dir)))
        try:
            result = render(source, writers, every, scale, progress)
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
    return result


__all__ = [
    "Source",
    "animate",
    "check_hidden",
    "frame_steps",
    "load_source",
    "parse_steps",
    "render",
]
