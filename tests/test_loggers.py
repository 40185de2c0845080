"""``logger=tensorboard``: scalars per epoch and the sample pictures in RUN/tensorboard (issue 16, item 6)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import TINY_GROW
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.errors import NcaError
from ncatool.loggers import RunLogger, TensorBoardLogger, make_logger

runner = CliRunner()


def _grow(out: Path, *extra: str) -> object:
    sets = [x for item in [*TINY_GROW, *extra] for x in ("--set", item)]
    return runner.invoke(app, ["-q", "train", "--task", "grow", "--epochs", "2", "--device", "cpu",
                               "--out", str(out), *sets])  # fmt: skip


def test_tensorboard_run_logs_scalars_per_epoch_and_the_sample_pictures(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _grow(tmp_path / "run", "logger=tensorboard", "samples=1")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/psnr", "val/psnr", "lr", "seconds"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert tags["images"] == ["samples"] and [e.step for e in events.Images("samples")] == [1, 2]


def test_no_logger_writes_no_event_files(tmp_path: Path) -> None:
    result = _grow(tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert type(make_logger("none", tmp_path)) is RunLogger


def test_missing_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(NcaError, match=r"pip install 'ncatool\[tensorboard\]'"):
        make_logger("tensorboard", tmp_path)
    result = _grow(tmp_path / "run", "logger=tensorboard")
    assert result.exit_code == 2 and "ncatool[tensorboard]" in result.output


def test_unknown_logger_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(NcaError, match="none, tensorboard"):
        make_logger("wandb", tmp_path)


def test_tags_group_train_and_val() -> None:
    assert [TensorBoardLogger.tag(k) for k in ("train_loss", "val_dice_train_res", "lr")] == [
        "train/loss",
        "val/dice_train_res",
        "lr",
    ]
