"""Tiles → one picture, and the one PNG writer.

Every picture ncatool draws from tiles goes through :func:`tile_grid`: animation frames (panels of a
state, hidden channels, the ten digits), and the sample pictures that training writes for every task
(:func:`save_grid`). A :class:`GridStyle` holds the spacing and colours, so the two looks are named once:
:data:`FRAME` (dark, panels up to the edge) and :data:`SAMPLES` (white, with a border).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GridStyle:
    """How tiles are spaced and what shows between them.

    Attributes:
        gap: Pixels between neighbouring tiles (after scaling).
        margin: Pixels around the whole grid.
        background: RGB of the gaps, the margin and the unused part of a cell.
    """

    gap: int
    margin: int
    background: tuple[int, int, int]


#: Animation frames: dark gaps between panels, none around them (the header adds the top edge).
FRAME = GridStyle(gap=4, margin=0, background=(24, 24, 24))
#: Training sample pictures: white, with a thin border like the gaps.
SAMPLES = GridStyle(gap=2, margin=2, background=(255, 255, 255))

#: 2D segmentation and growing: the image and its hidden channels share rows of this many tiles.
TILES_PER_ROW_2D = 6
#: 3D segmentation: hidden-channel tiles per row.
HIDDEN_PER_ROW = 8


def upscale(tile: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``(H, W[, 3])`` by an integer factor → ``(H*s, W*s[, 3])``."""
    if scale == 1:
        return tile
    return np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)


def in_rows(tiles: Sequence[np.ndarray], cols: int) -> list[list[np.ndarray]]:
    """Tiles cut into rows of ``cols`` (at least 1; the last row may be shorter)."""
    cols = max(1, cols)
    return [list(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]


def tile_grid(rows: Sequence[Sequence[np.ndarray]], scale: int = 1, style: GridStyle = FRAME) -> np.ndarray:
    """Tiles placed row by row on the background.

    Each tile sits at the top left of its cell. A column is as wide as the widest tile of the grid, a
    row as tall as its tallest tile, so tiles of one size make a regular grid, and blocks of different
    sizes (a grid of panels above a row of hidden channels) stack left-aligned, one per row. Empty rows
    are skipped; rows may differ in length.

    Args:
        rows: Tiles ``(h, w, 3)`` (RGB) or ``(h, w)`` (gray) uint8.
        scale: Nearest-neighbour enlargement of every tile.
        style: Gap, margin and background.

    Returns:
        ``(H, W, 3)`` uint8: ``H = 2*margin + sum(row heights) + (rows - 1)*gap``, likewise ``W`` with
        the widest row's columns; ``(0, 0, 3)`` when there is no tile.
    """
    grid = [[_rgb(t) for t in row] for row in rows if len(row)]
    if not grid:
        return np.zeros((0, 0, 3), np.uint8)
    gap, margin = style.gap, style.margin
    col_w = max(t.shape[1] for row in grid for t in row) * scale
    row_h = [max(t.shape[0] for t in row) * scale for row in grid]
    ncol = max(len(row) for row in grid)
    height = 2 * margin + sum(row_h) + gap * (len(grid) - 1)
    width = 2 * margin + ncol * col_w + gap * (ncol - 1)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = style.background
    y = margin
    for row, h in zip(grid, row_h, strict=True):
        for j, tile in enumerate(row):
            t = upscale(tile, scale)
            x = margin + j * (col_w + gap)
            canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
        y += h + gap
    return canvas


def _rgb(tile: np.ndarray) -> np.ndarray:
    """``(h, w)`` gray → ``(h, w, 3)``; RGB unchanged."""
    return tile if tile.ndim == 3 else np.repeat(tile[..., None], 3, axis=-1)


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write ``(H, W, 3)`` uint8 as a PNG, atomically (a temporary name, then a rename).

    The folder is created if needed. Returns ``path``.
    """
    from PIL import Image

    from ncatool.data.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def save_grid(
    rows: Sequence[Sequence[np.ndarray]], path: str | Path, scale: int = 1, style: GridStyle = SAMPLES
) -> Path | None:
    """:func:`tile_grid` written with :func:`write_png`; nothing is written (None) without a tile."""
    canvas = tile_grid(rows, scale, style)
    return write_png(canvas, path) if canvas.size else None


__all__ = [
    "FRAME",
    "HIDDEN_PER_ROW",
    "SAMPLES",
    "TILES_PER_ROW_2D",
    "GridStyle",
    "in_rows",
    "save_grid",
    "tile_grid",
    "upscale",
    "write_png",
]
