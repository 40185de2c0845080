"""Segmentation at work, step by step: the input with the predicted mask overlaid as it evolves.

The input image is preprocessed exactly as in training (:meth:`SegmentationRunner.load`), drawn in
grayscale, and the predicted mask overlaid: ``overlay="mask"`` colours voxels whose highest
foreground probability (sigmoid of the logit channels) exceeds 0.5, ``overlay="prob"`` tints every
voxel with the colour of its most likely label at an opacity proportional to that probability. Every
level of a multi-level model is shown in sequence; coarse levels are upsampled (nearest) to the full
size so every frame has the same size. 3D: three orthogonal slices, each titled with its plane
(axial, coronal, sagittal: array axes 0, 1, 2; the last two with the first array axis pointing up),
or one ``axis``/``slice_index``, or a ``montage`` of up to 16 evenly spaced slices along ``axis``.
``seg2d`` on a volume animates one slice along ``axis`` or the run's ``slice_axis``.

Where no ``slice_index`` is given the slices go through the foreground: the model runs once before
the animation, seeded as the animation is, and each axis shows the slice with the most voxels of
that final predicted mask (:func:`ncatool.viz.volume.foreground_slices`; the middle one when the
mask is empty), so the panels show the object rather than the volume's centre. For ``seg2d`` on a
volume that first run is :meth:`SegmentationRunner.predict_case` over all slices.

The states come from :meth:`ncatool.models.segmentation.SegmentationNCA.states`, the model's own
inference step by step, so the last frame shows the mask ``ncatool predict`` writes for the same seed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ncatool.animate import StepCallback, check_hidden, parse_steps
from ncatool.errors import NcaError
from ncatool.runtime import AnimateRequest
from ncatool.viz.colour import OVERLAYS, gray_to_rgb, hidden_tiles, overlay_probs, window
from ncatool.viz.grid import HIDDEN_PER_ROW, TILES_PER_ROW_2D, in_rows, tile_grid, upscale
from ncatool.viz.text import titled
from ncatool.viz.volume import AXIS_NAMES, VolumeView, foreground_slices, take_slice

if TYPE_CHECKING:
    from ncatool.tasks.segmentation.runner import SegmentationRunner


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
        steps: Steps per level (None = the model's).
    """

    model: Any
    task: str
    image: torch.Tensor
    view: VolumeView = field(default_factory=VolumeView)
    hidden: int = 0
    overlay: str = "mask"
    info: dict[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] | None = None  # per level; None = the model's

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        self.steps = tuple(int(s) for s in (self.steps or cfg.steps))
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

    def panel_names(self) -> list[str]:
        """3D: each panel's plane and slice number in the input's voxels (as ``--slice`` takes them)."""
        return panel_names(self.view, self.full_size, self.info)

    def label(self, step: int) -> str:
        text = f"step {step}/{self.total_steps}"
        if len(self.steps) > 1:
            text += f" | level {self.level_of(step) + 1}/{len(self.steps)}"
        return text

    def run(self, on_step: StepCallback) -> None:
        """Every step of every level, numbered across levels (a level's start is the previous end)."""
        count = 0
        with torch.no_grad():
            for level, step, state in self.model.states(self.image, steps=self.steps):
                if step == 0 and level > 0:
                    continue  # the same picture as the previous level's last state
                count += step > 0
                on_step(count, state, level)

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
        panels = self.view.slices(self.full_size)
        tiles = [
            titled(
                upscale(
                    overlay_probs(
                        gray_to_rgb(take_slice(self.gray, a, i), self.lo, self.hi),
                        take_slice(probs, a, i),
                        self.overlay,
                    ),
                    scale,
                ),
                name,
            )
            for (a, i), name in zip(panels, self.panel_names(), strict=True)
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
            "view": None if self.dim == 2 else {k: getattr(self.view, k) for k in ("mode", "axis", "index")},
            "panels": None if self.dim == 2 else self.panel_names(),
        }


