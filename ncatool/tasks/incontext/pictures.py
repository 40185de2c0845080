"""The training sample picture of ``incontext``: per episode, two context pairs, then the query, its
reference and the prediction, in the colours of the segmentation samples (:mod:`ncatool.plots`).
A 3D episode shows each image's axial slice through its mask's foreground."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncatool.plots import SAMPLE_SIDE
from ncatool.tasks.incontext.episodes import Episode, LoadedDataset
from ncatool.viz.colour import channels_to_rgb, overlay_labels, window
from ncatool.viz.grid import save_grid, upscale

#: Context pairs shown per episode.
SHOWN_CONTEXT = 2


def _axial(like: torch.Tensor) -> int | None:
    """A volume's axial slice with the most foreground of ``like`` (None for 2D)."""
    labels = like.numpy()
    if labels.ndim != 3:
        return None
    return int(labels.reshape(labels.shape[0], -1).sum(1).argmax()) if labels.any() else labels.shape[0] // 2


def _tile(image: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    """The image with ``mask`` overlaid, 2D, or a volume's slice chosen by ``like``."""
    z = _axial(like)
    pixels = image.float().numpy() if z is None else image[:, z].float().numpy()
    rgb = channels_to_rgb(pixels, *window(pixels[:3] if pixels.shape[0] == 3 else pixels[0]))
    if mask is None:
        return rgb
    plane = mask.numpy() if z is None else mask[z].numpy()
    return overlay_labels(rgb, plane.astype(np.int64))


def save_episode_panel(
    datasets: Sequence[LoadedDataset], episodes: Sequence[Episode], preds: Sequence[torch.Tensor], path: Path
) -> None:
    """Write the picture (atomically); ``preds[i]`` is episode ``i``'s ``(1, *S)`` binary prediction."""
    rows = []
    for ep, pred in zip(episodes, preds, strict=True):
        ds = datasets[ep.task.dataset]
        tiles = []
        for c in ep.context[:SHOWN_CONTEXT]:
            mask = ds.mask(c, ep.task.labels)
            tiles.append(_tile(ds.images[c], mask, mask))
        ref = ds.mask(ep.query, ep.task.labels)
        image = ds.images[ep.query]
        tiles += [_tile(image, None, ref), _tile(image, ref, ref), _tile(image, pred[0].float(), ref)]
        rows.append(tiles)
    side = max(max(t.shape[:2]) for row in rows for t in row)
    scale = max(1, SAMPLE_SIDE // 2 // side)
    save_grid([[upscale(t, scale) for t in row] for row in rows], path)
