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
scaled per frame and channel by the largest magnitude): a row below the main panels (a 2D slice for
3D models), or for digits one row per channel under the ten classes.

Frames: one for the initial state (step 0), one after every ``every``-th step, one after the last
step, and (with damage) one right after the damage: :func:`frame_steps`. Without damage there are
``1 + ceil(total_steps / every)`` frames. Each frame carries a header with the step number.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ncatool.errors import NcaError

#: Output formats by extension.
FORMATS: tuple[str, ...] = (".gif", ".mp4")
#: Overlay modes for segmentation.
OVERLAYS: tuple[str, ...] = ("mask", "prob")
#: Tasks this module can animate.
ANIMATABLE_TASKS: tuple[str, ...] = ("seg2d", "seg3d", "grow", "digits")
#: At most this many slices in a 3D montage.
MONTAGE_MAX = 16
#: Hidden-channel tiles per row (segmentation and growing).
HIDDEN_PER_ROW = 8
#: 2D segmentation and growing: the image and its hidden channels share rows of this many tiles.
TILES_PER_ROW_2D = 6
#: Header font size (Pillow's default font; a fixed bitmap font where FreeType is missing).
FONT_SIZE = 14
#: Colours of labels 1, 2, ... (repeated beyond).
LABEL_COLOURS = np.array(
    [[255, 48, 48], [48, 220, 48], [64, 128, 255], [255, 220, 0], [0, 230, 230], [230, 60, 230]],
    dtype=np.float32,
)
GAP = 4  # pixels between panels (after scaling)
BACKGROUND = (24, 24, 24)
HEADER_TEXT = (240, 240, 240)
MASK_ALPHA = 0.5
PROB_ALPHA = 0.7


# --------------------------------------------------------------------------------------------------
# Frame schedule and output checks
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


