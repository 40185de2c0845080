"""Watch a trained NCA work: render its state step by step as a GIF, an MP4 or PNG frames.

What is drawn depends on the checkpoint's task (``payload["task"]``):

* ``seg2d`` / ``seg3d``: the input image (preprocessed exactly as in training, see
  :class:`ncatool.predict.SegPredictor`), grayscale, with the predicted mask overlaid as it evolves:
  ``overlay="mask"`` colours voxels whose highest foreground probability (sigmoid of the logit
  channels) exceeds 0.5, ``overlay="prob"`` tints every voxel with the colour of its most likely
  label at an opacity proportional to that probability. Every level of a multi-level model is shown
  in sequence; coarse levels are upsampled (nearest) to the full size so every frame has the same
  size. 3D: three orthogonal slices through the centre (axis 0 first; the other two with the first
  array axis pointing up), or one ``axis``/``slice_index``, or a ``montage`` of up to 16 evenly
  spaced slices along ``axis``. ``seg2d`` on a volume animates one slice (``slice_index``, default
  the middle one, along ``axis`` or the run's ``slice_axis``).
* ``grow``: the RGBA of the state over a white background, from the seed; ``damage`` erases a
  circle part-way and shows the regrowth.
* ``digits``: all ten classes growing side by side (channel 0, white on black); damage works too.

``hidden=K`` adds the first K hidden channels of the state (blue negative, white zero, red positive,
scaled per frame and channel by the 99th percentile of the magnitude): a row below the main panels (a
2D slice for 3D models), or for digits one row per channel under the ten classes.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ncatool.console import ProgressBars
from ncatool.errors import NcaError
from ncatool.viz.colour import OVERLAYS, gray_to_rgb, hidden_tiles, overlay_probs, rgba_to_rgb, window
from ncatool.viz.grid import HIDDEN_PER_ROW, TILES_PER_ROW_2D, in_rows, tile_grid, upscale
from ncatool.viz.text import FrameComposer
from ncatool.viz.volume import VolumeView, take_slice
from ncatool.viz.writers import FrameWriter, PngFramesWriter, animation_writer, output_format

#: Tasks this module can animate.
ANIMATABLE_TASKS: tuple[str, ...] = ("seg2d", "seg3d", "grow", "digits")


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


@dataclass
class SegSource:
    """A segmentation model on one preprocessed image.

    Attributes:
        model: The :class:`~ncatool.models.segmentation.SegmentationNCA` (eval mode, on its device).
        task: ``seg2d`` or ``seg3d``.
        image: ``(1, C, *S)`` normalised and resized as in training, on the model's device.
        view: Slices shown for 3D.
        hidden: Hidden channels shown.
        overlay: ``mask`` or ``prob``.
        info: Facts for the summary (input files, slice).
    """

    model: Any
    task: str
    image: torch.Tensor
    view: VolumeView = field(default_factory=VolumeView)
    hidden: int = 0
    overlay: str = "mask"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        self.steps = tuple(int(s) for s in cfg.steps)
        self.total_steps = sum(self.steps)
        self.dim = cfg.dim
        self.in_ch, self.n_out = cfg.in_channels, cfg.n_out
        check_hidden(self.hidden, cfg.channels - cfg.in_channels - cfg.n_out, self.task)
        self.full_size = tuple(int(s) for s in self.image.shape[2:])
        self.gray = self.image[0, 0].float().cpu().numpy()
        self.lo, self.hi = window(self.gray)
        self._bounds = np.cumsum((0, *self.steps))

    def level_of(self, step: int) -> int:
        """Level (0-based) that produced the state after global ``step`` (step 0: level 0)."""
        for level in range(len(self.steps)):
            if step <= self._bounds[level + 1] and self.steps[level] > 0:
                return level
        return len(self.steps) - 1

    def label(self, step: int) -> str:
        text = f"step {step}/{self.total_steps}"
        if len(self.steps) > 1:
            text += f" | level {self.level_of(step) + 1}/{len(self.steps)}"
        return text

    def run(self, on_step: StepCallback) -> None:
        counter = [0]
        levels = list(self.model.levels)

        def wrap(level: int, nca: Any) -> Callable[..., torch.Tensor]:
            step = type(nca).step.__get__(nca)  # the class method, never the shadowing attribute

            def stepped(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
                if counter[0] == 0:
                    on_step(0, x, level)
                out = step(x, cond)
                counter[0] += 1
                on_step(counter[0], out, level)
                return out

            return stepped

        for level, nca in enumerate(levels):
            nca.step = wrap(level, nca)
        try:
            with torch.no_grad():
                self.model(self.image)
        finally:
            for nca in levels:
                with contextlib.suppress(AttributeError):
                    del nca.step

    def _full(self, x: torch.Tensor) -> np.ndarray:
        """``(k, *S_level)`` → ``(k, *S_full)`` float32 numpy (nearest upsampling)."""
        if tuple(x.shape[1:]) != self.full_size:
            x = F.interpolate(x[None].float(), size=self.full_size, mode="nearest")[0]
        return x.float().cpu().numpy()

    def render(self, state: torch.Tensor, level: int, scale: int) -> np.ndarray:
        s = state[0]
        probs = self._full(torch.sigmoid(s[self.in_ch : self.in_ch + self.n_out].float()))
        start = self.in_ch + self.n_out
        hidden = self._full(s[start : start + self.hidden]) if self.hidden else None
        if self.dim == 2:
            image = overlay_probs(gray_to_rgb(self.gray, self.lo, self.hi), probs, self.overlay)
            tiles = [upscale(image, scale)]
            if hidden is not None:
                tiles += hidden_tiles(hidden, scale)
            return tile_grid(in_rows(tiles, TILES_PER_ROW_2D))
        tiles = [
            upscale(
                overlay_probs(
                    gray_to_rgb(take_slice(self.gray, a, i), self.lo, self.hi),
                    take_slice(probs, a, i),
                    self.overlay,
                ),
                scale,
            )
            for a, i in self.view.slices(self.full_size)
        ]
        blocks = [tile_grid(in_rows(tiles, self.view.columns(len(tiles))))]
        if hidden is not None:  # one slice of each hidden channel, in rows below
            hid = take_slice(hidden, *self.view.hidden_slice(self.full_size))
            blocks.append(tile_grid(in_rows(hidden_tiles(hid, scale), HIDDEN_PER_ROW)))
        return tile_grid([[b] for b in blocks])

    def base_size(self) -> tuple[int, int]:
        if self.dim == 2:
            side = max(self.full_size)
            return side, min(1 + self.hidden, TILES_PER_ROW_2D) * self.full_size[1]
        panels = self.view.slices(self.full_size)
        shapes = [tuple(s for j, s in enumerate(self.full_size) if j != a) for a, _ in panels]
        side = max(max(s) for s in shapes)
        cols = self.view.columns(len(shapes))
        return side, cols * max(s[1] for s in shapes)

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "model_size": list(self.full_size),
            "steps_per_level": list(self.steps),
            "overlay": self.overlay,
            "view": None if self.dim == 2 else self.view.__dict__,
        }


def seg_record(spec: str | Path) -> Any:
    """The case of ``--input``: one image file (``CASE_0000`` brings its sibling channel files), a
    comma-separated list of channel files, or an nnU-Net case prefix (``imagesTs/CASE``).

    Raises:
        NcaError: Missing files, or a folder.
    """
    from ncatool.data.io import is_image_file, split_extension
    from ncatool.data.loading import CaseRecord
    from ncatool.predict import discover_cases

    text = str(spec)
    path = Path(text)
    if not path.exists() and "," in text:
        paths = [Path(p.strip()) for p in text.split(",") if p.strip()]
        for p in paths:
            if not p.is_file():
                raise NcaError("channel file does not exist", p)
            if not is_image_file(p):
                raise NcaError("not an image file ncatool can read", p)
        return CaseRecord(split_extension(paths[0])[0], paths, None)
    if path.is_dir():
        raise NcaError(
            "is a folder; --input takes one image file, comma-separated channel files or a case prefix",
            path,
        )
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        first = (
            sorted(p for p in parent.glob(f"{path.name}_0000.*") if is_image_file(p))
            if parent.is_dir()
            else []
        )
        if not first:
            raise NcaError(f"input does not exist (nor a channel file {path.name}_0000.*)", path)
        path = first[0]
    records, _ = discover_cases(path)
    return records[0]


def _view(axis: int | None, slice_index: int | None, montage: bool) -> VolumeView:
    if montage and slice_index is not None:
        raise NcaError("--montage and --slice exclude each other (--axis picks the montage's axis)")
    if axis is not None and axis not in (0, 1, 2):
        raise NcaError(f"--axis must be 0, 1 or 2 (array axes of the volume), got {axis}")
    if montage:
        return VolumeView("montage", axis or 0)
    if axis is not None or slice_index is not None:
        return VolumeView("slice", axis or 0, slice_index)
    return VolumeView()


def _check_index(index: int, n: int, axis: int, path: Path) -> None:
    if not 0 <= index < n:
        raise NcaError(f"--slice {index} out of range: axis {axis} has {n} slices (0..{n - 1})", path)


def load_seg_source(
    payload: dict[str, Any],
    path: Path,
    input_spec: str | Path | None,
    device: str,
    steps: str | int | None,
    view_opts: tuple[int | None, int | None, bool],
    hidden: int,
    overlay: str,
) -> SegSource:
    """A :class:`SegSource` for a segmentation checkpoint and an input image.

    Raises:
        NcaError: Missing input, input that does not fit the model, bad view options.
    """
    from ncatool.data.transforms import resize_image
    from ncatool.predict import predictor_from_payload

    if input_spec is None:
        raise NcaError(
            f"--input is required to animate a {payload.get('task')} checkpoint (an image to segment)"
        )
    if overlay not in OVERLAYS:
        raise NcaError(f"--overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
    record = seg_record(input_spec)
    predictor = predictor_from_payload(payload, path, device)
    model = predictor.model
    per_level = parse_steps(steps, model.cfg.levels)
    if per_level is not None:
        model.cfg = replace(model.cfg, steps=per_level)
    data = predictor.load(record)
    image = data.image
    axis, index, montage = view_opts
    first = record.image_paths[0]
    info: dict[str, Any] = {
        "input": [str(p) for p in record.image_paths],
        "input_shape": list(data.spatial_shape),
    }
    view = VolumeView()
    if model.cfg.dim == 2:
        if data.dim == 3:
            if montage:
                raise NcaError("--montage needs a 3D model; a seg2d model animates one slice (--slice)")
            a = predictor.slice_axis if axis is None else axis
            if a not in (0, 1, 2):
                raise NcaError(f"--axis must be 0, 1 or 2 (array axes of the volume), got {a}")
            n = image.shape[a + 1]
            i = n // 2 if index is None else index
            _check_index(i, n, a, first)
            image = np.take(image, i, axis=a + 1)
            info["slice"] = {"axis": a, "index": i}
        elif axis is not None or index is not None or montage:
            raise NcaError("--axis, --slice and --montage apply to volumes; the input is a 2D image", first)
    else:
        view = _view(axis, index, montage)
        if view.mode == "slice" and view.index is not None:
            _check_index(view.index, image.shape[view.axis + 1], view.axis, first)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(predictor.device)
    if predictor.target_size is not None:
        x = resize_image(x, predictor.target_size)
    if view.mode == "slice" and view.index is not None:
        # the index is in input voxels: map it to the resized volume
        n_in, n_out = image.shape[view.axis + 1], x.shape[2 + view.axis]
        view = replace(view, index=min(n_out - 1, int(view.index * n_out / n_in)))
    return SegSource(model, predictor.task, x, view, hidden, overlay, info)


# --------------------------------------------------------------------------------------------------
# Growing (grow, digits): from the seed, optionally damaged
# --------------------------------------------------------------------------------------------------


@dataclass
class Damage:
    """A circle erased from the state right after ``step`` (centre and radius in grid pixels)."""

    step: int
    center: tuple[float, float]
    radius: float

    def keep_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``(1, 1, H, W)``: 0 inside the circle, 1 outside."""
        ys = torch.arange(height, dtype=torch.float32).view(height, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, width)
        inside = (ys - self.center[0]) ** 2 + (xs - self.center[1]) ** 2 < self.radius**2
        return (~inside).float().view(1, 1, height, width).to(device)