def panel_names(view: VolumeView, full_size: tuple[int, ...], info: dict[str, Any]) -> list[str]:
    """3D: each panel's plane and slice number in the input's voxels (``info["input_shape"]``), as
    ``--slice`` takes them (the segmentation and in-context sources)."""
    shape = info.get("input_shape")
    return view.names(full_size, shape if shape and len(shape) == 3 else None)


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


def load_seg_source(runner: SegmentationRunner, request: AnimateRequest) -> SegSource:
    """A :class:`SegSource` for a segmentation runner and the request's input image.

    Raises:
        NcaError: Missing input, input that does not fit the model, bad view options.
    """
    from ncatool.data.transforms import resize_image

    request.refuse(runner.task, "context", "context_size", "labels")
    request.refuse(runner.task, "damage", "damage_at", "damage_center", "damage_radius")
    if request.input is None:
        raise NcaError(f"--input is required to animate a {runner.task} checkpoint (an image to segment)")
    if request.overlay not in OVERLAYS:
        raise NcaError(f"--overlay must be one of {', '.join(OVERLAYS)}, got {request.overlay!r}")
    record = seg_record(request.input)
    model = runner.model
    per_level = parse_steps(request.steps, model.cfg.levels)
    data = runner.load(record)
    image = data.image
    axis, index, montage = request.axis, request.slice_index, request.montage
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
            a = runner.config.slice_axis if axis is None else axis
            if a not in (0, 1, 2):
                raise NcaError(f"--axis must be 0, 1 or 2 (array axes of the volume), got {a}")
            n = image.shape[a + 1]
            i = _predicted_slices(runner, data, request.seed)[a] if index is None else index
            _check_index(i, n, a, first)
            image = np.take(image, i, axis=a + 1)
            info["slice"] = {"axis": a, "plane": AXIS_NAMES[a], "index": i}
        elif axis is not None or index is not None or montage:
            raise NcaError("--axis, --slice and --montage apply to volumes; the input is a 2D image", first)
    else:
        view = _view(axis, index, montage)
        if view.mode == "slice" and view.index is not None:
            _check_index(view.index, image.shape[view.axis + 1], view.axis, first)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(runner.device)
    if runner.target_size is not None:
        x = resize_image(x, runner.target_size)
    if view.mode == "slice" and view.index is not None:
        # the index is in input voxels: map it to the resized volume
        n_in, n_out = image.shape[view.axis + 1], x.shape[2 + view.axis]
        view = replace(view, index=min(n_out - 1, int(view.index * n_out / n_in)))
    elif model.cfg.dim == 3 and view.mode != "montage":
        view = replace(view, through=_final_mask_slices(model, x, per_level, request.seed))
    return SegSource(model, runner.task, x, view, request.hidden, request.overlay, info, per_level)


def _final_mask_slices(
    model: Any, x: torch.Tensor, steps: tuple[int, ...] | None, seed: int
) -> tuple[int, int, int]:
    """:func:`foreground_slices` of the mask the animation of ``x`` ``(1, C, D, H, W)`` ends with: the
    model runs once, seeded as the animation is, leaving the random state as it was."""
    cfg = model.cfg
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        _, _, state = deque(model.states(x, steps=steps), maxlen=1)[0]  # the last state only
    logits = state[0, cfg.in_channels : cfg.in_channels + cfg.n_out].float()
    return foreground_slices((logits > 0).any(dim=0).cpu().numpy())


def _predicted_slices(runner: SegmentationRunner, data: Any, seed: int) -> tuple[int, int, int]:
    """:func:`foreground_slices` of a seg2d model's mask of a whole volume (every slice segmented)."""
    with torch.random.fork_rng(devices=[runner.device] if runner.device.type == "cuda" else []):
        labels = runner.predict_case(data, seed=seed).labels
    return foreground_slices(labels)
