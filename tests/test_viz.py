"""``ncatool.viz``: the one grid (tile positions, gaps, margin, upscaling), colours, slices, writers.

Hand-sized arrays and exact pixel values; no model is run.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncatool.console import ProgressBars, state
from ncatool.errors import NcaError
from ncatool.plots import save_segmentation_panel
from ncatool.viz.colour import (
    LABEL_COLOURS,
    channels_to_rgb,
    diverging,
    gray_to_rgb,
    hidden_tiles,
    overlay_labels,
    overlay_probs,
    rgba_to_rgb,
    window,
)
from ncatool.viz.grid import FRAME, SAMPLES, GridStyle, in_rows, save_grid, tile_grid, upscale, write_png
from ncatool.viz.text import FrameComposer
from ncatool.viz.volume import VolumeView, take_slice
from ncatool.viz.writers import GifWriter, Mp4Writer, PngFramesWriter, animation_writer, output_format


def solid(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# ---------------------------------------------------------------------------------------------- grid
def test_upscale_repeats_each_pixel() -> None:
    tile = np.array([[1, 2], [3, 4]], np.uint8)
    assert upscale(tile, 1) is tile
    assert upscale(tile, 2).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_in_rows_cuts_into_rows_of_cols() -> None:
    tiles = [solid(1, 1, v) for v in range(5)]
    assert [len(r) for r in in_rows(tiles, 2)] == [2, 2, 1]
    assert [len(r) for r in in_rows(tiles, 0)] == [1] * 5  # at least one per row


def test_tile_grid_positions_gap_and_background() -> None:
    style = GridStyle(gap=1, margin=0, background=(9, 9, 9))
    canvas = tile_grid(in_rows([solid(2, 2, 10), solid(2, 2, 20), solid(2, 2, 30)], 2), style=style)
    assert canvas.shape == (2 + 1 + 2, 2 + 1 + 2, 3)
    expected = np.array(
        [
            [10, 10, 9, 20, 20],
            [10, 10, 9, 20, 20],
            [9, 9, 9, 9, 9],
            [30, 30, 9, 9, 9],
            [30, 30, 9, 9, 9],
        ]
    )
    assert np.array_equal(canvas[..., 0], expected)
    assert np.array_equal(canvas[..., 0], canvas[..., 2])


def test_tile_grid_margin_scale_and_gray_tiles() -> None:
    style = GridStyle(gap=2, margin=3, background=(255, 255, 255))
    gray = np.array([[7]], np.uint8)  # (1, 1) gray tile → RGB
    canvas = tile_grid([[solid(1, 1, 50), gray]], scale=4, style=style)
    assert canvas.shape == (3 + 4 + 3, 3 + 4 + 2 + 4 + 3, 3)
    assert (canvas[3:7, 3:7] == 50).all()
    assert (canvas[3:7, 9:13] == 7).all()
    assert (canvas[:3] == 255).all() and (canvas[:, 7:9] == 255).all() and (canvas[7:] == 255).all()


def test_tile_grid_rows_as_tall_as_their_tiles_and_left_aligned() -> None:
    # a wide block above a narrow one: columns as wide as the widest tile, rows as tall as their own
    canvas = tile_grid([[solid(2, 5, 1)], [solid(1, 3, 2)]], style=FRAME)
    assert canvas.shape == (2 + FRAME.gap + 1, 5, 3)
    assert (canvas[:2] == 1).all()
    assert (canvas[2 + FRAME.gap, :3] == 2).all() and (canvas[2 + FRAME.gap, 3:] == FRAME.background).all()


def test_tile_grid_cells_fit_the_largest_tile_and_empty_rows_are_skipped() -> None:
    canvas = tile_grid([[], [solid(3, 2, 1), solid(1, 4, 2)], []], style=GridStyle(0, 0, (0, 0, 0)))
    assert canvas.shape == (3, 8, 3)  # two cells of 4 px
    assert (canvas[:, :2] == 1).all() and (canvas[:, 2:4] == 0).all()
    assert (canvas[0, 4:8] == 2).all() and (canvas[1:, 4:8] == 0).all()
    assert tile_grid([]).shape == (0, 0, 3)


def test_save_grid_writes_the_grid_as_png_atomically(tmp_path: Path) -> None:
    rows = [[solid(2, 3, 40), solid(2, 3, 80)], [solid(2, 3, 120)]]
    path = save_grid(rows, tmp_path / "deep" / "grid.png", scale=2)
    assert path == tmp_path / "deep" / "grid.png"
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert np.array_equal(pixels, tile_grid(rows, 2, SAMPLES))
    assert pixels.shape == (2 * 2 + 2 * 4 + 2, 2 * 2 + 2 * 6 + 2, 3)  # margin 2, gap 2, 4x6 cells
    assert (pixels[2:6, 2:8] == 40).all() and (pixels[8:12, 2:8] == 120).all()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind
    assert save_grid([[]], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------- colour
def test_gray_to_rgb_window_and_rounding() -> None:
    out = gray_to_rgb(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]]), 0.0, 1.0)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert gray_to_rgb(np.array([[3.0]]), 3.0, 3.0)[0, 0].tolist() == [0, 0, 0]  # flat window


def test_window_is_the_1st_to_99th_percentile_or_min_max() -> None:
    values = np.arange(101, dtype=np.float32)
    assert window(values) == (1.0, 99.0)
    flat = np.zeros(1001, np.float32)  # one bright voxel: both percentiles are 0
    flat[0] = 5.0
    assert window(flat) == (0.0, 5.0)


def test_channels_to_rgb_three_channels_as_colour() -> None:
    image = np.stack([np.full((2, 2), 1.0), np.zeros((2, 2)), np.full((2, 2), 0.5)])
    assert channels_to_rgb(image, 0.0, 1.0)[0, 0].tolist() == [255, 0, 128]
    assert channels_to_rgb(image[:2], 0.0, 1.0)[0, 0].tolist() == [255, 255, 255]  # channel 0, gray


def test_overlay_probs_mask_and_prob() -> None:
    gray = np.full((1, 2, 3), 100, np.uint8)
    probs = np.array([[[0.9, 0.2]], [[0.1, 0.4]]], np.float32)  # label 1 sure, then nothing over 0.5
    mask = overlay_probs(gray, probs, "mask")
    expected = (100 * 0.5 + LABEL_COLOURS[0] * 0.5 + 0.5).astype(np.uint8)
    assert mask[0, 0].tolist() == expected.tolist()
    assert mask[0, 1].tolist() == [100, 100, 100]
    prob = overlay_probs(gray, probs, "prob")  # label 2 at opacity 0.7 * 0.4
    a = np.float32(0.7 * 0.4)
    assert prob[0, 1].tolist() == (100 * (1 - a) + LABEL_COLOURS[1] * a + 0.5).astype(np.uint8).tolist()


def test_overlay_labels_matches_the_mask_overlay() -> None:
    rgb = np.full((1, 8, 3), 60, np.uint8)
    labels = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    out = overlay_labels(rgb, labels)
    assert out[0, 0].tolist() == [60, 60, 60]
    for k in range(1, 8):  # colours repeat after six labels
        probs = np.zeros((k, 1, 1), np.float32)
        probs[k - 1] = 1.0
        assert out[0, k].tolist() == overlay_probs(rgb[:, :1], probs, "mask")[0, 0].tolist()


def test_diverging_colours_and_scale() -> None:
    channel = np.array([[-2.0, 0.0, 2.0]], np.float32)  # 99th percentile of |v| = 2
    out = diverging(channel)
    assert out[0, 0].tolist() == [0, 0, 255]  # negative: blue
    assert out[0, 1].tolist() == [255, 255, 255]  # zero: white
    assert out[0, 2].tolist() == [255, 0, 0]  # positive: red
    assert (diverging(np.zeros((2, 2), np.float32)) == 255).all()
    tiles = hidden_tiles(np.stack([channel, -channel]), 2)
    assert len(tiles) == 2 and tiles[1].shape == (2, 6, 3) and tiles[1][0, 0].tolist() == [255, 0, 0]


def test_rgba_to_rgb_composites_over_white() -> None:
    rgba = torch.zeros(4, 1, 3)
    rgba[:, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # opaque black
    rgba[:, 0, 2] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # half-transparent red (premultiplied)
    out = rgba_to_rgb(rgba)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0], [255, 128, 128]]
    assert np.array_equal(rgba_to_rgb(rgba.numpy()), out)


def test_segmentation_panel_rows_of_image_truth_prediction(tmp_path: Path) -> None:
    image = torch.arange(16.0).view(1, 4, 4)
    label = torch.zeros(4, 4, dtype=torch.long)
    label[:2] = 1
    pred = torch.zeros(4, 4, dtype=torch.long)
    path = tmp_path / "s.png"
    save_segmentation_panel([(image, label, pred), (image, pred, label)], path)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    scale = 128 // 4
    cell = 4 * scale
    assert pixels.shape == (2 + 2 * cell + 2 + 2, 2 + 3 * cell + 2 * 2 + 2, 3)  # margin 2, gap 2
    row = pixels[2 : 2 + cell]
    shown, truth, predicted = (row[:, 2 + c * (cell + 2) :][:, :cell] for c in range(3))
    assert truth[0, 0, 0] > truth[0, 0, 1]  # label 1 in red over the image
    assert np.array_equal(truth[-1], shown[-1])  # ... and only where the label is
    assert np.array_equal(predicted, shown)  # an empty prediction is the image alone


# ---------------------------------------------------------------------------------------------- volume
def test_volume_view_slices_and_take_slice() -> None:
    shape = (4, 6, 8)
    assert VolumeView().slices(shape) == [(0, 2), (1, 3), (2, 4)]
    assert VolumeView("slice", 2, None).slices(shape) == [(2, 4)]
    assert VolumeView("montage", 1).slices(shape) == [(1, i) for i in range(6)]
    assert len(VolumeView("montage", 0).slices((40, 2, 2))) == 16
    assert VolumeView("montage", 1).columns(6) == 3 and VolumeView().columns(3) == 3
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(take_slice(volume, 0, 1), volume[1])
    assert np.array_equal(take_slice(volume, 1, 0), volume[:, 0][::-1])  # first axis points up


# ---------------------------------------------------------------------------------------------- writers
FRAMES = [solid(5, 7, v) for v in (0, 100, 200)]


def test_gif_writer_frame_count_and_timing(tmp_path: Path) -> None:
    writer = GifWriter(tmp_path / "a.gif", fps=20.0)
    for frame in FRAMES:
        writer.add(frame)
    writer.close()
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 3 and im.size == (7, 5)
        assert im.info["duration"] == 50 and im.info["loop"] == 0
        im.seek(2)
        assert np.asarray(im.convert("RGB"))[0, 0].tolist() == [200, 200, 200]
    aborted = GifWriter(tmp_path / "b.gif", fps=10.0)
    aborted.add(FRAMES[0])
    aborted.abort()
    aborted.close()
    assert not (tmp_path / "b.gif").exists()


def test_png_frames_writer_numbers_the_frames(tmp_path: Path) -> None:
    writer = PngFramesWriter(tmp_path / "frames")
    for frame in FRAMES:
        writer.add(frame)
    writer.close()
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    with Image.open(tmp_path / "frames" / "frame_00001.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), FRAMES[1])


def test_write_png_gray(tmp_path: Path) -> None:
    with Image.open(write_png(np.eye(3, dtype=np.uint8) * 9, tmp_path / "g.png")) as im:
        assert im.mode == "L" and np.asarray(im).tolist() == [[9, 0, 0], [0, 9, 0], [0, 0, 9]]


def fake_ffmpeg(tmp_path: Path, script: str) -> str:
    fake = tmp_path / "ffmpeg"
    fake.write_text(script)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


def test_mp4_writer_pipes_raw_frames(tmp_path: Path) -> None:
    ffmpeg = fake_ffmpeg(tmp_path, '#!/bin/sh\nfor last; do :; done\ncat > "$last"\n')  # stdin → last arg
    writer = Mp4Writer(tmp_path / "a.mp4", 10.0, ffmpeg)
    for frame in FRAMES:
        writer.add(frame)
    writer.close()
    assert (tmp_path / "a.mp4").read_bytes() == b"".join(f.tobytes() for f in FRAMES)


@pytest.mark.parametrize("reads", [True, False])
def test_mp4_writer_reports_ffmpeg_failure(tmp_path: Path, reads: bool) -> None:
    # ffmpeg failing at the end, or at once without reading (the frames then meet a closed pipe)
    body = "cat > /dev/null\n" if reads else ""
    ffmpeg = fake_ffmpeg(tmp_path, f"#!/bin/sh\n{body}echo 'no encoder' >&2\nexit 3\n")
    writer = Mp4Writer(tmp_path / "a.mp4", 10.0, ffmpeg)
    with pytest.raises(NcaError, match="ffmpeg failed: no encoder"):
        for _ in range(8):
            writer.add(np.zeros((100, 100, 3), np.uint8))
        writer.close()
    writer.abort()  # after the failure: nothing left to stop


def test_output_format_and_animation_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert output_format("x/a.GIF") == "gif"
    with pytest.raises(NcaError, match=r"\.gif or \.mp4"):
        output_format("a.avi")
    monkeypatch.setattr("shutil.which", lambda *a, **k: None)
    with pytest.raises(NcaError, match="ffmpeg"):
        output_format("a.mp4")
    assert isinstance(animation_writer(tmp_path / "a.gif", "gif", 10.0), GifWriter)
    assert isinstance(animation_writer(tmp_path / "a.mp4", "mp4", 10.0), Mp4Writer)


# ---------------------------------------------------------------------------------------------- text
def test_frame_composer_keeps_the_first_frame_size() -> None:
    composer = FrameComposer(["step 0/9", "step 9/9"])
    first = composer.compose(solid(10, 200, 50), "step 0/9")
    assert first.shape == (composer.header_h + 10, 200, 3)
    assert (first[composer.header_h :] == 50).all()
    later = composer.compose(solid(12, 190, 70), "step 9/9")  # cropped / padded to the first size
    assert later.shape == first.shape and (later[composer.header_h :, 190:] == FRAME.background).all()


# ---------------------------------------------------------------------------------------------- progress
@pytest.mark.parametrize(
    ("enabled", "quiet", "env", "shown"),
    [
        (True, False, None, True),
        (False, False, None, False),
        (True, True, None, False),
        (True, False, "1", False),
    ],
)
def test_progress_bars_obey_quiet_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, enabled: bool, quiet: bool, env: str | None, shown: bool
) -> None:
    if env is None:
        monkeypatch.delenv("NCATOOL_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("NCATOOL_NO_PROGRESS", env)
    monkeypatch.setattr(state, "quiet", quiet)
    with ProgressBars(enabled) as bars:
        assert bars.enabled is shown
        bar = bars.add("work", total=2)
        bars.advance(bar)
        bars.advance(bar, {"loss": 0.5, "epoch": 1})
        bars.remove(bar)