@dataclass
class SeedSource:
    """A seed-grown 2D model: ``grow`` (one RGBA image) or ``digits`` (ten classes side by side).

    Attributes:
        nca: The :class:`~ncatool.models.nca.NCA` core (eval mode, on its device).
        task: ``grow`` or ``digits``.
        seed_state: ``(B, C, H, W)`` initial state (B = 1 for grow, 10 for digits).
        total_steps: Steps to run.
        cond: ``(B, cond_channels)`` conditioning (digits: the label embeddings), or None.
        hidden: Hidden channels shown.
        damage: Optional damage.
    """

    nca: Any
    task: str
    seed_state: torch.Tensor
    total_steps: int
    cond: torch.Tensor | None = None
    hidden: int = 0
    damage: Damage | None = None

    def __post_init__(self) -> None:
        self.first_hidden = 4 if self.task == "grow" else 1
        check_hidden(self.hidden, self.seed_state.shape[1] - self.first_hidden, self.task)

    def label(self, step: int) -> str:
        text = f"step {step}/{self.total_steps}"
        if self.damage is not None and step >= self.damage.step:
            text += " | damaged" if step == self.damage.step else " | regrowing"
        return text

    def run(self, on_step: StepCallback) -> None:
        x = self.seed_state
        h, w = x.shape[-2:]
        with torch.no_grad():
            on_step(0, x, 0)
            for step in range(1, self.total_steps + 1):
                x = self.nca.step(x, self.cond)
                if self.damage is not None and step == self.damage.step:
                    x = x * self.damage.keep_mask(h, w, x.device).to(x.dtype)
                on_step(step, x, 0)

    def render(self, state: torch.Tensor, level: int, scale: int) -> np.ndarray:
        s = state.float().cpu()
        k0 = self.first_hidden
        if self.task == "grow":
            tiles = [upscale(rgba_to_rgb(s[0, :4]), scale)]
            if self.hidden:
                tiles += hidden_tiles(s[0, k0 : k0 + self.hidden].numpy(), scale)
            return tile_grid(in_rows(tiles, TILES_PER_ROW_2D))
        digits = s[:, 0].clamp(0.0, 1.0).numpy()
        rows = [[upscale(gray_to_rgb(d, 0.0, 1.0), scale) for d in digits]]
        rows += [hidden_tiles(s[:, k0 + k].numpy(), scale) for k in range(self.hidden)]  # a row per channel
        return tile_grid(rows)

    def base_size(self) -> tuple[int, int]:
        h, w = self.seed_state.shape[-2:]
        cols = min(1 + self.hidden, TILES_PER_ROW_2D) if self.task == "grow" else self.seed_state.shape[0]
        return max(h, w), cols * w

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grid": list(self.seed_state.shape[-2:])}
        if self.task == "digits":
            out["classes"] = list(range(self.seed_state.shape[0]))
        if self.damage is not None:
            out["damage"] = {
                "step": self.damage.step,
                "center": [round(c, 2) for c in self.damage.center],
                "radius": round(self.damage.radius, 2),
            }
        return out


