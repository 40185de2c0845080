"""The segmentation sample picture that training writes: image | ground truth | prediction per case.

Drawn with :mod:`ncatool.viz` in the colours of ``ncatool animate`` (labels over the gray image at
opacity 0.5), so a sample picture's prediction looks like the last frame of the animation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncatool.viz.colour import channels_to_rgb, overlay_labels, window
from ncatool.viz.grid import save_grid

#: Tiles are enlarged (nearest) to about this many pixels on their longer side.
SAMPLE_SIDE = 128


def best_slice(label: torch.Tensor) -> int:
    """Index along axis 0 of a ``(D, H, W)`` label with the most foreground (the middle if empty)."""
    counts = (label > 0).flatten(1).sum(1)
    return int(counts.argmax()) if counts.max() > 0 else label.shape[0] // 2


def to_2d(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reduce a 3D triple (``(C, D, H, W)``, ``(D, H, W)``, ``(D, H, W)``) to its most telling slice."""
    if label.dim() == 2:
        return image, label, pred
    z = best_slice(label)
    return image[:, z], label[z], pred[z]


def segmentation_row(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> list[np.ndarray]:
    """Three tiles ``(H, W, 3)`` uint8 for one case: the image, the reference and the prediction.

    Args:
        image: ``(C, *S)``; three channels are shown as RGB, otherwise channel 0 as gray, from the
            1st to the 99th percentile.
        label: ``(*S)`` reference labels.
        pred: ``(*S)`` predicted labels.

    2D or 3D (3D: the slice with the most reference foreground).
    """
    image, label, pred = to_2d(image, label, pred)
    pixels = image.detach().float().cpu().numpy()
    lo, hi = window(pixels[:3] if pixels.shape[0] == 3 else pixels[0])
    base = channels_to_rgb(pixels, lo, hi)
    return [base, overlay_labels(base, label.cpu().numpy()), overlay_labels(base, pred.cpu().numpy())]


def save_segmentation_panel(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path
) -> None:
    """Write image | ground truth | prediction, one row per case, as a PNG (atomically).

    Args:
        rows: ``(image (C, *S), label (*S), prediction (*S))`` per case, 2D or 3D.
        path: Destination PNG; nothing is written without a row.
    """
    tiles = [segmentation_row(*row) for row in rows]
    if not tiles:
        return
    side = max(max(t.shape[:2]) for row in tiles for t in row)
    save_grid(tiles, path, scale=max(1, SAMPLE_SIDE // side))
