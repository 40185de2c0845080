"""The training loop: guards, checkpoints, exact resume, config, CLI smoke per task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.errors import NcaError
from ncatool.runtime import read_checkpoint as load_checkpoint_file
from ncatool.tasks.segmentation import Seg2DConfig, SegmentationTask
from ncatool.train import Trainer

runner = CliRunner()
TINY_2D = ["steps=4,4", "hidden=16", "channels=8", "target_size=16,16", "patch=0,8", "scale=2", "kernels=3,3"]
TINY_3D = ["steps=3,3", "hidden=8", "channels=6", "target_size=12,12,12", "patch=0,8", "kernels=3,3"]


def _task(ds: Path, **kw: object) -> SegmentationTask:
    values = {"data": str(ds), "epochs": 2, "batch_size": 2, "samples": 0}
    values.update(kw)
    overrides = dict(item.split("=") for item in TINY_2D)
    cfg = build_config(Seg2DConfig, {**overrides, **values})
    return SegmentationTask(cfg, torch.device("cpu"))


def test_nan_guard_skips_then_rolls_back(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    task = _task(toy_dataset(2), nan_patience=3, epochs=2, iters_per_epoch=4)
    real_loss = task.loss
    calls = {"n": 0}

    def flaky(model: torch.nn.Module, batch: object) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        loss, logs = real_loss(model, batch)
        # epoch 1 is clean (a checkpoint exists); all of epoch 2 is NaN
        return (loss * float("nan"), logs) if calls["n"] > 4 else (loss, logs)

    task.loss = flaky  # type: ignore[method-assign]
    trainer = Trainer(task, tmp_path / "run", torch.device("cpu"))
    summary = trainer.fit()
    assert summary["nan_skips"] == 4
    assert summary["rollbacks"] == 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(task.config.lr / 2)
    good = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_non_finite_model_is_never_checkpointed(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    trainer = Trainer(_task(toy_dataset(2)), tmp_path / "run", torch.device("cpu"))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    assert trainer.save_checkpoint("last") is None
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_oom_guard_halves_batch_then_gives_up(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    task = _task(toy_dataset(2), batch_size=4, epochs=1, iters_per_epoch=2)
    real_loss = task.loss
    seen: list[int] = []

    def oom_when_big(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> object:
        seen.append(batch[0].shape[0])
        if batch[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_loss(model, batch)

    task.loss = oom_when_big  # type: ignore[method-assign]
    trainer = Trainer(task, tmp_path / "run", torch.device("cpu"))
    assert trainer.fit()["batch_size"] == 1
    assert seen[:2] == [4, 2] and set(seen[2:]) == {1}

    def always_oom(model: torch.nn.Module, batch: object) -> object:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    task2 = _task(toy_dataset(2), batch_size=2, epochs=1)
    task2.loss = always_oom  # type: ignore[method-assign]
    with pytest.raises(NcaError, match="out of memory even at batch size 1"):
        Trainer(task2, tmp_path / "run2", torch.device("cpu")).fit()
    assert task2.patch == (0, 8)  # the patch was halved (16 -> 8 is the floor) before giving up


def test_checkpoint_round_trip(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    task = _task(toy_dataset(2), epochs=1)
    trainer = Trainer(task, tmp_path / "run", torch.device("cpu"))
    trainer.fit()
    other = Trainer(task, tmp_path / "other", torch.device("cpu"))
    other.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for (k, a), b in zip(trainer.model.state_dict().items(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert other.state.epoch == 1
    payload = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["config"]["task"] == "seg2d" and payload["task_state"]["model"]["n_out"] == 1


def _train_cmd(ds: Path, out: Path, epochs: int) -> list[str]:
    cmd = [sys.executable, "-m", "ncatool", "-q", "train", "--task", "seg3d", "--data", str(ds)]
    cmd += ["--out", str(out), "--epochs", str(epochs), "--batch-size", "2", "--seed", "5"]
    for item in [*TINY_3D, "iters_per_epoch=2", "samples=0"]:
        cmd += ["--set", item]
    return cmd


def test_sigkill_and_resume_equals_uninterrupted(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    """Killed mid-run and resumed, three times: every time the exact weights of the uninterrupted run.

    With the fused kernels on (wherever they build) at the default thread count: their d weight was
    summed per OpenMP thread over whichever batch items the thread took, so a thread that started
    late changed the rounding (seg3d resumes 1e-7 off in 2 of 6 tries). Batch 2: an item per thread.
    """
    ds = toy_dataset(3, cases=4, size=16)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NCATOOL_KERNELS")}
    epochs = 4
    full = tmp_path / "full"
    subprocess.run(_train_cmd(ds, full, epochs), check=True, env=env, capture_output=True)
    expected = load_checkpoint_file(full / "checkpoints" / "last.pt")["model"]

    for attempt in range(3):
        killed = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(_train_cmd(ds, killed, epochs), env=env, stderr=subprocess.PIPE)
        last = killed / "checkpoints" / "last.pt"
        deadline = time.time() + 120
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_at_kill = load_checkpoint_file(last)["run_state"]["epoch"]
        assert done_at_kill < epochs, "the run finished before it could be killed"

        resume = [sys.executable, "-m", "ncatool", "-q", "train", "--resume", str(killed)]
        subprocess.run(resume, check=True, env=env, capture_output=True)
        b = load_checkpoint_file(last)
        assert b["run_state"]["epoch"] == epochs
        for key, tensor in expected.items():
            assert torch.equal(tensor, b["model"][key]), f"try {attempt} (killed at {done_at_kill}): {key}"
        lines = (killed / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == list(range(1, epochs + 1))


@pytest.mark.parametrize(("task", "dim", "tiny"), [("seg2d", 2, TINY_2D), ("seg3d", 3, TINY_3D)])
def test_train_cli_smoke(
    task: str, dim: int, tiny: list[str], toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    ds = toy_dataset(dim, size=16)
    out = tmp_path / "run"
    args = ["train", "--task", task, "--data", str(ds), "--out", str(out), "--epochs", "2", "--json"]
    for item in [*tiny, "samples=1"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2
    # it learned: an untrained model (zero-initialised last layer) predicts nothing, Dice 0; the loss falls
    assert summary["best_val_dice"] > 0.5 and summary["best_dice_train_res"] > 0.5
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    for name in [
        "config.json",
        "metrics.jsonl",
        "loss_curve.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "samples/epoch_002.png",
    ]:
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # the saved config reproduces the run's settings
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == task and cfg["epochs"] == 2
    again = runner.invoke(
        app,
        ["train", "--config", str(out / "config.json"), "--out", str(tmp_path / "again"), "--epochs", "1"],
    )
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["steps"] == cfg["steps"]


def test_toml_config_and_overrides(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    ds = toy_dataset(2, size=16)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'task = "seg2d"\ndata = "{ds}"\n[model]\nsteps = [4, 4]\nhidden = 16\nchannels = 8\n'
        "kernels = [3, 3]\nscale = 2\n[train]\nepochs = 3\ntarget_size = [16, 16]\npatch = [0, 8]\n"
    )
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--epochs", "1", "--set", "hidden=12"]
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["hidden"] == 12 and cfg["steps"] == [4, 4]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--task", "nope"], "is not one of"),  # a usage error: --help lists the tasks
        (["--task", "seg2d", "--set", "bogus=1"], "bogus"),
        (["--task", "seg2d", "--set", "steps=a,b"], "steps"),
        (["--task", "seg2d"], "--data"),
        (["--task", "seg2d", "--data", "/does/not/exist"], "/does/not/exist"),
        (["--config", "/no/such.toml"], "/no/such.toml"),
    ],
)
def test_train_bad_input_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # nothing half-written: not even the run folder


def test_time_limit_stops_after_the_epoch_that_reaches_it(
    toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    task = _task(toy_dataset(2), epochs=5, time_limit=1e-6)
    summary = Trainer(task, tmp_path / "run", torch.device("cpu")).fit()
    assert summary["epochs"] == 1


def test_common_crop_cuts_mixed_sizes_to_the_smallest() -> None:
    from ncatool.tasks.segmentation import common_crop

    torch.manual_seed(0)
    big = torch.arange(10 * 7 * 6, dtype=torch.float32).reshape(1, 10, 7, 6)
    small = torch.zeros(1, 9, 7, 8)
    items = common_crop([(big, big[0].long()), (small, small[0].long())])
    assert [tuple(img.shape) for img, _ in items] == [(1, 9, 7, 6), (1, 9, 7, 6)]
    img, lab = items[0]
    # a contiguous window of the original, the label cut at the same place
    z0 = int(img[0, 0, 0, 0]) // (7 * 6)
    torch.testing.assert_close(img, big[:, z0 : z0 + 9])
    torch.testing.assert_close(lab, big[0, z0 : z0 + 9].long())
    same = [(big, big[0].long())] * 2
    assert common_crop(same) is same


def test_seg3d_trains_on_cases_of_different_sizes_without_resizing(tmp_path: Path) -> None:
    from ncatool.data.io import Image, write_image

    ds = tmp_path / "Dataset001_Slabs"
    rng = np.random.default_rng(0)
    for i, depth in enumerate((5, 6, 7, 6)):
        mask = np.zeros((depth, 10, 9), dtype=np.uint8)
        mask[1:-1, 2:7, 3:6] = 1
        image = (mask + rng.normal(0, 0.1, mask.shape)).astype(np.float32)
        write_image(Image.from_array(image), ds / "imagesTr" / f"slab_{i}_0000.nii.gz")
        write_image(Image.from_array(mask), ds / "labelsTr" / f"slab_{i}.nii.gz")
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "box": 1}, "numTraining": 4}
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    args = ["train", "--task", "seg3d", "--data", str(ds), "--out", str(tmp_path / "run"), "--epochs", "1"]
    args += ["-b", "3", "--json"]
    for item in [*TINY_3D[:3], "target_size=none", "patch=0,0", "samples=0", "val_fraction=0.25"]:
        args += ["--set", item]
    # level 0 (half size: 2-3 slices) is too thin for the default 7-voxel kernel: a clear error
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "too small for its 7-voxel kernel" in result.output.replace("\n", "")
    result = runner.invoke(app, [*args, "--set", "kernels=3,3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1
