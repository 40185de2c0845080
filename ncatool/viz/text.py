"""Text on pictures: the header line of an animation frame (the step label above the rendered
panels) and the title above a panel (the plane of a slice)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ncatool.viz.grid import FRAME

#: Header font size (Pillow's default font; a fixed bitmap font where FreeType is missing).
FONT_SIZE = 14
#: Header text colour (on the frame background).
HEADER_TEXT = (240, 240, 240)
#: Panel titles: font size.
TITLE_SIZE = 11


def load_font(size: int) -> Any:
    """Pillow's default font at ``size`` (a fixed bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_box(text: str, font: Any) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of ``text`` drawn at the origin."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(left), int(top), math.ceil(right), math.ceil(bottom)


def titled(
    tile: np.ndarray,
    text: str,
    background: Sequence[int] = (24, 24, 24),
    colour: Sequence[int] = HEADER_TEXT,
    size: int = TITLE_SIZE,
) -> np.ndarray:
    """``tile`` ``(H, W, 3)`` uint8 with a line of ``text`` above it, left-aligned.

    Returns:
        ``(h + H, max(W, text width), 3)`` uint8; ``h`` depends only on the font, so tiles titled
        alike stay aligned in a grid.
    """
    from PIL import Image, ImageDraw

    font = load_font(size)
    _, _, right, _ = text_box(text, font)
    strip = text_box("Ag0", font)[3] + 4
    out = np.empty((strip + tile.shape[0], max(tile.shape[1], right + 4), 3), np.uint8)
    out[:] = tuple(background)
    out[strip:, : tile.shape[1]] = tile if tile.ndim == 3 else tile[..., None]
    img = Image.fromarray(out)
    ImageDraw.Draw(img).text((2, 1), text, fill=tuple(colour), font=font)
    return np.asarray(img)


class FrameComposer:
    """Puts a header line with the step label above the rendered panels.

    The frame size is fixed by the first frame (wide enough for the body and every label), so every
    frame of an animation has the same size, as GIF and MP4 need.

    Args:
        labels: Every label that will be drawn (to size the header).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.font: Any = load_font(FONT_SIZE)
        boxes = [text_box(text, self.font) for text in [*labels, "Ag0"]]
        self.text_w = max(b[2] - min(b[0], 0) for b in boxes) + 8
        self.header_h = max(b[3] for b in boxes) + 6
        self.size: tuple[int, int] | None = None  # (height, width) once the first frame is made

    def compose(self, body: np.ndarray, label: str) -> np.ndarray:
        """``(H, W, 3)`` body → ``(header + H, max(W, text), 3)`` uint8 frame (later frames: cropped or
        padded to the first frame's size)."""
        from PIL import Image, ImageDraw

        if self.size is None:
            self.size = (self.header_h + body.shape[0], max(body.shape[1], self.text_w))
        h, w = self.size
        canvas = np.empty((h, w, 3), np.uint8)
        canvas[:] = FRAME.background
        bh, bw = min(body.shape[0], h - self.header_h), min(body.shape[1], w)
        canvas[self.header_h : self.header_h + bh, :bw] = body[:bh, :bw]
        img = Image.fromarray(canvas)
        ImageDraw.Draw(img).text((4, 3), label, fill=HEADER_TEXT, font=self.font)
        return np.asarray(img)


__all__ = ["FrameComposer", "load_font", "text_box", "titled"]