def _config_steps(run: dict[str, Any], task: str) -> int:
    if task == "grow":
        val = int(run.get("val_steps") or 0)
        steps = run.get("steps") or (64, 96)
        return val or int(steps[-1] if isinstance(steps, list | tuple) else steps)
    return int(run.get("steps") or 32)


def _resolve_damage(
    total: int,
    size: tuple[int, int],
    at: int | None,
    center: tuple[float, float] | None,
    radius: float | None,
    radius_range: tuple[float, float],
    seed: int,
) -> Damage:
    h, w = size
    step = total // 2 if at is None else at
    if not 1 <= step < total:
        raise NcaError(f"--damage-at must be in [1, {total - 1}] (the run has {total} steps), got {step}")
    rng = np.random.default_rng(seed)
    if center is None:
        cy = (h - 1) / 2 + rng.uniform(-0.25, 0.25) * (h - 1)
        cx = (w - 1) / 2 + rng.uniform(-0.25, 0.25) * (w - 1)
        center = (float(cy), float(cx))
    elif not (0 <= center[0] < h and 0 <= center[1] < w):
        raise NcaError(f"--damage-center {center[0]:g},{center[1]:g} is outside the {h}x{w} grid (y,x)")
    if radius is None:
        lo, hi = radius_range
        radius = float(rng.uniform(lo, hi)) * (min(h, w) - 1) / 2
    if radius <= 0:
        raise NcaError(f"--damage-radius must be > 0, got {radius:g}")
    return Damage(step, center, float(radius))


