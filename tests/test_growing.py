"""Growing NCA: target loading, seed, sample pool (replacement, damage), filters, losses, CLI smoke."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_GROW
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.data.io import Image, write_image
from ncatool.image_losses import IMAGE_LOSSES, image_loss, masked_psnr, per_sample_loss, psnr, ssim
from ncatool.models.filters import FIXED_FILTERS
from ncatool.models.growing import SamplePool, circle_masks, make_seed
from ncatool.tasks.growing import DEFAULT_TARGET, GrowConfig, GrowTask, flat_disc, load_target
from ncatool.train import Trainer

runner = CliRunner()
TINY = TINY_GROW


# ----------------------------------------------------------------------------------- losses
def test_losses_on_a_hand_computed_case() -> None:
    pred = torch.tensor([[[[0.0, 0.5], [1.0, 0.2]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]], [[[0.1, 0.1], [0.1, 0.4]]]])
    # sample 0: |diff| = 0, 0.5, 0, 0.2 ; sample 1: |diff| = 0, 0, 0, 0.3
    expected = {
        "L2": [(0.25 + 0.04) / 4, 0.09 / 4],
        "L1": [0.7 / 4, 0.3 / 4],
        "Manhattan": [0.7, 0.3],
        "Hinge": [(0.4 + 0.1) / 4, 0.2 / 4],  # margin 0.1
    }
    for name in IMAGE_LOSSES:
        got = per_sample_loss(name, pred, target, margin=0.1)
        torch.testing.assert_close(got, torch.tensor(expected[name]), msg=name)
        torch.testing.assert_close(image_loss(name.lower(), pred, target, margin=0.1), got.mean())
    # Manhattan is L1 times the number of elements; Hinge with margin 0 is L1
    n = pred[0].numel()
    torch.testing.assert_close(
        per_sample_loss("Manhattan", pred, target), n * per_sample_loss("L1", pred, target)
    )
    torch.testing.assert_close(
        per_sample_loss("Hinge", pred, target, margin=0.0), per_sample_loss("L1", pred, target)
    )
    with pytest.raises(ValueError, match="unknown loss"):
        per_sample_loss("L3", pred, target)
    with pytest.raises(ValueError, match="differ in shape"):
        per_sample_loss("L2", pred, target[:, :, :1])


def test_psnr() -> None:
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 2.0)])  # 2.0 is clipped to 1
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 0.0]))
    assert psnr(target, target, max_db=60.0).tolist() == [60.0, 60.0]


# ----------------------------------------------------------------------------------- seed, pool
def test_seed_is_one_live_cell() -> None:
    seed = make_seed(16, 9, 8)
    assert seed.shape == (16, 9, 8)
    assert seed[3:, 4, 4].tolist() == [1.0] * 13 and seed[:3].abs().sum() == 0
    assert seed.sum() == 13


def test_pool_replaces_the_worst_with_the_seed_and_commits() -> None:
    seed = make_seed(5, 6, 6)
    pool = SamplePool(seed, 10)
    pool.states = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 5, 6, 6).clone()  # entry i is all i
    torch.manual_seed(0)
    idx, x = pool.sample(4, lambda s: s.flatten(1).mean(1))  # loss = the entry's value
    values = pool.states[idx, 0, 0, 0]
    assert values.tolist() == sorted(values.tolist(), reverse=True)  # worst first
    torch.testing.assert_close(x[0], seed)  # the worst was replaced by the seed ...
    for i in range(1, 4):  # ... the others are untouched copies
        torch.testing.assert_close(x[i], pool.states[idx[i]])
    assert len(set(idx.tolist())) == 4
    before = pool.states.clone()
    pool.commit(idx, torch.full_like(x, -1.0))
    assert (pool.states[idx] == -1).all()
    others = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(pool.states[others], before[others])
    # a non-finite state goes back to the seed, not into the pool
    bad = torch.full_like(x, 7.0)
    bad[1, 2, 3, 3] = float("nan")
    pool.commit(idx, bad)
    torch.testing.assert_close(pool.states[idx[1]], seed)
    assert (pool.states[idx[0]] == 7).all()


def test_pool_damages_only_the_best() -> None:
    pool = SamplePool(make_seed(5, 16, 16), 8)
    pool.states = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 5, 16, 16).clone()
    torch.manual_seed(1)
    idx, x = pool.sample(6, lambda s: s.flatten(1).mean(1), damage_n=2, radius=(0.3, 0.4))
    for i in range(1, 4):  # middle entries: untouched
        torch.testing.assert_close(x[i], pool.states[idx[i]])
    for i in (4, 5):  # the two lowest-loss entries: a hole of zeros in every channel, the rest kept
        hole = (x[i] == 0).all(0)
        assert 0 < hole.sum() < 16 * 16 * 0.6
        assert torch.equal(x[i][:, ~hole], pool.states[idx[i]][:, ~hole])
    # the reseeded worst is never damaged, even when damage_n covers the whole batch
    idx, x = pool.sample(3, lambda s: s.flatten(1).mean(1), damage_n=5)
    torch.testing.assert_close(x[0], pool.seed)


def test_circle_masks_are_circles_of_the_asked_radius() -> None:
    torch.manual_seed(0)
    m = circle_masks(50, 41, 41, radius=(0.2, 0.2))
    holes = (m == 0).flatten(1).sum(1).float()
    area = math.pi * (0.2 * 20) ** 2  # radius 0.2 of the half-width (20 pixels)
    assert holes.min() > 0.7 * area and holes.max() < 1.3 * area


def test_pool_state_round_trip() -> None:
    pool = SamplePool(make_seed(5, 4, 4), 3)
    pool.states.normal_()
    other = SamplePool(make_seed(5, 4, 4), 3)
    other.load_state_dict(pool.state_dict())
    assert torch.equal(other.states, pool.states)
    with pytest.raises(ValueError, match="shape"):
        SamplePool(make_seed(5, 4, 4), 2).load_state_dict(pool.state_dict())


# ----------------------------------------------------------------------------------- target
def test_shipped_target_is_premultiplied_rgba() -> None:
    t = load_target(DEFAULT_TARGET, img_size=20, padding=3)
    assert t.shape == (4, 26, 26)
    assert (t[:, :3] == 0).all() and (t[:, -3:] == 0).all()  # transparent padding
    assert (t[:3] <= t[3:4] + 1e-6).all()  # premultiplied: colour <= alpha
    assert t[3, 13, 13] > 0.99 and t[0, 13, 13] > t[2, 13, 13]  # opaque, reddish centre


def test_gray_target_alpha_from_threshold_mask_and_nifti_slice(tmp_path: Path) -> None:
    img = np.zeros((10, 20), np.uint8)
    img[2:8, 4:16] = 200
    img[4:6, 8:12] = 0  # a dark hole, filled by fill_holes
    write_image(Image.from_array(img), tmp_path / "g.png")
    t = load_target(tmp_path / "g.png", img_size=20, padding=0)
    assert t.shape == (4, 20, 20)
    assert t[3, 10, 10] == 1.0 and t[3, 0, 0] == 0.0  # aspect kept: 10 rows centred in 20
    no_fill = load_target(tmp_path / "g.png", img_size=20, padding=0, fill_holes=False)
    assert no_fill[3, 10, 10] == 0.0
    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 1
    write_image(Image.from_array(mask), tmp_path / "m.png")
    tm = load_target(tmp_path / "g.png", img_size=20, padding=0, mask=tmp_path / "m.png")
    assert tm[3, 10, 2] == 1.0 and tm[3, 10, 17] == 0.0
    vol = np.zeros((5, 12, 12), np.float32)
    vol[2, 3:9, 3:9] = 5.0
    write_image(Image.from_array(vol), tmp_path / "v.nii.gz")
    tv = load_target(tmp_path / "v.nii.gz", img_size=12, padding=1)  # middle slice = 2
    assert tv.shape == (4, 14, 14) and tv[3, 7, 7] == 1.0 and tv[3, 2, 2] == 0.0


# ----------------------------------------------------------------------------------- filters, model
@pytest.mark.parametrize("name", [*FIXED_FILTERS, "learned", "sobel,laplacian"])
def test_each_filter_grows_and_learns(name: str) -> None:
    cfg = build_config(GrowConfig, {**dict(i.split("=") for i in TINY), "filters": name, "samples": 0})
    task = GrowTask(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.batches(0, 4)))
    loss, logs = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(logs["psnr"])
    assert model.rule.fc1.weight.grad.abs().sum() > 0
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    # alive masking: life spreads at most one cell per step from the seed (centre 6 of 12)
    with torch.no_grad():
        out = model(task.seed[None], 3)[0]
    assert out[:, :3].abs().sum() == 0 and out[:, :, :3].abs().sum() == 0
    assert out[:, 3:10, 3:10].abs().sum() > 0


def test_bad_grow_settings_are_rejected(tmp_path: Path) -> None:
    from ncatool.errors import NcaError

    for bad, needle in [
        ({"filters": "sobel,edgy"}, "filters"),
        ({"loss": "L3"}, "unknown loss"),
        ({"pool_size": 4, "batch_size": 8}, "pool_size"),
        ({"train_steps": "9,5"}, "train_steps"),
        ({"data": str(tmp_path / "none.png")}, "does not exist"),
    ]:
        with pytest.raises(NcaError, match=needle):
            GrowTask(build_config(GrowConfig, bad), torch.device("cpu"))


# ----------------------------------------------------------------------------------- loop + CLI
def test_resume_is_exact_and_restores_the_pool(tmp_path: Path) -> None:
    def make(epochs: int) -> GrowTask:
        values = {**dict(i.split("=") for i in TINY), "epochs": epochs, "samples": 0, "damage": True}
        return GrowTask(build_config(GrowConfig, values), torch.device("cpu"))

    full = Trainer(make(2), tmp_path / "full", torch.device("cpu"))
    full.fit()
    Trainer(make(1), tmp_path / "cut", torch.device("cpu")).fit()
    resumed_task = make(2)
    assert not torch.equal(resumed_task.pool.states, full.task.pool.states)
    resumed = Trainer(resumed_task, tmp_path / "cut", torch.device("cpu"))
    resumed.resume()
    assert resumed.state.epoch == 1 and not torch.equal(resumed_task.pool.states, resumed_task.pool.seed)
    resumed.fit()
    assert torch.equal(resumed_task.pool.states, full.task.pool.states)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_grow_cli_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--task", "grow", "--out", str(out), "--epochs", "2", "--json"]
    for item in [*TINY, "samples=1", "damage=true", "loss=Hinge", "filters=scharr"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and math.isfinite(summary["best_psnr"])
    last = summary["last"]
    assert {"train_loss", "train_psnr", "val_psnr", "val_psnr_long", "val_psnr_regrow"} <= set(last)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["val_psnr"] > history[0]["val_psnr"]  # it learned
    for name in [
        "config.json",
        "loss_curve.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "samples/epoch_002.png",
    ]:
        assert (out / name).is_file(), name
    # resuming a finished run with more epochs continues from the saved pool
    more = runner.invoke(app, ["train", "--resume", str(out), "--set", "epochs=3"])
    assert more.exit_code == 0, more.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------- honest metrics
def test_ssim_and_masked_psnr_on_hand_computed_cases() -> None:
    a = torch.full((1, 2, 12, 12), 0.2)
    b = torch.full((1, 2, 12, 12), 0.6)
    c1 = 0.01**2  # flat images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), the structure term is 1
    expected = torch.tensor([(2 * 0.12 + c1) / (0.04 + 0.36 + c1)])
    torch.testing.assert_close(ssim(a, b), expected, rtol=1e-3, atol=0)  # float32 variances ~1e-8
    torch.testing.assert_close(ssim(b, b), torch.tensor([1.0]))
    noisy = b + 0.1 * torch.randn_like(b)
    assert ssim(noisy, b) < ssim(b + 0.01 * torch.randn_like(b), b) < 1.0
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[:4] = True
    pred = b.clone()
    pred[..., :4, :] += 0.1  # error 0.1 only inside the mask: PSNR 20 dB there, 20 + 10 log10(3) overall
    torch.testing.assert_close(masked_psnr(pred, b, mask), torch.tensor([20.0]))
    torch.testing.assert_close(psnr(pred, b), torch.tensor([20.0 + 10 * math.log10(3.0)]))
    with pytest.raises(ValueError, match="non-empty"):
        masked_psnr(pred, b, torch.zeros(12, 12, dtype=torch.bool))


def test_flat_disc_keeps_alpha_and_the_mean_colour() -> None:
    target = torch.zeros(4, 6, 6)
    target[3, 1:4, 1:4] = 1.0
    target[0, 1:4, 1:4] = torch.linspace(0.0, 1.0, 9).view(3, 3)  # red varies, mean 0.5
    target[1, 1:4, 1:4] = 0.25
    disc = flat_disc(target)
    assert torch.equal(disc[3], target[3])
    torch.testing.assert_close(disc[0, 1:4, 1:4], torch.full((3, 3), 0.5))
    torch.testing.assert_close(disc[1], target[1])
    assert disc[2].abs().sum() == 0


def test_eval_reports_other_seeds_a_curve_and_the_trivial_baselines() -> None:
    values = {**dict(i.split("=") for i in TINY), "img_size": 10, "samples": 0, "damage": True}
    task = GrowTask(build_config(GrowConfig, values), torch.device("cpu"))
    torch.manual_seed(1)
    model = task.build_model()
    with torch.no_grad():  # a rule that does something (a fresh one starts at zero)
        model.rule.fc1.weight.normal_(0.0, 0.1)
        val, test, again = task.validate(model), task.test(model), task.test(model)
    assert test == again  # seeded
    steps = task.val_steps
    curve = {f"psnr_at_{s}" for s in sorted({max(1, round(f * steps)) for f in (0.5, 1, 2, 4)})}
    assert {"psnr", "psnr_alpha", "ssim", "psnr_long", "psnr_regrow", "psnr_alpha_regrow"} | curve <= set(
        test
    )
    assert test[f"psnr_at_{steps}"] == test["psnr"]
    assert test["psnr"] != val["psnr"]  # other fire masks than the validation that chose best.pt
    base = task.baselines()
    assert base["flat_disc"]["psnr"] > base["empty"]["psnr"]
    assert base["flat_disc"]["psnr_alpha"] > base["empty"]["psnr_alpha"]
    target = task.target[None]
    assert base["empty"]["psnr"] == pytest.approx(float(psnr(torch.zeros_like(target), target)), abs=1e-4)


def test_grow_eval_cli_prints_baselines(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--task", "grow", "--out", str(out), "--epochs", "1", "--set", "samples=0"]
    for item in TINY:
        args += ["--set", item]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["eval", "-c", str(out / "checkpoints" / "best.pt"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"flat_disc", "empty"} == set(summary["baselines"])
    assert "psnr_alpha" in summary["metrics"] and "psnr_alpha" in summary["baselines"]["flat_disc"]


# ----------------------------------------------------------------------------------- Growing NCA's recipe
def test_step_schedule_and_per_parameter_gradient_normalisation(tmp_path: Path) -> None:
    values = {**dict(i.split("=") for i in TINY), "samples": 0, "epochs": 2, "iters_per_epoch": 3}
    cfg = build_config(
        GrowConfig,
        {**values, "lr": 0.01, "lr_schedule": "step", "lr_milestones": "2,5", "grad_normalize": True},
    )
    trainer = Trainer(GrowTask(cfg, torch.device("cpu")), tmp_path / "run", torch.device("cpu"))
    seen: list[tuple[float, list[float]]] = []

    def spy(optimizer: torch.optim.Optimizer, *_: object) -> None:
        norms = [float(p.grad.norm()) for p in trainer.model.parameters() if p.grad is not None]
        seen.append((optimizer.param_groups[0]["lr"], norms))

    trainer.optimizer.register_step_pre_hook(spy)
    trainer.fit()
    assert [lr for lr, _ in seen] == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001, 0.0001])
    for _, norms in seen[1:]:  # the rule's last layer has a gradient from the first step on
        assert norms == pytest.approx([1.0] * len(norms), abs=1e-4)  # norm / (norm + 1e-8)
    # the schedule's position survives a resume: 6 steps done, the next is at 0.0001
    resumed = Trainer(
        GrowTask(replace(cfg, epochs=3), torch.device("cpu")), tmp_path / "run", torch.device("cpu")
    )
    resumed.resume()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)


def test_unknown_lr_schedule_is_refused(tmp_path: Path) -> None:
    args = ["train", "--task", "grow", "--out", str(tmp_path / "r"), "--set", "lr_schedule=cosine"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "lr_schedule must be plateau or step" in result.stderr
