"""``intensity_bins``: soft intensity bins as extra fixed inputs of seg2d/seg3d, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_toy_dataset
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.data.io import Image, read_image, write_image
from ncatool.data.transforms import intensity_bins
from ncatool.errors import NcaError
from ncatool.models.segmentation import SegmentationNCA
from ncatool.runtime import load
from ncatool.tasks.segmentation import Seg2DConfig, SegmentationTask
from ncatool.tasks.segmentation.inputs import BinnedSegmentationNCA
from ncatool.tasks.segmentation.task import bin_range, check_seg_task_config
from ncatool.train import Trainer

cli = CliRunner()
TINY = {"steps": "4", "levels": "1", "kernels": "3", "patch": "0", "hidden": "16", "channels": "8"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def test_bins_are_hat_functions_that_sum_to_one() -> None:
    x = torch.tensor([-0.5, 0.0, 0.2, 0.5, 0.9, 1.3]).view(1, 1, 6)
    expected = [
        [-0.5, 0.0, 0.2, 0.5, 0.9, 1.3],  # the image itself comes first
        [1.0, 1.0, 0.6, 0.0, 0.0, 0.0],  # centre 0 (below 0 counts as 0)
        [0.0, 0.0, 0.4, 1.0, 0.2, 0.0],  # centre 0.5
        [0.0, 0.0, 0.0, 0.0, 0.8, 1.0],  # centre 1 (above 1 counts as 1)
    ]
    torch.testing.assert_close(intensity_bins(x, 3, 0.0, 1.0), torch.tensor([expected]))
    image = torch.randn(2, 2, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    out = intensity_bins(image, 4, -1.0, 1.0)
    assert out.shape == (2, 10, 5, 4, 3)
    torch.testing.assert_close(out[:, :2], image)
    for c in range(2):  # channel c's bins are channels 2 + 4c .. 5 + 4c
        torch.testing.assert_close(out[:, 2 + 4 * c : 6 + 4 * c].sum(1), torch.ones(2, 5, 4, 3))
    # channel 1's bins follow channel 1 only
    torch.testing.assert_close(out[:, 6:10], intensity_bins(image[:, 1:], 4, -1.0, 1.0)[:, 1:])


@pytest.mark.parametrize(("count", "low", "high"), [(1, 0.0, 1.0), (4, 1.0, 1.0)])
def test_bins_reject_bad_arguments(count: int, low: float, high: float) -> None:
    with pytest.raises(ValueError):
        intensity_bins(torch.zeros(1, 1, 3), count, low, high)


def _cfg(**values: str) -> Seg2DConfig:
    return build_config(Seg2DConfig, {"data": "x", **values})  # type: ignore[return-value]


def test_config_checks_and_default_ranges() -> None:
    assert bin_range(_cfg(intensity_bins="4", normalization="ct")) == (0.0, 1.0)
    assert bin_range(_cfg(intensity_bins="4", normalization="zscore")) == (-3.0, 3.0)
    assert bin_range(_cfg(intensity_bins="4", normalization="none", intensity_range="10,90")) == (10.0, 90.0)
    with pytest.raises(NcaError, match="0 \\(off\\) or at least 2"):
        check_seg_task_config(_cfg(intensity_bins="1"))
    with pytest.raises(NcaError, match="needs intensity_range"):
        check_seg_task_config(_cfg(intensity_bins="4", normalization="none"))
    with pytest.raises(NcaError, match="LOW < HIGH"):
        check_seg_task_config(_cfg(intensity_bins="4", intensity_range="1,0"))


def test_too_few_channels_names_the_bins(tmp_path: Path) -> None:
    ds = write_toy_dataset(tmp_path, 2, cases=3, size=12)
    cfg = _cfg(**{**TINY, "data": str(ds), "intensity_bins": "8"})
    with pytest.raises(NcaError, match="8 intensity bins"):
        SegmentationTask(cfg, torch.device("cpu")).build_model()


def test_train_predict_and_reload_with_bins(tmp_path: Path) -> None:
    ds = write_toy_dataset(tmp_path / "raw", 2, cases=4, size=16)
    values = {**TINY, "data": str(ds), "epochs": "2", "batch_size": "2", "samples": "0", "device": "cpu"}
    cfg = _cfg(**values, intensity_bins="4", normalization="minmax", target_size="16,16")
    task = SegmentationTask(cfg, torch.device("cpu"))
    model = task.build_model()
    assert isinstance(model, BinnedSegmentationNCA) and model.cfg.in_channels == 5
    Trainer(task, tmp_path / "run", torch.device("cpu")).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"

    runner = load(ckpt, "cpu")
    assert isinstance(runner.model, BinnedSegmentationNCA)
    assert runner.in_channels == 1 and runner.cfg.in_channels == 5
    # the bins are computed inside the model: the plain NCA on image + bins gives the same logits
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = SegmentationNCA(runner.cfg)
    plain.load_state_dict(runner.model.state_dict())
    torch.manual_seed(0)
    ours = runner.model(image).logits
    torch.manual_seed(0)
    theirs = plain(intensity_bins(image, 4, 0.0, 1.0)).logits
    torch.testing.assert_close(ours, theirs)
    # animate's step-by-step states start from the image and its bins too
    level, step, first = next(iter(runner.model.states(image)))
    assert (level, step) == (0, 0) and first.shape[1] == runner.cfg.channels
    torch.testing.assert_close(first[:, :5], intensity_bins(image, 4, 0.0, 1.0))

    # predict takes the plain one-channel image and writes a mask of its size
    inputs = tmp_path / "in"
    write_image(
        Image.from_array(np.random.default_rng(0).random((20, 18), dtype=np.float32)),
        inputs / "a_0000.nii.gz",
    )
    result = cli.invoke(app, ["predict", "-c", str(ckpt), "-i", str(inputs), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "out" / "a.nii.gz").spatial_shape == (20, 18)
