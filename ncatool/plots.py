"""The segmentation sample picture that training writes: image | ground truth | prediction per case.

Drawn with :mod:`ncatool.viz` in the colours of ``ncatool animate`` (labels over the gray image at
opacity 0.5), so a sample picture's prediction looks like the last frame of the animation. A 3D case
gets one row per plane (axial, coronal, sagittal), each through the foreground and titled, as the
animation's panels are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncatool.viz.colour import channels_to_rgb, overlay_labels, window
from ncatool.viz.grid import SAMPLES, save_grid, upscale
from ncatool.viz.text import titled
from ncatool.viz.volume import VolumeView, foreground_slices, take_slice

#: Tiles are enlarged (nearest) to about this many pixels on their longer side.
SAMPLE_SIDE = 128
#: Title colour on the white sample picture.
TITLE_COLOUR = (40, 40, 40)


def best_slice(label: torch.Tensor) -> int:
    """Index along axis 0 of a ``(D, H, W)`` label with the most foreground (the middle if empty)."""
    return foreground_slices(label.cpu().numpy())[0]


def _tiles(pixels: np.ndarray, label: np.ndarray, pred: np.ndarray, lo: float, hi: float) -> list[np.ndarray]:
    base = channels_to_rgb(pixels, lo, hi)
    return [base, overlay_labels(base, label), overlay_labels(base, pred)]


def _window(pixels: np.ndarray) -> tuple[float, float]:
    return window(pixels[:3] if pixels.shape[0] == 3 else pixels[0])


def segmentation_row(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> list[np.ndarray]:
    """Three tiles ``(H, W, 3)`` uint8 for one 2D case: the image, the reference and the prediction.

    Args:
        image: ``(C, H, W)``; three channels are shown as RGB, otherwise channel 0 as gray, from the
            1st to the 99th percentile.
        label: ``(H, W)`` reference labels.
        pred: ``(H, W)`` predicted labels.
    """
    pixels = image.detach().float().cpu().numpy()
    return _tiles(pixels, label.cpu().numpy(), pred.cpu().numpy(), *_window(pixels))


def segmentation_rows(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor
) -> list[tuple[str | None, list[np.ndarray]]]:
    """``(title, [image, reference, prediction] tiles)`` rows of one case, 2D or 3D.

    2D: one row without a title. 3D (``(C, D, H, W)``, ``(D, H, W)``, ``(D, H, W)``): one row per
    plane, axial, coronal, sagittal (array axes 0, 1, 2), each the slice with the most foreground of
    the reference, or of the prediction when the reference is empty; titled e.g. ``axial 12``.
    """
    if label.dim() == 2:
        return [(None, segmentation_row(image, label, pred))]
    pixels = image.detach().float().cpu().numpy()
    ref, out = label.cpu().numpy(), pred.cpu().numpy()
    lo, hi = _window(pixels)
    view = VolumeView(through=foreground_slices(ref if ref.any() else out))
    shape = ref.shape
    return [
        (name, _tiles(take_slice(pixels, a, i), take_slice(ref, a, i), take_slice(out, a, i), lo, hi))
        for (a, i), name in zip(view.slices(shape), view.names(shape), strict=True)
    ]


def save_segmentation_panel(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path
) -> None:
    """Write image | ground truth | prediction, one row per case (3D: per case and plane), as a PNG
    (atomically).

    Args:
        rows: ``(image (C, *S), label (*S), prediction (*S))`` per case, 2D or 3D.
        path: Destination PNG; nothing is written without a row.
    """
    titled_rows = [row for case in rows for row in segmentation_rows(*case)]
    if not titled_rows:
        return
    side = max(max(t.shape[:2]) for _, tiles in titled_rows for t in tiles)
    scale = max(1, SAMPLE_SIDE // side)
    grid = []
    for title, tiles in titled_rows:
        big = [upscale(t, scale) for t in tiles]
        if title is not None:  # titled after enlarging, so the text stays sharp
            names = (title, "reference", "prediction")
            big = [titled(t, n, SAMPLES.background, TITLE_COLOUR) for t, n in zip(big, names, strict=True)]
        grid.append(big)
    save_grid(grid, path)
