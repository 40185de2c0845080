"""What a segmentation NCA sees of the image: the image alone, or the image plus intensity bins.

With ``intensity_bins = K`` (seg2d/seg3d setting) the model's fixed input channels are each image
channel followed by K soft bins of its normalised intensity
(:func:`ncatool.data.transforms.intensity_bins`). The bins are computed inside the model's forward,
so training, validation, ``predict``, ``eval`` and ``animate`` all feed it the plain normalised image
and nothing else has to know; the checkpoint's model shape counts the bin channels in
``in_channels`` and the run's config holds ``intensity_bins`` / ``intensity_range``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ncatool.data.transforms import intensity_bins
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig, SegOutput


class BinnedSegmentationNCA(SegmentationNCA):
    """A :class:`SegmentationNCA` whose input is the image plus ``bins`` intensity bins per channel.

    Args:
        cfg: The model shape; ``cfg.in_channels`` counts image and bin channels,
            ``image_channels * (1 + bins)``.
        bins: Bins per image channel (>= 2).
        low: Centre of the first bin, in normalised intensity.
        high: Centre of the last bin.
    """

    def __init__(self, cfg: SegModelConfig, bins: int, low: float, high: float) -> None:
        if bins < 2 or cfg.in_channels % (1 + bins):
            raise ValueError(f"in_channels {cfg.in_channels} is not image channels x (1 + {bins} bins)")
        super().__init__(cfg)
        self.bins, self.low, self.high = bins, float(low), float(high)
        self.image_channels = cfg.in_channels // (1 + bins)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, image_channels, *S)`` → ``(B, in_channels, *S)``: the image, then its bins."""
        if image.shape[1] != self.image_channels:
            raise ValueError(f"expected {self.image_channels} image channel(s), got {image.shape[1]}")
        return intensity_bins(image, self.bins, self.low, self.high)

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> SegOutput:
        """:meth:`SegmentationNCA.forward` on the image plus its bins (``image``: ``(B, C_img, *S)``)."""
        return super().forward(self.features(image), *args, **kwargs)

    def states(
        self, image: torch.Tensor, step_budget: int | None = None, steps: Sequence[int] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """:meth:`SegmentationNCA.states` on the image plus its bins."""
        return super().states(self.features(image), step_budget=step_budget, steps=steps)


def build_segmentation_model(
    shape: SegModelConfig, bins: int = 0, bin_range: tuple[float, float] = (0.0, 1.0)
) -> SegmentationNCA:
    """The model for ``shape``: plain, or with ``bins`` intensity bins per channel over ``bin_range``.

    Raises:
        ValueError: An inconsistent shape (as :class:`SegmentationNCA`).
    """
    if bins:
        return BinnedSegmentationNCA(shape, bins, *bin_range)
    return SegmentationNCA(shape)
