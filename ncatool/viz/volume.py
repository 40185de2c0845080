"""Which 2D slices of a 3D volume are shown, and how a slice is cut and turned for display."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: At most this many slices in a montage.
MONTAGE_MAX = 16


@dataclass(frozen=True)
class VolumeView:
    """Which 2D slices of a volume ``(..., D, H, W)`` are shown.

    Attributes:
        mode: ``ortho`` (the central slice along each axis), ``slice`` (one slice) or ``montage`` (up
            to :data:`MONTAGE_MAX` evenly spaced slices along ``axis``).
        axis: Array axis (0, 1, 2) for ``slice`` and ``montage``.
        index: Slice number for ``slice`` (None = middle).
    """

    mode: str = "ortho"
    axis: int = 0
    index: int | None = None

    def slices(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(axis, index)`` of every panel for a volume of spatial ``shape`` ``(D, H, W)``."""
        if self.mode == "ortho":
            return [(a, shape[a] // 2) for a in range(3)]
        n = shape[self.axis]
        if self.mode == "slice":
            return [(self.axis, n // 2 if self.index is None else self.index)]
        count = min(MONTAGE_MAX, n)
        picks = sorted({round((i + 0.5) * n / count - 0.5) for i in range(count)})
        return [(self.axis, i) for i in picks]

    def hidden_slice(self, shape: Sequence[int]) -> tuple[int, int]:
        """The one ``(axis, index)`` that hidden channels are shown for (one tile per channel)."""
        if self.mode == "slice":
            return self.slices(shape)[0]
        axis = 0 if self.mode == "ortho" else self.axis
        return axis, shape[axis] // 2

    def columns(self, panels: int) -> int:
        """Panels per row: all in one row, a montage as a square."""
        return panels if self.mode != "montage" else math.ceil(math.sqrt(panels))


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``(..., D, H, W)`` at ``index`` along spatial ``axis`` → ``(..., a, b)``.

    Slices along axes 1 and 2 are flipped vertically so that the first array axis points up.
    """
    lead = volume.ndim - 3
    out = np.take(volume, index, axis=lead + axis)
    return out[..., ::-1, :] if axis > 0 else out


__all__ = ["MONTAGE_MAX", "VolumeView", "take_slice"]
