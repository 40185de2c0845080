"""3D pictures cut through the foreground, panels named (issue 16, item 7): the slice choice, the
titles, the training sample pictures and the animation's panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from ncatool.animate import load_source
from ncatool.config import build_config
from ncatool.data.io import Image, write_image
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig
from ncatool.plots import save_segmentation_panel, segmentation_rows
from ncatool.runtime import AnimateRequest, checkpoint_payload, write_checkpoint
from ncatool.tasks import config_class
from ncatool.viz.text import titled
from ncatool.viz.volume import AXIS_NAMES, VolumeView, foreground_slices


# ---------------------------------------------------------------------------------------------- slices
def test_foreground_slices_by_hand() -> None:
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 0:4] = 1  # 4 voxels in z=1, y=2, x=0..3
    mask[3, 0:2, 5] = 2  # 2 voxels in z=3, y=0..1, x=5
    # z: 4 vs 2 -> 1; y: counts y0=1, y1=1, y2=4 -> 2; x: x0..3 one each, x5 two -> 5
    assert foreground_slices(mask) == (1, 2, 5)
    assert foreground_slices(np.zeros((4, 5, 6))) == (2, 2, 3)  # empty: the middle


def test_volume_view_through_and_names() -> None:
    shape = (4, 6, 8)
    view = VolumeView(through=(0, 5, 1))
    assert view.slices(shape) == [(0, 0), (1, 5), (2, 1)]
    assert view.names(shape) == ["axial 0", "coronal 5", "sagittal 1"]
    assert view.hidden_slice(shape) == (0, 0)
    assert VolumeView("slice", 1, None, through=(0, 5, 1)).slices(shape) == [(1, 5)]
    assert VolumeView("slice", 1, 2, through=(0, 5, 1)).slices(shape) == [(1, 2)]  # --slice wins
    assert VolumeView().names(shape) == ["axial 2", "coronal 3", "sagittal 4"]  # no mask: the centre
    # a resized volume's panels are numbered in the input's voxels, as --slice takes them
    names = VolumeView(through=(1, 2, 3)).names(shape, original=(8, 6, 16))
    assert names == ["axial 3", "coronal 2", "sagittal 7"]
    assert [int(3 * 4 / 8), int(7 * 8 / 16)] == [1, 3]  # --slice's mapping back gives the same slices
    assert AXIS_NAMES == ("axial", "coronal", "sagittal")


def test_titled_adds_a_strip_above_and_keeps_the_tile() -> None:
    tile = np.full((20, 60, 3), 7, np.uint8)
    out = titled(tile, "axial 3", background=(255, 255, 255), colour=(0, 0, 0))
    strip = out.shape[0] - 20
    assert strip > 5 and out.shape[1] == 60
    assert np.array_equal(out[strip:], tile)
    assert (out[:strip] < 128).any()  # text drawn
    assert titled(tile[:, :4], "sagittal 12").shape[1] > 4  # a narrow tile widens to its title


# ---------------------------------------------------------------------------------------------- samples
def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    label = torch.zeros(6, 8, 10, dtype=torch.long)
    label[4, 1:3, 7:9] = 1
    pred = torch.zeros_like(label)
    pred[1, 5:7, 2:4] = 1
    image = torch.rand(1, 6, 8, 10)
    return image, label, pred


def test_3d_sample_rows_go_through_the_reference_then_the_prediction() -> None:
    image, label, pred = _case()
    rows = segmentation_rows(image, label, pred)
    # slices of the label (z=4, y=1, x=7), then of the prediction when the label is empty
    assert [title for title, _ in rows] == ["axial 4", "coronal 1", "sagittal 7"]
    assert [title for title, _ in segmentation_rows(image, torch.zeros_like(label), pred)] == [
        "axial 1",
        "coronal 5",
        "sagittal 2",
    ]
    assert [t.shape[:2] for t in rows[0][1]] == [(8, 10)] * 3
    assert [t.shape[:2] for t in rows[1][1]] == [(6, 10)] * 3
    assert [t.shape[:2] for t in rows[2][1]] == [(6, 8)] * 3
    reference = rows[0][1][1]
    assert reference[1, 7, 0] > reference[1, 7, 1]  # the label in red, in the slice shown
    assert [title for title, _ in segmentation_rows(image[:, 0], label[0], pred[0])] == [None]  # 2D


def test_3d_sample_picture_has_a_titled_row_per_plane(tmp_path: Path) -> None:
    image, label, pred = _case()
    save_segmentation_panel([(image, label, pred)], tmp_path / "s.png")
    with PILImage.open(tmp_path / "s.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    scale = 128 // 10
    assert pixels.shape[0] > 2 + 8 * scale + 6 * scale * 2  # three rows of tiles, plus the titles
    assert pixels.shape[1] >= 3 * 10 * scale


# ---------------------------------------------------------------------------------------------- animation
def _seg3d_checkpoint(tmp_path: Path) -> Path:
    cfg = SegModelConfig(dim=3, in_channels=1, n_out=1, channels=6, hidden=8, levels=2, scale=2,
                         steps=(3, 2), kernels=(3, 3), patch=(0, 0))  # fmt: skip
    model = SegmentationNCA(cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "fc1" in name:
            torch.nn.init.normal_(p, std=0.3)
    run = build_config(config_class("seg3d"), {"task": "seg3d", "target_size": [12, 12, 12]})
    return write_checkpoint(checkpoint_payload(run, model, {"model": cfg.__dict__}), tmp_path / "s.pt")


@pytest.mark.parametrize("seed", [0, 3])
def test_animation_panels_go_through_the_final_predicted_mask(tmp_path: Path, seed: int) -> None:
    ckpt = _seg3d_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    volume[2:5, 7:11, 1:4] += 4.0  # an off-centre bright block
    image = write_image(Image.from_array(volume), tmp_path / "v.nii.gz")
    source = load_source(ckpt, AnimateRequest(input=image, seed=seed), device="cpu")
    # the animation, run as `ncatool animate` runs it (seeded right before), ends in this mask
    torch.manual_seed(seed)
    states: list[torch.Tensor] = []
    source.run(lambda step, state, level: states.append(state))
    final = (states[-1][0, 1:2] > 0).any(0).numpy()
    assert source.view.through == foreground_slices(final)
    names = source.describe()["panels"]
    assert [n.split()[0] for n in names] == ["axial", "coronal", "sagittal"]
    assert [int(n.split()[1]) for n in names] == list(foreground_slices(final))
    frame = source.render(states[-1], 1, 2)
    assert frame.shape[0] > 12 * 2  # the panels carry a title strip
