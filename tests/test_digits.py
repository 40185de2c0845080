"""Class-conditional digits: data readers, conditioning, multi-step loss, evaluation, CLI smoke."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.errors import NcaError
from ncatool.models.growing import ConditionalNCA
from ncatool.models.nca import NCAConfig
from ncatool.tasks.digits import (
    DigitsConfig,
    DigitsTask,
    evaluate_generated,
    load_digit_images,
    resolved_loss_steps,
    train_classifier,
)
from ncatool.train import Trainer

runner = CliRunner()
TINY = TINY_DIGITS


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_shipped_digits() -> None:
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.dtype == np.float32 and images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_mnist_idx_and_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labs = np.array([0, 3, 9, 1, 3], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labs)
    for source in (tmp_path, tmp_path / "train-images-idx3-ubyte.gz"):
        x, y = load_digit_images(source)
        np.testing.assert_allclose(x, imgs / 255.0, rtol=1e-6)
        assert y.tolist() == labs.tolist()
    np.savez(tmp_path / "m.npz", x_train=imgs, y_train=labs)
    x, y = load_digit_images(tmp_path / "m.npz")
    np.testing.assert_allclose(x, imgs / 255.0, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", foo=imgs)
    with pytest.raises(NcaError, match="x_train"):
        load_digit_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "badlab.npz", images=imgs, labels=labs + 7)
    with pytest.raises(NcaError, match=r"0\.\.9"):
        load_digit_images(tmp_path / "badlab.npz")
    (tmp_path / "junk-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(NcaError, match=r"labels file|magic"):
        load_digit_images(tmp_path / "junk-images-idx3-ubyte")


def test_conditional_model_depends_on_the_label() -> None:
    torch.manual_seed(0)
    cfg = NCAConfig(
        channels=6, fixed_channels=0, hidden=16, filters=("sobel",), fire_rate=1.0, cond_channels=4
    )
    model = ConditionalNCA(cfg, n_classes=10, embed_dim=4)
    torch.nn.init.normal_(model.nca.rule.fc1.weight, std=0.1)  # leave the zero-initialised identity
    x = torch.zeros(10, 6, 8, 8)
    x[:, 1:, 4, 4] = 1.0
    out = model(x, 5, torch.arange(10))
    assert out.shape == (10, 6, 8, 8)
    flat = out[:, 0].flatten(1)
    dist = torch.cdist(flat, flat)
    assert (dist + torch.eye(10)).min() > 1e-3  # every pair of labels grows something different
    torch.testing.assert_close(model(x[:2], 5, torch.tensor([3, 3]))[0], out[3])  # same label, same output
    with pytest.raises(ValueError, match="cond_channels"):
        ConditionalNCA(cfg, 10, embed_dim=5)


def test_loss_uses_the_intermediate_steps() -> None:
    assert resolved_loss_steps(build_config(DigitsConfig, {"steps": 32})) == (16, 24, 32)
    cfg = build_config(DigitsConfig, {**dict(i.split("=") for i in TINY), "loss_steps": "2,6", "samples": 0})
    task = DigitsTask(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    torch.nn.init.normal_(model.nca.rule.fc1.weight, std=0.1)
    images, labels = next(iter(task.batches(0, 4)))
    assert images.shape == (4, 1, 8, 8) and labels.shape == (4,)
    torch.manual_seed(1)
    loss, _ = task.loss(model, (images, labels))
    torch.manual_seed(1)
    _, states = model(task.seed.repeat(4, 1, 1, 1), 6, labels, return_states=True)
    expected = sum(((states[s - 1][:, :1] - images) ** 2).mean() for s in (2, 6)) / 2
    torch.testing.assert_close(loss, expected)
    with pytest.raises(NcaError, match="loss_steps"):
        DigitsTask(build_config(DigitsConfig, {"steps": 4, "loss_steps": "2,9"}), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["logreg", "cnn"])
def test_evaluation_recognises_real_digits(kind: str) -> None:
    cfg = build_config(DigitsConfig, {"img_size": 8})
    task = DigitsTask(cfg, torch.device("cpu"))
    clf = train_classifier(task.train_x, task.train_y, kind, seed=0, cnn_epochs=4)
    # "generated" = the class means: a perfect generator of the average digit
    means = task.class_means[task.val_y]
    res = evaluate_generated(means, task.val_x, task.val_y, task.class_means, clf)
    assert res["classifier_acc_real"] > 0.9
    assert res["recognised"] > 0.9 and res["mse_means"] == 0.0
    assert 0.5 < res["pixel_acc"] <= 1.0 and {f"pixel_acc_{k}" for k in range(10)} <= set(res)
    # blank images are recognised as (about) one class only and match no class mean
    blank = evaluate_generated(torch.zeros_like(means), task.val_x, task.val_y, task.class_means, clf)
    assert blank["recognised"] < 0.3 and blank["mse_means"] > 0.01


def test_digits_cli_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--task", "digits", "--out", str(out), "--epochs", "3", "--json"]
    for item in [*TINY, "samples=1", "val_max=40", "iters_per_epoch=4"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    last = summary["last"]
    assert 0.0 <= summary["best_pixel_acc"] <= 1.0
    assert {"val_recognised", "val_mse_means", "val_pixel_acc_0", "val_classifier_acc_real"} <= set(last)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learned
    assert (out / "samples" / "epoch_003.png").is_file() and (out / "checkpoints" / "best.pt").is_file()


# ----------------------------------------------------------------------- per-class pre-training
def _tiny_task(**values: object) -> DigitsTask:
    base = {**dict(i.split("=") for i in TINY), "samples": 0, "val_max": 20}
    return DigitsTask(build_config(DigitsConfig, {**base, **values}), torch.device("cpu"))


def test_pretraining_batches_hold_one_class_each_and_every_class_takes_turns() -> None:
    task = _tiny_task(pretrain_per_class=2, iters_per_epoch=10, epochs=4)
    for epoch in (0, 1):
        torch.manual_seed(epoch)
        labels = [batch[1] for batch in task.batches(epoch, 4)]
        assert len(labels) == 10 and all(len(set(y.tolist())) == 1 for y in labels)
        assert sorted(int(y[0]) for y in labels) == list(range(10))  # each class once per epoch
    torch.manual_seed(2)
    mixed = torch.cat([batch[1] for batch in task.batches(2, 4)])  # after the phase: classes mixed
    assert len(mixed) == 40 and len(set(mixed.tolist())) >= 5
    # fewer batches than classes: the turn carries over epochs, so all classes still get trained
    short = _tiny_task(pretrain_per_class=5, iters_per_epoch=2, epochs=6)
    seen = [int(batch[1][0]) for epoch in range(5) for batch in short.batches(epoch, 4)]
    assert seen == list(range(10))
    # one pass (iters_per_epoch=0): every training image exactly once, in one-class batches
    full = _tiny_task(pretrain_per_class=1, iters_per_epoch=0, max_items=120, epochs=2)
    batches = list(full.batches(0, 4))
    assert all(len(set(y.tolist())) == 1 for _, y in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(full.train_y.tolist())


def test_resume_across_the_pretraining_boundary_is_exact(tmp_path: Path) -> None:
    def trainer(name: str, epochs: int) -> Trainer:
        return Trainer(_tiny_task(pretrain_per_class=1, epochs=epochs), tmp_path / name, torch.device("cpu"))

    full = trainer("full", 3)
    full.fit()
    assert [r["train_one_class"] for r in full.state.history] == [1.0, 0.0, 0.0]
    trainer("cut", 1).fit()  # stops at the boundary: its one epoch was the one-class phase
    resumed = trainer("cut", 3)
    resumed.resume()
    assert resumed.state.epoch == 1
    resumed.fit()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [r["train_loss"] for r in resumed.state.history] == [r["train_loss"] for r in full.state.history]


def test_negative_pretraining_is_a_clear_error(tmp_path: Path) -> None:
    args = ["train", "--task", "digits", "--out", str(tmp_path / "run"), "--epochs", "3"]
    for item in [*TINY, "pretrain_per_class=-1"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pretrain_per_class must be >= 0" in lines[0] and "-1" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
