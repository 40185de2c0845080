"""Which 2D slices of a 3D volume are shown, and how a slice is cut, turned and named for display.

Panels are named after the anatomical plane of their array axis: ncatool reads volumes in
SimpleITK's array order ``(z, y, x)``, so for a volume stored in the usual orientation axis 0 cuts
axial, axis 1 coronal and axis 2 sagittal planes. By default the panels go through the foreground
(:func:`foreground_slices`): the slice of each axis holding the most foreground voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: At most this many slices in a montage.
MONTAGE_MAX = 16
#: The plane a slice along each array axis ``(z, y, x)`` shows.
AXIS_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class VolumeView:
    """Which 2D slices of a volume ``(..., D, H, W)`` are shown.

    Attributes:
        mode: ``ortho`` (one slice along each axis), ``slice`` (one slice) or ``montage`` (up to
            :data:`MONTAGE_MAX` evenly spaced slices along ``axis``).
        axis: Array axis (0, 1, 2) for ``slice`` and ``montage``.
        index: Slice number for ``slice`` (None = the one of ``through``).
        through: The slice of each axis that ``ortho`` shows, and ``slice`` without an ``index``
            (e.g. :func:`foreground_slices`); None = the middle ones.
    """

    mode: str = "ortho"
    axis: int = 0
    index: int | None = None
    through: tuple[int, int, int] | None = None

    def _default(self, shape: Sequence[int], axis: int) -> int:
        return shape[axis] // 2 if self.through is None else self.through[axis]

    def slices(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(axis, index)`` of every panel for a volume of spatial ``shape`` ``(D, H, W)``."""
        if self.mode == "ortho":
            return [(a, self._default(shape, a)) for a in range(3)]
        n = shape[self.axis]
        if self.mode == "slice":
            return [(self.axis, self._default(shape, self.axis) if self.index is None else self.index)]
        count = min(MONTAGE_MAX, n)
        picks = sorted({round((i + 0.5) * n / count - 0.5) for i in range(count)})
        return [(self.axis, i) for i in picks]

    def names(self, shape: Sequence[int], original: Sequence[int] | None = None) -> list[str]:
        """The title of every panel: its plane and slice number, e.g. ``axial 12``.

        ``original``: the shape of the volume before it was resized to ``shape``; the numbers are then
        in its voxels (those ``--slice`` takes).
        """
        out = []
        for a, i in self.slices(shape):
            if original is not None and original[a] != shape[a]:
                i = min(original[a] - 1, int((i + 0.5) * original[a] / shape[a]))
            out.append(f"{AXIS_NAMES[a]} {i}")
        return out

    def hidden_slice(self, shape: Sequence[int]) -> tuple[int, int]:
        """The one ``(axis, index)`` that hidden channels are shown for (one tile per channel)."""
        if self.mode == "slice":
            return self.slices(shape)[0]
        axis = 0 if self.mode == "ortho" else self.axis
        return axis, self._default(shape, axis)

    def columns(self, panels: int) -> int:
        """Panels per row: all in one row, a montage as a square."""
        return panels if self.mode != "montage" else math.ceil(math.sqrt(panels))


def foreground_slices(mask: np.ndarray) -> tuple[int, int, int]:
    """For each axis of a ``(D, H, W)`` mask, the slice with the most foreground (nonzero) voxels
    (the first of equals); the middle slice when the mask is empty."""
    fg = np.asarray(mask) != 0
    if not fg.any():
        return tuple(n // 2 for n in fg.shape)  # type: ignore[return-value]
    others = ((1, 2), (0, 2), (0, 1))
    return tuple(int(fg.sum(axis=o).argmax()) for o in others)  # type: ignore[return-value]


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``(..., D, H, W)`` at ``index`` along spatial ``axis`` → ``(..., a, b)``.

    Slices along axes 1 and 2 are flipped vertically so that the first array axis points up.
    """
    lead = volume.ndim - 3
    out = np.take(volume, index, axis=lead + axis)
    return out[..., ::-1, :] if axis > 0 else out


__all__ = ["AXIS_NAMES", "MONTAGE_MAX", "VolumeView", "foreground_slices", "take_slice"]
