"""The header line of an animation frame: the step label above the rendered panels."""

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


class FrameComposer:
    """Puts a header line with the step label above the rendered panels.

    The frame size is fixed by the first frame (wide enough for the body and every label), so every
    frame of an animation has the same size, as GIF and MP4 need.

    Args:
        labels: Every label that will be drawn (to size the header).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        from PIL import ImageFont

        try:
            self.font: Any = ImageFont.load_default(size=FONT_SIZE)
        except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
            self.font = ImageFont.load_default()
        boxes = [self._bbox(text) for text in [*labels, "Ag0"]]
        self.text_w = max(b[2] - min(b[0], 0) for b in boxes) + 8
        self.header_h = max(b[3] for b in boxes) + 6
        self.size: tuple[int, int] | None = None  # (height, width) once the first frame is made

    def _bbox(self, text: str) -> tuple[int, int, int, int]:
        from PIL import Image, ImageDraw

        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=self.font)
        return int(left), int(top), math.ceil(right), math.ceil(bottom)

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


__all__ = ["FrameComposer"]