def output_format(path: str | Path) -> str:
    """``gif`` or ``mp4`` for an output path; checks ffmpeg for MP4.

    Raises:
        NcaError: Unknown extension, or MP4 without ffmpeg on the PATH.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        shown = ext or "no extension"
        raise NcaError(f"unsupported animation format ({shown}); use .gif or .mp4", path)
    if ext == ".mp4" and shutil.which("ffmpeg") is None:
        raise NcaError("writing .mp4 needs ffmpeg on the PATH, which was not found; use .gif instead", path)
    return ext[1:]


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def gray_to_rgb(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Intensities ``(H, W)`` mapped from ``[lo, hi]`` to uint8 gray ``(H, W, 3)``."""
    span = hi - lo if hi > lo else 1.0
    g = np.clip((image.astype(np.float32) - lo) / span, 0.0, 1.0) * 255.0
    return np.repeat((g + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def overlay_probs(gray: np.ndarray, probs: np.ndarray, mode: str = "mask") -> np.ndarray:
    """Overlay per-label probabilities on an RGB image.

    Args:
        gray: ``(H, W, 3)`` uint8 background.
        probs: ``(n_out, H, W)`` probabilities of labels ``1..n_out``.
        mode: ``mask`` (colour where the highest probability > 0.5, opacity 0.5) or ``prob`` (colour
            of the most likely label at opacity ``0.7 * probability``).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    best = probs.max(axis=0)
    idx = probs.argmax(axis=0)
    colour = LABEL_COLOURS[idx % len(LABEL_COLOURS)]
    if mode == "mask":
        alpha = np.where(best > 0.5, MASK_ALPHA, 0.0).astype(np.float32)
    else:
        alpha = (PROB_ALPHA * np.clip(best, 0.0, 1.0)).astype(np.float32)
    out = gray.astype(np.float32) * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return (out + 0.5).clip(0, 255).astype(np.uint8)


def diverging(channel: np.ndarray) -> np.ndarray:
    """One hidden channel ``(H, W)`` → blue (negative) / white (0) / red (positive), uint8 RGB.

    Values are divided by the 99th percentile of their magnitude (per call; the largest magnitude
    when that is 0) and clipped, so one extreme cell (e.g. the seed) does not wash out the rest.
    """
    v = channel.astype(np.float32)
    mag = np.abs(v)
    peak = float(np.percentile(mag, 99.0)) if v.size else 0.0
    if peak <= 0 and v.size:
        peak = float(mag.max())
    v = v / peak if peak > 0 else np.zeros_like(v)
    pos, neg = np.clip(v, 0.0, 1.0), np.clip(-v, 0.0, 1.0)
    rgb = np.stack([1.0 - neg, 1.0 - pos - neg, 1.0 - pos], axis=-1)
    return (rgb.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def upscale(tile: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``(H, W, 3)`` by an integer factor."""
    if scale == 1:
        return tile
    return np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)


def grid(tiles: Sequence[np.ndarray], cols: int, gap: int = GAP) -> np.ndarray:
    """Tiles ``(h, W, 3)`` placed row by row on the background, each cell as large as the largest."""
    if not tiles:
        return np.zeros((0, 0, 3), np.uint8)
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    canvas = np.empty((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), np.uint8)
    canvas[:] = BACKGROUND
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (th + gap), c * (tw + gap)
        canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return canvas


def stack_rows(parts: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Blocks stacked vertically, left-aligned, on the background."""
    parts = [p for p in parts if p.size]
    width = max(p.shape[1] for p in parts)
    height = sum(p.shape[0] for p in parts) + gap * (len(parts) - 1)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    y = 0
    for p in parts:
        canvas[y : y + p.shape[0], : p.shape[1]] = p
        y += p.shape[0] + gap
    return canvas


class FrameComposer:
    """Puts a header line with the step label above the rendered panels.

    The frame width is fixed from the start (wide enough for the body and every label), so every
    frame of an animation has the same size.

    Args:
        labels: Every label that will be drawn (to size the header).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        from PIL import ImageFont

        try:
            self.font: Any = ImageFont.load_default(size=FONT_SIZE)
        except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
            self.font = ImageFont.load_default()
        boxes = [self._bbox(text) for text in [*labels, "Ag0"]]
        self.text_w = max(b[2] - min(b[0], 0) for b in boxes) + 8
        self.header_h = max(b[3] for b in boxes) + 6
        self.size: tuple[int, int] | None = None  # (height, width) once the first frame is made

    def _bbox(self, text: str) -> tuple[int, int, int, int]:
        from PIL import Image, ImageDraw

        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=self.font)
        return int(left), int(top), math.ceil(right), math.ceil(bottom)

    def compose(self, body: np.ndarray, label: str) -> np.ndarray:
        """``(H, W, 3)`` body → ``(header + H, max(W, text), 3)`` uint8 frame."""
        from PIL import Image, ImageDraw

        if self.size is None:
            self.size = (self.header_h + body.shape[0], max(body.shape[1], self.text_w))
        h, w = self.size
        canvas = np.empty((h, w, 3), np.uint8)
        canvas[:] = BACKGROUND
        bh, bw = min(body.shape[0], h - self.header_h), min(body.shape[1], w)
        canvas[self.header_h : self.header_h + bh, :bw] = body[:bh, :bw]
        img = Image.fromarray(canvas)
        ImageDraw.Draw(img).text((4, 3), label, fill=HEADER_TEXT, font=self.font)
        return np.asarray(img)


# --------------------------------------------------------------------------------------------------
# 3D views
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeView:
    """Which 2D slices of a volume ``(..., D, H, W)`` are shown.

    Attributes:
        mode: ``ortho`` (the central slice along each axis), ``slice`` (one slice) or ``montage``.
        axis: Array axis (0, 1, 2) for ``slice`` and ``montage``.
        index: Slice number for ``slice`` (None = middle).
    """

    mode: str = "ortho"
    axis: int = 0
    index: int | None = None

    def slices(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(axis, index)`` of every panel for a volume of spatial ``shape``."""
        if self.mode == "ortho":
            return [(a, shape[a] // 2) for a in range(3)]
        n = shape[self.axis]
        if self.mode == "slice":
            return [(self.axis, n // 2 if self.index is None else self.index)]
        count = min(MONTAGE_MAX, n)
        picks = sorted({round((i + 0.5) * n / count - 0.5) for i in range(count)})
        return [(self.axis, i) for i in picks]

    def hidden_slice(self, shape: Sequence[int]) -> tuple[int, int]:
        """The one slice hidden channels are shown for."""
        if self.mode == "slice":
            return self.slices(shape)[0]
        axis = 0 if self.mode == "ortho" else self.axis
        return axis, shape[axis] // 2


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``(..., D, H, W)`` at ``index`` along spatial ``axis`` → ``(..., a, b)``.

    Slices along axes 1 and 2 are flipped vertically so that the first array axis points up.
    """
    lead = volume.ndim - 3
    out = np.take(volume, index, axis=lead + axis)
    return out[..., ::-1, :] if axis > 0 else out


# --------------------------------------------------------------------------------------------------
# Sources: run a model and render its states
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


def _check_hidden(hidden: int, available: int, task: str) -> None:
    if hidden < 0:
        raise NcaError(f"--hidden must be >= 0, got {hidden}")
    if hidden > available:
        raise NcaError(f"--hidden {hidden}: the {task} model has only {available} hidden channels")


def _hidden_row(hidden: np.ndarray, scale: int) -> list[np.ndarray]:
    return [upscale(diverging(ch), scale) for ch in hidden]


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
        _check_hidden(self.hidden, cfg.channels - cfg.in_channels - cfg.n_out, self.task)
        self.full_size = tuple(int(s) for s in self.image.shape[2:])
        shown = self.image[0, 0].float().cpu().numpy()
        self.gray = shown
        self.lo, self.hi = (float(v) for v in np.percentile(shown, [1.0, 99.0]))
        if self.hi <= self.lo:
            self.lo, self.hi = float(shown.min()), float(shown.max())
        bounds = np.cumsum((0, *self.steps))
        self._bounds = bounds

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
                tiles += _hidden_row(hidden, scale)
            return grid(tiles, TILES_PER_ROW_2D)
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
        cols = len(tiles) if self.view.mode != "montage" else math.ceil(math.sqrt(len(tiles)))
        parts = [grid(tiles, cols)]
        if hidden is not None:  # one slice of each hidden channel, in a row below
            hid = take_slice(hidden, *self.view.hidden_slice(self.full_size))
            parts.append(grid(_hidden_row(hid, scale), HIDDEN_PER_ROW))
        return stack_rows(parts)

    def base_size(self) -> tuple[int, int]:
        if self.dim == 2:
            side = max(self.full_size)
            return side, min(1 + self.hidden, TILES_PER_ROW_2D) * self.full_size[1]
        panels = self.view.slices(self.full_size)
        shapes = [tuple(s for j, s in enumerate(self.full_size) if j != a) for a, _ in panels]
        side = max(max(s) for s in shapes)
        cols = len(shapes) if self.view.mode != "montage" else math.ceil(math.sqrt(len(shapes)))
        return side, cols * max(s[1] for s in shapes)

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "model_size": list(self.full_size),
            "steps_per_level": list(self.steps),
            "overlay": self.overlay,
            "view": None if self.dim == 2 else self.view.__dict__,
        }


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
        _check_hidden(self.hidden, self.seed_state.shape[1] - self.first_hidden, self.task)

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
            from ncatool.tasks.growing import rgba_to_rgb

            tiles = [upscale(rgba_to_rgb(s[0, :4]), scale)]
            if self.hidden:
                tiles += _hidden_row(s[0, k0 : k0 + self.hidden].numpy(), scale)
            return grid(tiles, TILES_PER_ROW_2D)
        digits = s[:, 0].clamp(0.0, 1.0).numpy()
        tiles = [upscale(gray_to_rgb(d, 0.0, 1.0), scale) for d in digits]
        for k in range(self.hidden):
            tiles += [upscale(diverging(s[b, k0 + k].numpy()), scale) for b in range(s.shape[0])]
        return grid(tiles, s.shape[0])

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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


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


def seg_record(spec: str | Path) -> Any:
    """The case of ``--input``: one image file (``CASE_0000`` brings its sibling channel files), a
    comma-separated list of channel files, or an nnU-Net case prefix (``imagesTs/CASE``).

    Raises:
        NcaError: Missing files, or a folder.
    """
    from ncatool.data.datasets import CaseRecord
    from ncatool.data.io import is_image_file, split_extension
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
    from ncatool.data.datasets import resize_image
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


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


class _Writer(Protocol):
    def add(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class GifWriter:
    """Collects frames; :meth:`close` writes an endlessly looping GIF (Pillow)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.duration = max(10, round(1000.0 / fps))
        self.frames: list[Any] = []

    def add(self, frame: np.ndarray) -> None:
        from PIL import Image

        self.frames.append(Image.fromarray(frame))

    def close(self) -> None:
        if not self.frames:
            return
        first, *rest = self.frames
        first.save(self.path, format="GIF", save_all=True, append_images=rest, duration=self.duration, loop=0)

    def abort(self) -> None:
        self.frames.clear()


class Mp4Writer:
    """Pipes raw RGB frames into ``ffmpeg`` (H.264/yuv420p where available, even frame size)."""

    def __init__(self, path: Path, fps: float, ffmpeg: str) -> None:
        self.path = path
        self.fps = fps
        self.ffmpeg = ffmpeg
        self.proc: subprocess.Popen[bytes] | None = None
        self.size: tuple[int, int] | None = None

    def _start(self, height: int, width: int) -> None:
        cmd = [
            self.ffmpeg,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            f"{self.fps:g}",
            "-i",
            "-",
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            str(self.path),
        ]
        self.size = (height, width)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def add(self, frame: np.ndarray) -> None:
        if self.proc is None:
            self._start(frame.shape[0], frame.shape[1])
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        except BrokenPipeError:
            self._fail()

    def _fail(self) -> None:
        assert self.proc is not None
        _, stderr = self.proc.communicate()
        message = stderr.decode(errors="replace").strip().splitlines()
        tail = message[-1] if message else f"exit code {self.proc.returncode}"
        raise NcaError(f"ffmpeg failed: {tail}", self.path)

    def close(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait()
        if self.proc.returncode != 0:
            self._fail()

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PngFramesWriter:
    """Writes ``frame_00000.png``, ... (each atomically) into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, frame: np.ndarray) -> None:
        from PIL import Image

        from ncatool.data.io import atomic_path

        with atomic_path(self.folder / f"frame_{self.count:05d}.png") as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        self.count += 1

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (nothing when disabled); yields ``advance()``."""
    if not enabled or os.environ.get("NCATOOL_NO_PROGRESS") is not None:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ncatool.console import err

    with Progress(
        TextColumn("[bold]rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err
    ) as bar:
        task_id = bar.add_task("rendering", total=total)
        yield lambda: bar.advance(task_id)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def auto_scale(source: Source) -> int:
    """A nearest-neighbour factor that makes tiles about 256 px (at most 16x, body <= ~1024 px)."""
    side, width = source.base_size()
    return int(max(1, min(16, 256 // max(side, 1), 1024 // max(width, 1))))


def render(
    source: Source,
    writers: Sequence[_Writer],
    every: int = 1,
    scale: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the source and feed every scheduled frame to the writers.

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

    with _progress(total + 1, progress) as advance:

        def on_step(step: int, state: torch.Tensor, level: int) -> None:
            nonlocal written
            if step in wanted:
                frame = composer.compose(source.render(state, level, factor), source.label(step))
                for w in writers:
                    w.add(frame)
                written += 1
            advance()

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
        writers: list[Any] = []
        if output is not None:
            out = Path(output)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_path(out))
            if fmt == "mp4":
                writers.append(Mp4Writer(tmp, fps, shutil.which("ffmpeg") or "ffmpeg"))
            else:
                writers.append(GifWriter(tmp, fps))
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
    "FORMATS",
    "OVERLAYS",
    "Damage",
    "FrameComposer",
    "SeedSource",
    "SegSource",
    "VolumeView",
    "animate",
    "diverging",
    "frame_steps",
    "load_source",
    "output_format",
    "overlay_probs",
    "parse_steps",
    "render",
    "seg_record",
]