def load_seed_source(
    payload: dict[str, Any],
    path: Path,
    device: str,
    steps: str | int | None,
    hidden: int,
    damage: bool,
    damage_opts: tuple[int | None, tuple[float, float] | None, float | None],
    seed: int,
) -> SeedSource:
    """A :class:`SeedSource` for a ``grow`` or ``digits`` checkpoint.

    Raises:
        NcaError: The checkpoint does not describe a valid model, or bad steps/damage options.
    """
    from ncatool.predict import generation_model
    from ncatool.train import select_device

    task = str(payload.get("task"))
    run = payload.get("config") or {}
    dev = select_device(device)
    model, seed_state = generation_model(payload, path, dev)
    nca = model if task == "grow" else model.nca
    x = seed_state[None] if task == "grow" else seed_state[None].repeat(10, 1, 1, 1)
    cond = None
    if task == "digits":
        with torch.no_grad():
            cond = model.embed(torch.arange(10, device=dev))
    parsed = parse_steps(steps, 1)
    base = _config_steps(run, task)
    explicit = parsed[0] if parsed is not None else None
    dmg = None
    at, center, radius = damage_opts
    if damage:
        if explicit is not None:
            total = explicit  # damage half-way unless --damage-at says otherwise
        elif at is None:
            total, at = 2 * base, base  # grow, then as many steps again to regrow
        else:
            total = at + base
        rr = run.get("damage_radius") or (0.1, 0.4)
        dmg = _resolve_damage(total, (x.shape[-2], x.shape[-1]), at, center, radius, (rr[0], rr[1]), seed)
    else:
        total = explicit if explicit is not None else base
    return SeedSource(nca, task, x, int(total), cond, hidden, dmg)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_source(
    checkpoint: str | Path,
    input_spec: str | Path | None = None,
    device: str = "auto",
    steps: str | int | None = None,
    view_opts: tuple[int | None, int | None, bool] = (None, None, False),
    hidden: int = 0,
    overlay: str = "mask",
    damage: bool = False,
    damage_opts: tuple[int | None, tuple[float, float] | None, float | None] = (None, None, None),
    seed: int = 0,
) -> Source:
    """Load a checkpoint and prepare what to animate, dispatching on its task.

    Raises:
        NcaError: Missing/corrupt checkpoint, unsupported task, options that do not apply.
    """
    from ncatool.console import warn
    from ncatool.train import load_checkpoint_file

    path = Path(checkpoint)
    payload = load_checkpoint_file(path, "cpu")
    task = payload.get("task")
    if task in ("seg2d", "seg3d"):
        if damage:
            raise NcaError(
                "--damage applies to growing checkpoints (tasks grow, digits), not to segmentation"
            )
        return load_seg_source(payload, path, input_spec, device, steps, view_opts, hidden, overlay)
    if task in ("grow", "digits"):
        if any(v is not None for v in view_opts[:2]) or view_opts[2]:
            raise NcaError(f"--axis, --slice and --montage apply to 3D segmentation, not to {task}")
        if input_spec is not None:
            warn(f"--input is not used for {task} checkpoints (they grow from a seed)")
        return load_seed_source(payload, path, device, steps, hidden, damage, damage_opts, seed)
    raise NcaError(f"animate does not support task {task!r} (supported: {', '.join(ANIMATABLE_TASKS)})", path)


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
) -> dict[str, Any]:
    """``ncatool animate``: render a checkpoint's NCA step by step.

    Args:
        checkpoint: A run's checkpoint (``seg2d``, ``seg3d``, ``grow`` or ``digits``).
        output: ``.gif`` or ``.mp4`` (written atomically); may be None when ``frames_dir`` is given.
        input_spec: Segmentation: the image to segment (see :func:`seg_record`).
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
        seed: Seed of the stochastic cell updates and of random damage.
        device: auto, cpu, cuda, cuda:N or mps.
        progress: Show a progress bar on stderr.

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
    damage = damage or damage_at is not None or damage_center is not None or damage_radius is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        source = load_source(
            checkpoint,
            input_spec,
            device,
            steps,
            (axis, slice_index, montage),
            hidden,
            overlay,
            damage,
            (damage_at, damage_center, damage_radius),
            seed,
        )
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
    "ANIMATABLE_TASKS",
    "Damage",
    "SeedSource",
    "SegSource",
    "Source",
    "animate",
    "check_hidden",
    "frame_steps",
    "load_seed_source",
    "load_seg_source",
    "load_source",
    "parse_steps",
    "render",
    "seg_record",
]
