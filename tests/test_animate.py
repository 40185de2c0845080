"""``ncatool animate``: frame counts and sizes, 3D views, writers, damage, errors.

Checkpoints are built directly (tiny random models, no training) so every test runs in well under a
second; the last layer of each rule gets random weights so the states actually change.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

from ncatool.animate import frame_steps, load_source, render
from ncatool.cli import app
from ncatool.config import build_config
from ncatool.data.io import Image, read_image, write_image
from ncatool.models.growing import ConditionalNCA, growing_nca_config
from ncatool.models.nca import NCA, NCAConfig
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig
from ncatool.runtime import AnimateRequest, PredictRequest, checkpoint_payload, write_checkpoint
from ncatool.tasks import config_class
from ncatool.viz.text import FrameComposer

runner = CliRunner()


def _save(task: str, run: dict[str, Any], model: torch.nn.Module, state: dict[str, Any], path: Path) -> Path:
    """Write a checkpoint of ``model`` through the code training writes checkpoints with."""
    cfg = build_config(config_class(task), {**run, "task": task})
    return write_checkpoint(checkpoint_payload(cfg, model, state), path)


def _wake(model: torch.nn.Module) -> None:
    """Random last layers, so the (otherwise identity) dynamics change the state."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "fc1" in name:
            torch.nn.init.normal_(p, std=0.2)


def seg_checkpoint(tmp_path: Path, dim: int, in_channels: int = 1) -> Path:
    cfg = SegModelConfig(
        dim=dim,
        in_channels=in_channels,
        n_out=1,
        channels=6,
        hidden=8,
        levels=2,
        scale=2,
        steps=(3, 2),
        kernels=(3, 3),
        patch=(0, 0),
    )
    model = SegmentationNCA(cfg)
    _wake(model)
    task = "seg2d" if dim == 2 else "seg3d"
    run = {"target_size": [16] * dim if dim == 2 else [8, 10, 12], "normalization": "zscore"}
    return _save(task, run, model, {"model": cfg.__dict__}, tmp_path / f"{task}.pt")


def seg_input(tmp_path: Path, shape: tuple[int, ...], name: str = "img.nii.gz") -> Path:
    rng = np.random.default_rng(0)
    return write_image(Image.from_array(rng.normal(size=shape).astype(np.float32)), tmp_path / name)


def grow_checkpoint(tmp_path: Path) -> Path:
    nca = NCA(growing_nca_config(channels=8, hidden=16))
    _wake(nca)
    run = {"train_steps": [8, 12], "val_steps": 0, "img_size": 8, "padding": 4, "channels": 8, "hidden": 16}
    state = {"model": nca.cfg.__dict__, "target": torch.zeros(4, 16, 16)}
    return _save("grow", run, nca, state, tmp_path / "g.pt")


def digits_checkpoint(tmp_path: Path) -> Path:
    cfg = NCAConfig(
        channels=6, fixed_channels=0, hidden=16, filters=("sobel",), cond_channels=4, padding="zeros"
    )
    model = ConditionalNCA(cfg, 10, 4)
    _wake(model)
    run = {"steps": 6, "img_size": 8, "channels": 6, "hidden": 16, "embed_dim": 4, "border": "zeros"}
    state = {"model": {**cfg.__dict__, "embed_dim": 4}}
    return _save("digits", run, model, state, tmp_path / "d.pt")


def gif_frames(path: Path) -> list[np.ndarray]:
    with PILImage.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")))
    return out


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["-q", "animate", *args])


# ---------------------------------------------------------------------------------------------- frames
def test_frame_schedule() -> None:
    assert frame_steps(5, 2) == [0, 2, 4, 5]
    assert frame_steps(6, 2) == [0, 2, 4, 6]
    assert frame_steps(6, 4, extra=[3]) == [0, 3, 4, 6]
    for total in range(1, 12):
        for every in range(1, 7):
            assert len(frame_steps(total, every)) == 1 + math.ceil(total / every)


