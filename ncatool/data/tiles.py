"""Cutting images into spatially separate tiles (``ncatool prepare --tile``).

A single large image (a 512×512 microscopy field, one brain template) is one case; to train on one
part and test on another, ``prepare --tile`` cuts every case into tiles that become cases of their
own. Each tile keeps its true position: its origin is the physical position of its first voxel, so
tiles overlay the source image exactly in any viewer, and ``tiles.json`` records where each came from.

Tile sizes are given in array order (``rows,cols`` in 2D; ``slices,rows,cols`` in 3D, where slices
run along the last NIfTI axis — axial for RAS/LPS volumes). An axis of length ``n`` asked for tiles
of ``t`` voxels is cut into ``max(1, round(n / t))`` near-equal tiles, so no voxel is dropped and no
tile is a sliver; ``0`` keeps the whole axis.
"""

from __future__ import annotations

import itertools

import numpy as np

from ncatool.data.io import Image
from ncatool.errors import NcaError


def parse_tile_spec(text: str | None) -> tuple[int, ...] | None:
    """Parse ``"128"`` or ``"10,0,0"`` into tile sizes.

    Args:
        text: Comma-separated non-negative integers, or None.

    Returns:
        The sizes, or None for no tiling.

    Raises:
        NcaError: Not integers, negative, or all zero.
    """
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise NcaError(
            f"--tile must be comma-separated integers such as 128 or 10,0,0, got {text!r}"
        ) from None
    if any(s < 0 for s in sizes) or not any(sizes):
        raise NcaError(f"--tile sizes must be >= 0 and not all 0, got {text!r}")
    return sizes


def axis_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """Near-equal ``[start, stop)`` ranges covering ``range(length)``.

    Args:
        length: Axis length in voxels.
        size: Wanted tile length; 0 keeps the whole axis.

    Returns:
        ``max(1, round(length / size))`` ranges (one for ``size == 0``).
    """
    count = 1 if size == 0 else max(1, int(np.floor(length / size + 0.5)))
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def tile_slices(shape: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The tiles of an array of ``shape``, in C order (last axis fastest).

    Args:
        shape: Spatial shape in array order.
        sizes: One size for every axis, or one size per axis (0 = whole axis).

    Returns:
        One tuple of slices per tile.

    Raises:
        NcaError: ``sizes`` has neither 1 nor ``len(shape)`` entries.
    """
    if len(sizes) == 1:
        sizes = sizes * len(shape)
    if len(sizes) != len(shape):
        raise NcaError(
            f"--tile gives {len(sizes)} sizes but the images are {len(shape)}D "
            f"(give 1 or {len(shape)} sizes, in array order)"
        )
    per_axis = [axis_bounds(n, s) for n, s in zip(shape, sizes, strict=True)]
    return [tuple(slice(*bounds) for bounds in combo) for combo in itertools.product(*per_axis)]


def crop_image(image: Image, region: tuple[slice, ...]) -> Image:
    """The part of ``image`` inside ``region``, with the origin moved to the region's first voxel.

    Args:
        image: Source image; array ``(Z, Y, X)`` or ``(Y, X)`` (+ components).
        region: One slice with explicit start per spatial axis, in array order.

    Returns:
        A new image whose voxels sit at the same physical positions as in ``image``.
    """
    start_xyz = np.array([s.start for s in region][::-1], dtype=np.float64)
    direction = np.asarray(image.direction, dtype=np.float64).reshape(image.ndim, image.ndim)
    offset = direction @ (start_xyz * np.asarray(image.spacing, dtype=np.float64))
    return Image(
        array=np.ascontiguousarray(image.array[region]),
        spacing=image.spacing,
        origin=tuple(float(o) for o in np.asarray(image.origin) + offset),
        direction=image.direction,
        is_vector=image.is_vector,
    )


def tile_name(case: str, index: int) -> str:
    """Case identifier of tile ``index`` of ``case``: ``CASE_t000``."""
    return f"{case}_t{index:03d}"
