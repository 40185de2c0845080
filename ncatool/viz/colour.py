"""Values → RGB: intensity windows, label colours, hidden channels and RGBA states.

Every function returns ``(H, W, 3)`` uint8 (or a list of such tiles) and rounds half up (``+ 0.5``
before the cast), so the same values always give the same pixels in frames and sample pictures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncatool.viz.grid import upscale

#: Colours of labels 1, 2, ... (repeated beyond).
LABEL_COLOURS = np.array(
    [[255, 48, 48], [48, 220, 48], [64, 128, 255], [255, 220, 0], [0, 230, 230], [230, 60, 230]],
    dtype=np.float32,
)
#: Opacity of a label colour over the image (overlay ``mask``, sample pictures).
MASK_ALPHA = 0.5
#: Opacity of a label colour at probability 1 (overlay ``prob``).
PROB_ALPHA = 0.7
#: Overlay modes of :func:`overlay_probs`.
OVERLAYS: tuple[str, ...] = ("mask", "prob")


def window(values: np.ndarray) -> tuple[float, float]:
    """The intensity window ``(lo, hi)`` shown from black to white: the 1st and 99th percentiles.

    A few extreme voxels would otherwise turn the rest gray; a nearly constant image (percentiles
    equal) falls back to its minimum and maximum.
    """
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[lo, hi]`` → ``[0, 255]``, clipped (a flat window maps with span 1)."""
    span = hi - lo if hi > lo else 1.0
    g = np.clip((values.astype(np.float32) - lo) / span, 0.0, 1.0) * 255.0
    return (g + 0.5).astype(np.uint8)


def gray_to_rgb(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Intensities ``(H, W)`` mapped from ``[lo, hi]`` to uint8 gray ``(H, W, 3)``."""
    return np.repeat(to_uint8(image, lo, hi)[..., None], 3, axis=-1)


def channels_to_rgb(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """An image ``(C, H, W)`` → ``(H, W, 3)`` uint8: three channels as RGB, otherwise channel 0 as gray."""
    if image.shape[0] == 3:
        return to_uint8(np.moveaxis(image, 0, -1), lo, hi)
    return gray_to_rgb(image[0], lo, hi)


def _blend(rgb: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb (H, W, 3)`` with ``colour (H, W, 3)`` at opacity ``alpha (H, W)`` → uint8."""
    out = rgb.astype(np.float32) * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return (out + 0.5).clip(0, 255).astype(np.uint8)


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
    colour = LABEL_COLOURS[probs.argmax(axis=0) % len(LABEL_COLOURS)]
    if mode == "mask":
        alpha = np.where(best > 0.5, MASK_ALPHA, 0.0).astype(np.float32)
    else:
        alpha = (PROB_ALPHA * np.clip(best, 0.0, 1.0)).astype(np.float32)
    return _blend(gray, colour, alpha)


def overlay_labels(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label ``k > 0`` of ``labels (H, W)`` drawn in colour ``k`` over ``rgb (H, W, 3)`` at opacity 0.5.

    The same colours and opacity as the ``mask`` overlay of :func:`overlay_probs`, so a sample
    picture's prediction looks like the last frame of its animation.
    """
    labels = np.asarray(labels).astype(np.int64)
    colour = LABEL_COLOURS[(labels - 1) % len(LABEL_COLOURS)]
    alpha = np.where(labels > 0, MASK_ALPHA, 0.0).astype(np.float32)
    return _blend(rgb, colour, alpha)


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


def hidden_tiles(hidden: np.ndarray | Sequence[np.ndarray], scale: int) -> list[np.ndarray]:
    """Hidden channels ``(K, H, W)`` → K :func:`diverging` tiles ``(H*scale, W*scale, 3)``."""
    return [upscale(diverging(ch), scale) for ch in hidden]


def rgba_to_rgb(rgba: torch.Tensor | np.ndarray) -> np.ndarray:
    """Premultiplied RGBA ``(4, H, W)`` in [0, 1] over a white background → ``(H, W, 3)`` uint8."""
    x = (
        rgba.detach().float().cpu().numpy()
        if isinstance(rgba, torch.Tensor)
        else np.asarray(rgba, np.float32)
    )
    x = np.clip(x, 0.0, 1.0)
    rgb = np.clip(1.0 - x[3:4] + x[:3], 0.0, 1.0)
    return (np.moveaxis(rgb, 0, -1) * 255.0 + 0.5).astype(np.uint8)


__all__ = [
    "LABEL_COLOURS",
    "OVERLAYS",
    "channels_to_rgb",
    "diverging",
    "gray_to_rgb",
    "hidden_tiles",
    "overlay_labels",
    "overlay_probs",
    "rgba_to_rgb",
    "to_uint8",
    "window",
]
