"""The inference runtime: checkpoints of every task load through one path, old runs keep working,
and a checkpoint file cannot run code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_toy_dataset
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import read_image
from ncatool.errors import NcaError
from ncatool.runtime import load, load_checkpoint, read_checkpoint
from ncatool.tasks import TASKS

FIXTURES = Path(__file__).parent / "fixtures" / "main_2f367d7"
runner = CliRunner()


def _same_pixels(expected: Path, produced: Path) -> None:
    a, b = read_image(expected).array, read_image(produced).array
    assert a.shape == b.shape
    assert np.array_equal(a, b), f"{produced.name}: {(a != b).sum()} pixels differ from {expected}"


@pytest.mark.parametrize("task", ["seg2d", "seg3d"])
def test_old_segmentation_checkpoint_predicts_as_it_did(task: str, tmp_path: Path) -> None:
    """A checkpoint written before settings were renamed (``padding`` → ``border``) predicts the
    same masks as the ncatool that wrote it."""
    image = FIXTURES / "inputs" / f"toy{task[3:]}_0000.nii.gz"
    result = runner.invoke(
        app, ["-q", "predict", "-c", str(FIXTURES / task / "last.pt"), "-i", str(image), "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    name = f"toy{task[3:]}.nii.gz"
    _same_pixels(FIXTURES / "expected" / task / name, tmp_path / name)


def test_old_generation_checkpoints_predict_as_they_did(tmp_path: Path) -> None:
    """``grow`` (old ``filter``/``steps`` keys) and ``digits`` (old ``filter``) checkpoints grow the
    same pictures as before."""
    for task, extra in (("grow", ["--samples", "2"]), ("digits", ["--samples", "1", "--labels", "0,7"])):
        out = tmp_path / task
        result = runner.invoke(
            app, ["-q", "predict", "-c", str(FIXTURES / task / "last.pt"), "-o", str(out), *extra]
        )
        assert result.exit_code == 0, result.output
        expected = sorted((FIXTURES / "expected" / task).iterdir())
        assert [p.name for p in expected] == sorted(p.name for p in out.iterdir())
        for path in expected:
            _same_pixels(path, out / path.name)


def test_old_config_names_are_renamed() -> None:
    """The saved config's old names map to the current vocabulary."""
    seg = load_checkpoint(FIXTURES / "seg2d" / "last.pt").config
    assert seg.border == json.loads((FIXTURES / "seg2d" / "config.json").read_text())["padding"]
    grow = load_checkpoint(FIXTURES / "grow" / "last.pt").config
    old = json.loads((FIXTURES / "grow" / "config.json").read_text())
    assert grow.train_steps == tuple(old["steps"]) and grow.filters == tuple(old["filter"].split(","))


def test_old_checkpoints_evaluate_and_resume(tmp_path: Path) -> None:
    """An old seg3d run evaluates its stored validation split and resumes for another epoch; an old
    grow run (with its sample pool) resumes too."""
    data = write_toy_dataset(tmp_path / "raw", 3, cases=4, size=16)  # the data the fixture was trained on
    ev = runner.invoke(
        app, ["-q", "eval", "-c", str(FIXTURES / "seg3d" / "last.pt"), "--data", str(data), "--json"]
    )
    assert ev.exit_code == 0, ev.output
    assert 0.0 <= json.loads(ev.stdout)["foreground_mean"]["Dice"] <= 1.0
    for task, data_path in (("seg3d", str(data)), ("grow", "")):
        run = tmp_path / task
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(FIXTURES / task / "last.pt", run / "checkpoints" / "last.pt")
        config = json.loads((FIXTURES / task / "config.json").read_text())
        config.update(data=data_path, epochs=3)
        (run / "config.json").write_text(json.dumps(config))
        result = runner.invoke(app, ["-q", "train", "--resume", str(run)], env={"NCATOOL_NO_PROGRESS": "1"})
        assert result.exit_code == 0, result.output
        assert read_checkpoint(run / "checkpoints" / "last.pt")["run_state"]["epoch"] == 3


def test_every_task_has_a_runner() -> None:
    """The registry resolves every member of every task (a typo fails here, not in a user's run)."""
    from ncatool.tasks import _member

    for name in TASKS:
        for which in ("config", "task", "runner"):
            assert _member(name, which) is not None


def test_load_returns_a_runner_of_the_checkpoints_task() -> None:
    for task in ("seg2d", "grow", "digits"):
        r = load(FIXTURES / task / "last.pt", device="cpu")
        assert r.task == task and r.device == torch.device("cpu")


class _Evil:
    """Unpickling this calls ``open(path, "w")``: a stand-in for ``os.system``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ncatool-checkpoint-1", "task": "seg2d", "payload": _Evil(str(victim))}, evil)
    with pytest.raises(NcaError, match="not a safe ncatool checkpoint"):
        read_checkpoint(evil)
    assert not victim.exists()
    env = {**os.environ, "NCATOOL_NO_PROGRESS": "1"}
    for cmd in (["predict", "-c", str(evil), "-o", str(tmp_path / "o")], ["eval", "-c", str(evil)]):
        proc = subprocess.run(
            [sys.executable, "-m", "ncatool", *cmd], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 2, proc.stderr
        assert "not a safe ncatool checkpoint" in proc.stderr and "Traceback" not in proc.stderr
        assert not victim.exists()
