"""Frames → an animation file or a folder of PNGs.

A writer takes ``(H, W, 3)`` uint8 frames of one size through :meth:`FrameWriter.add`; :meth:`close`
finishes the file and :meth:`abort` drops what is unfinished (the caller owns the atomic rename of the
output, see :func:`ncatool.data.io.atomic_path`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ncatool.errors import NcaError
from ncatool.viz.grid import write_png

#: Animation formats by extension.
FORMATS: tuple[str, ...] = (".gif", ".mp4")


class FrameWriter(Protocol):
    """Where rendered frames go."""

    def add(self, frame: np.ndarray) -> None:
        """Take one ``(H, W, 3)`` uint8 frame."""

    def close(self) -> None:
        """Finish the output (raises if it could not be written)."""

    def abort(self) -> None:
        """Stop after an error; nothing more is written."""


def output_format(path: str | Path) -> str:
    """``gif`` or ``mp4`` for an output path; checks ffmpeg for MP4.

    Raises:
        NcaError: Unknown extension, or MP4 without ffmpeg on the PATH.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        shown = ext or "no extension"
        raise NcaError(f"unsupported animation format ({shown}); use .gif or .mp4", path)
    if ext == ".mp4" and shutil.which("ffmpeg") is None:
        raise NcaError("writing .mp4 needs ffmpeg on the PATH, which was not found; use .gif instead", path)
    return ext[1:]


def animation_writer(path: Path, fmt: str, fps: float) -> FrameWriter:
    """The writer of ``fmt`` (``gif`` or ``mp4``, from :func:`output_format`) into ``path``."""
    if fmt == "mp4":
        return Mp4Writer(path, fps, shutil.which("ffmpeg") or "ffmpeg")
    return GifWriter(path, fps)


class GifWriter:
    """Collects frames; :meth:`close` writes an endlessly looping GIF (Pillow).

    GIF stores a frame's duration in hundredths of a second; 10 ms is the shortest one that is not 0
    (which viewers replace by their own, slow, default).
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.duration = max(10, round(1000.0 / fps))
        self.frames: list[Any] = []

    def add(self, frame: np.ndarray) -> None:
        from PIL import Image

        self.frames.append(Image.fromarray(frame))

    def close(self) -> None:
        if not self.frames:
            return
        first, *rest = self.frames
        first.save(self.path, format="GIF", save_all=True, append_images=rest, duration=self.duration, loop=0)

    def abort(self) -> None:
        self.frames.clear()


class Mp4Writer:
    """Pipes raw RGB frames into ``ffmpeg`` (H.264/yuv420p where available).

    yuv420p halves the chroma resolution, so ffmpeg pads odd frame sizes to even ones.
    """

    def __init__(self, path: Path, fps: float, ffmpeg: str) -> None:
        self.path = path
        self.fps = fps
        self.ffmpeg = ffmpeg
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, height: int, width: int) -> None:
        cmd = [
            self.ffmpeg,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            f"{self.fps:g}",
            "-i",
            "-",
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            str(self.path),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def add(self, frame: np.ndarray) -> None:
        if self.proc is None:
            self._start(frame.shape[0], frame.shape[1])
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        except BrokenPipeError:  # ffmpeg stopped early: its exit code and stderr say why
            self.close()
            raise NcaError("ffmpeg stopped reading frames", self.path) from None

    def close(self) -> None:
        if self.proc is None:
            return
        # communicate() closes stdin and drains stderr while waiting (a full stderr pipe would block)
        _, stderr = self.proc.communicate()
        if self.proc.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()
            tail = message[-1] if message else f"exit code {self.proc.returncode}"
            raise NcaError(f"ffmpeg failed: {tail}", self.path)

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PngFramesWriter:
    """Writes ``frame_00000.png``, ``frame_00001.png``, ... (each atomically) into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, frame: np.ndarray) -> None:
        write_png(frame, self.folder / f"frame_{self.count:05d}.png")
        self.count += 1

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


__all__ = [
    "FORMATS",
    "FrameWriter",
    "GifWriter",
    "Mp4Writer",
    "PngFramesWriter",
    "animation_writer",
    "output_format",
]