def test_seg2d_gif_frame_count_and_size(tmp_path: Path) -> None:
    ckpt = seg_checkpoint(tmp_path, 2)
    image = seg_input(tmp_path, (20, 24))
    out = tmp_path / "anim" / "seg.gif"
    result = invoke(
        "-c", str(ckpt), "-i", str(image), "-o", str(out), "--every", "2", "--scale", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    total = 3 + 2  # both levels' steps, in sequence
    assert summary["total_steps"] == total
    assert summary["frames"] == 1 + math.ceil(total / 2) == 4
    frames = gif_frames(out)
    assert len(frames) == 4
    width, height = summary["size"]
    assert all(f.shape == (height, width, 3) for f in frames)
    assert width >= 16 * 3 and height > 16 * 3  # the 16x16 model input, scaled 3x, under a header
    assert summary["steps_per_level"] == [3, 2]
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"
    with PILImage.open(out) as im:
        assert im.info.get("loop") == 0 and im.info.get("duration") == 100


def test_steps_override_and_hidden_panel(tmp_path: Path) -> None:
    ckpt = seg_checkpoint(tmp_path, 2)
    image = seg_input(tmp_path, (16, 16))
    plain = invoke("-c", str(ckpt), "-i", str(image), "-o", str(tmp_path / "a.gif"), "--scale", "4", "--json")
    more = invoke(
        "-c", str(ckpt), "-i", str(image), "-o", str(tmp_path / "b.gif"), "--scale", "4", "--json",
        "--steps", "4", "--hidden", "2", "--overlay", "prob",
    )  # fmt: skip
    assert plain.exit_code == 0 and more.exit_code == 0, more.output
    a, b = json.loads(plain.stdout), json.loads(more.stdout)
    assert b["total_steps"] == 8 and b["frames"] == 9 and len(gif_frames(tmp_path / "b.gif")) == 9
    assert b["size"][1] == a["size"][1]  # one row ...
    assert b["size"][0] >= 3 * 4 * 16  # ... of the image and two hidden-channel tiles


def test_seg3d_orthogonal_slice_and_montage(tmp_path: Path) -> None:
    ckpt = seg_checkpoint(tmp_path, 3)
    image = seg_input(tmp_path, (8, 10, 12))
    out = tmp_path / "vol.gif"
    result = invoke(
        "-c", str(ckpt), "-i", str(image), "-o", str(out), "--scale", "4", "--hidden", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["task"] == "seg3d" and summary["view"]["mode"] == "ortho"
    assert summary["frames"] == 1 + 5 and len(gif_frames(out)) == 6
    width, height = summary["size"]
    assert width >= 4 * 3 * 12  # three orthogonal panels side by side
    assert all(f.shape == (height, width, 3) for f in gif_frames(out))

    one = invoke(
        "-c",
        str(ckpt),
        "-i",
        str(image),
        "-o",
        str(out),
        "--scale",
        "2",
        "--axis",
        "2",
        "--slice",
        "5",
        "--json",
    )
    assert one.exit_code == 0, one.output
    s1 = json.loads(one.stdout)
    assert s1["view"] == {"mode": "slice", "axis": 2, "index": 5}
    assert s1["size"][0] < width

    mont = invoke("-c", str(ckpt), "-i", str(image), "-o", str(out), "--scale", "1", "--montage", "--json")
    assert mont.exit_code == 0, mont.output
    assert json.loads(mont.stdout)["view"]["mode"] == "montage"

    bad = invoke("-c", str(ckpt), "-i", str(image), "-o", str(out), "--axis", "0", "--slice", "99")
    assert bad.exit_code == 2 and "out of range" in bad.stderr


def test_multichannel_input_as_list_and_case_prefix(tmp_path: Path) -> None:
    ckpt = seg_checkpoint(tmp_path, 2, in_channels=2)
    c0 = seg_input(tmp_path, (16, 16), "case_0000.nii.gz")
    c1 = seg_input(tmp_path, (16, 16), "case_0001.nii.gz")
    for spec in (f"{c0},{c1}", str(tmp_path / "case"), str(c0)):
        result = invoke("-c", str(ckpt), "-i", spec, "-o", str(tmp_path / "m.gif"), "--scale", "1", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["input"] == [str(c0), str(c1)]
    one = invoke("-c", str(ckpt), "-i", str(tmp_path / "case_0001.nii.gz,"), "-o", str(tmp_path / "m.gif"))
    assert one.exit_code == 2 and "channel" in one.stderr


# ---------------------------------------------------------------------------------------------- writers
def test_frames_dir_writes_pngs(tmp_path: Path) -> None:
    ckpt = seg_checkpoint(tmp_path, 2)
    image = seg_input(tmp_path, (16, 16))
    frames = tmp_path / "frames"
    result = invoke(
        "-c", str(ckpt), "-i", str(image), "--frames", str(frames), "--every", "3", "--scale", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    pngs = sorted(frames.glob("*.png"))
    assert [p.name for p in pngs] == [f"frame_{i:05d}.png" for i in range(summary["frames"])]
    assert summary["frames"] == 1 + math.ceil(5 / 3) and summary["output"] is None
    with PILImage.open(pngs[0]) as im:
        assert list(im.size) == summary["size"]


@pytest.mark.parametrize("name", ["out.avi", "out.png", "out"])
def test_unknown_extension_exit_2(tmp_path: Path, name: str) -> None:
    ckpt = seg_checkpoint(tmp_path, 2)
    result = invoke("-c", str(ckpt), "-i", str(seg_input(tmp_path, (16, 16))), "-o", str(tmp_path / name))
    assert result.exit_code == 2, result.output
    assert name in result.stderr and ".gif" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / name).exists()


def test_mp4_without_ffmpeg_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    ckpt = seg_checkpoint(tmp_path, 2)
    result = invoke("-c", str(ckpt), "-i", str(seg_input(tmp_path, (16, 16))), "-o", str(tmp_path / "a.mp4"))
    assert result.exit_code == 2, result.output
    assert "ffmpeg" in result.stderr and ".gif" in result.stderr and "a.mp4" in result.stderr


def test_mp4_pipes_raw_frames_to_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ffmpeg"  # stands in for ffmpeg: copies stdin to its last argument
    fake.write_text('#!/bin/sh\nfor last; do :; done\ncat > "$last"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(fake) if name == "ffmpeg" else None)
    ckpt = seg_checkpoint(tmp_path, 2)
    out = tmp_path / "a.mp4"
    result = invoke(
        "-c", str(ckpt), "-i", str(seg_input(tmp_path, (16, 16))), "-o", str(out), "--scale", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    width, height = summary["size"]
    assert out.stat().st_size == summary["frames"] * width * height * 3


# ---------------------------------------------------------------------------------------------- growing
class _Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _grow_frames(ckpt: Path, damage: bool) -> tuple[list[np.ndarray], Any]:
    torch.manual_seed(1)
    opts = (
        {"damage": True, "damage_at": 4, "damage_center": (8.0, 8.0), "damage_radius": 4.0} if damage else {}
    )
    source = load_source(ckpt, AnimateRequest(steps="10", **opts), device="cpu")
    sink = _Collect()
    info = render(source, [sink], every=1, scale=2, progress=False)
    return sink.frames, (source, info)


def test_damage_changes_frames_after_the_damage_step(tmp_path: Path) -> None:
    ckpt = grow_checkpoint(tmp_path)
    plain, (_, info) = _grow_frames(ckpt, damage=False)
    hurt, (src_d, info_d) = _grow_frames(ckpt, damage=True)
    assert info["frame_steps"] == info_d["frame_steps"] == list(range(11))
    header = FrameComposer([src_d.label(s) for s in range(11)]).header_h
    body = slice(header, header + 32), slice(0, 32)  # the 16x16 grid at scale 2, below the step label
    for step in range(4):
        assert np.array_equal(plain[step][body], hurt[step][body]), step
    for step in range(4, 11):
        assert not np.array_equal(plain[step][body], hurt[step][body]), step
    # the erased circle is white (transparent) right after the damage, but not without damage
    assert hurt[4][body][16, 16].tolist() == [255, 255, 255]
    assert plain[4][body][16, 16].tolist() != [255, 255, 255]


def test_grow_cli_random_damage_and_digits(tmp_path: Path) -> None:
    out = tmp_path / "g.gif"
    result = invoke(
        "-c", str(grow_checkpoint(tmp_path)), "-o", str(out), "--damage", "--every", "5", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["total_steps"] == 24 and summary["damage"]["step"] == 12  # grow 12 steps, then regrow 12
    assert summary["frames"] == len(gif_frames(out)) == len(frame_steps(24, 5, [12]))
    assert 0 < summary["damage"]["radius"] < 16

    digits = invoke(
        "-c", str(digits_checkpoint(tmp_path)), "-o", str(out), "--scale", "2", "--hidden", "2", "--json"
    )
    assert digits.exit_code == 0, digits.output
    d = json.loads(digits.stdout)
    assert d["task"] == "digits" and d["classes"] == list(range(10)) and d["frames"] == 7
    width, height = d["size"]
    assert width >= 10 * 16 and height >= 3 * 16  # ten classes side by side, two hidden rows below


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "--input is required"),
        (["-i", "IMG", "--damage"], "--damage"),
        (["-i", "IMG", "--hidden", "9"], "--hidden 9"),
        (["-i", "IMG", "--steps", "1,2,3"], "--steps"),
        (["-i", "/no/such/image.nii.gz"], "/no/such/image.nii.gz"),
        (["-i", "IMG", "--montage"], "2D image"),
    ],
)
def test_seg_bad_options_exit_2(tmp_path: Path, extra: list[str], needle: str) -> None:
    ckpt = seg_checkpoint(tmp_path, 2)
    image = str(seg_input(tmp_path, (16, 16)))
    args = [image if a == "IMG" else a for a in extra]
    result = invoke("-c", str(ckpt), "-o", str(tmp_path / "x.gif"), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.gif").exists()


def test_missing_checkpoint_and_nothing_to_write(tmp_path: Path) -> None:
    missing = invoke("-c", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.gif"))
    assert missing.exit_code == 2 and "nope.pt" in missing.stderr
    nothing = invoke("-c", str(grow_checkpoint(tmp_path)))
    assert nothing.exit_code == 2 and "--output" in nothing.stderr


def test_quiet_is_silent_and_progress_goes_to_stderr(tmp_path: Path) -> None:
    ckpt = grow_checkpoint(tmp_path)
    quiet = invoke("-c", str(ckpt), "-o", str(tmp_path / "q.gif"))
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    loud = runner.invoke(app, ["animate", "-c", str(ckpt), "-o", str(tmp_path / "l.gif"), "--steps", "3"])
    assert loud.exit_code == 0 and loud.stdout == "" and "4 frames" in loud.stderr


@pytest.mark.parametrize("dim", [2, 3])
def test_last_frame_is_the_predicted_mask(dim: int, tmp_path: Path) -> None:
    """The animation runs the model's own inference: for the same seed its last state thresholds to
    the mask ``ncatool predict`` writes (at the training size, so no resizing in between)."""
    from ncatool.models.segmentation import probs_to_labels
    from ncatool.runtime import load

    ckpt = seg_checkpoint(tmp_path, dim)
    shape = (16, 16) if dim == 2 else (8, 10, 12)
    image = seg_input(tmp_path, shape)
    source = load_source(ckpt, AnimateRequest(input=image), device="cpu")
    torch.manual_seed(0)
    states: list[torch.Tensor] = []
    source.run(lambda step, state, level: states.append(state))
    assert len(states) == 1 + source.total_steps
    logits = states[-1][:, 1:2].float()
    animated = probs_to_labels(torch.sigmoid(logits))[0].numpy()
    out = tmp_path / "pred"
    runner = load(ckpt, device="cpu")
    result = runner.predict(PredictRequest(output=out, input=image, seed=0))
    predicted = read_image(result["cases"][0]["mask"]).array
    assert animated.shape == predicted.shape
    assert np.array_equal(animated, predicted)
    assert 0 < predicted.sum() < predicted.size  # a mask with something in it, not trivially equal
