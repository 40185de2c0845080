"""``ncatool predict`` and ``ncatool eval``: geometry kept, ensembles, honest metrics, clear errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS, TINY_GROW, write_toy_dataset
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.data.io import Image, read_image, write_image
from ncatool.errors import NcaError
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig
from ncatool.runtime import load
from ncatool.tasks.segmentation import Seg2DConfig, Seg3DConfig, SegmentationRunner, SegmentationTask
from ncatool.train import Trainer

runner = CliRunner()
TINY_2D = ["steps=4,4", "hidden=16", "channels=8", "target_size=16,16", "patch=0,8", "scale=2", "kernels=3,3"]
TINY_3D = ["steps=3,3", "hidden=8", "channels=6", "target_size=12,12,12", "patch=0,8", "kernels=3,3"]
#: A rotation about z by 90 degrees, and anisotropic voxels.
DIRECTION_3D = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING_3D = (0.7, 1.3, 2.5)
ORIGIN_3D = (10.0, -5.5, 3.25)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _train(ds: Path, cls: type, tiny: list[str], out: Path) -> Path:
    values = {"data": str(ds), "epochs": 2, "batch_size": 2, "samples": 0, "device": "cpu", "seed": 1}
    cfg = build_config(cls, {**dict(item.split("=") for item in tiny), **values})
    Trainer(SegmentationTask(cfg, torch.device("cpu")), out, torch.device("cpu")).fit()
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny trained seg2d and seg3d runs (a few seconds) and their datasets."""
    root = tmp_path_factory.mktemp("runs")
    ds2 = write_toy_dataset(root / "raw2", 2, cases=4, size=16)
    ds3 = write_toy_dataset(root / "raw3", 3, cases=4, size=12)
    return {
        "ds2": ds2,
        "ds3": ds3,
        "seg2d": _train(ds2, Seg2DConfig, TINY_2D, root / "run2"),
        "seg3d": _train(ds3, Seg3DConfig, TINY_3D, root / "run3"),
    }


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    ball = sum((g - s / 2) ** 2 / (s / 3) ** 2 for g, s in zip(grids, shape, strict=True)) < 1
    return (0.8 * ball + 0.1 + rng.normal(0, 0.05, shape)).astype(np.float32)


def _assert_same_geometry(mask: Image, source: Image) -> None:
    assert mask.spatial_shape == source.spatial_shape
    np.testing.assert_allclose(mask.spacing, source.spacing, rtol=1e-6)
    np.testing.assert_allclose(mask.origin, source.origin, atol=1e-5)
    np.testing.assert_allclose(mask.direction, source.direction, atol=1e-6)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_predict_keeps_geometry_3d(ext: str, runs: dict[str, Path], tmp_path: Path) -> None:
    source = Image(array=_volume((10, 14, 11)), spacing=SPACING_3D, origin=ORIGIN_3D, direction=DIRECTION_3D)
    path = write_image(source, tmp_path / f"scan{ext}")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "-c", str(runs["seg3d"]), "-i", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    mask = read_image(out / "scan.nii.gz")
    _assert_same_geometry(mask, read_image(path))
    assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) <= {0, 1}
    assert not (out / "scan_std.nii.gz").exists()


@pytest.mark.parametrize("native", [False, True])
def test_predict_2d_model_on_images_and_volumes(native: bool, runs: dict[str, Path], tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    flat = Image(array=_volume((20, 13)), spacing=(0.5, 0.8), origin=(1.0, 2.0), direction=(0, 1, 1, 0))
    write_image(flat, inputs / "flat.nii.gz")
    vol = Image(array=_volume((5, 18, 16)), spacing=SPACING_3D, origin=ORIGIN_3D, direction=DIRECTION_3D)
    write_image(vol, inputs / "vol.nrrd")
    args = ["predict", "-c", str(runs["seg2d"]), "-i", str(inputs), "-o", str(tmp_path / "out"), "--json"]
    result = runner.invoke(app, [*args, *(["--native"] if native else [])])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [c["case"] for c in summary["cases"]] == ["flat", "vol"]
    assert summary["target_size"] == (None if native else [16, 16])
    for name, source in [("flat", flat), ("vol", vol)]:
        mask = read_image(tmp_path / "out" / f"{name}.nii.gz")
        assert mask.ndim == source.ndim  # a 2D input gives a 2D mask
        _assert_same_geometry(mask, read_image(inputs / f"{name}{'.nii.gz' if name == 'flat' else '.nrrd'}"))


def test_ensemble_writes_std_and_quality(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    images = runs["ds2"] / "imagesTr"
    args = ["predict", "-c", str(runs["seg2d"]), "-i", str(images), "-n", "3"]
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.stdout)["cases"]
    assert [c["case"] for c in cases] == [f"toy_{i:03d}" for i in range(4)]  # _0000 files grouped
    for case in cases:
        assert math.isfinite(case["quality"]) and case["quality"] >= 0
        std = read_image(case["std"])
        assert std.array.dtype == np.float32 and std.array.shape == (16, 16)
        assert np.all(std.array >= 0) and std.array.max() > 0  # stochastic updates: runs differ
    # the same seed gives the same masks
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    for case in cases:
        a = read_image(case["mask"]).array
        np.testing.assert_array_equal(a, read_image(tmp_path / "again" / Path(case["mask"]).name).array)


def test_predict_on_dataset_folder_and_bf16(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["predict", "-c", str(runs["seg3d"]), "-i", str(runs["ds3"]), "-o", str(out), "--amp", "bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"toy_{i:03d}.nii.gz" for i in range(4)]


def test_channel_mismatch_exit_2_naming_the_file(runs: dict[str, Path], tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for c in range(2):
        write_image(Image.from_array(_volume((16, 16), c)), inputs / f"two_{c:04d}.nii.gz")
    result = runner.invoke(
        app, ["predict", "-c", str(runs["seg2d"]), "-i", str(inputs), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    assert "two_0000.nii.gz" in result.stderr and "2 channel(s)" in result.stderr
    assert "Traceback" not in result.output


def test_3d_model_rejects_2d_image_and_unknown_task(runs: dict[str, Path], tmp_path: Path) -> None:
    path = write_image(Image.from_array(_volume((16, 16))), tmp_path / "flat.nii.gz")
    result = runner.invoke(
        app, ["predict", "-c", str(runs["seg3d"]), "-i", str(path), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "flat.nii.gz" in result.stderr and "3D" in result.stderr
    payload = torch.load(runs["seg2d"], weights_only=False)
    payload["task"] = "paint"
    torch.save(payload, tmp_path / "paint.pt")
    with pytest.raises(NcaError, match="unknown task 'paint'"):
        load(tmp_path / "paint.pt", device="cpu")
    result = runner.invoke(app, ["predict", "-c", str(runs["seg2d"]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--input" in result.stderr
    result = runner.invoke(
        app,
        ["predict", "-c", str(runs["seg2d"]), "-i", str(path), "-o", str(tmp_path / "o"), "--samples", "3"],
    )
    assert result.exit_code == 2 and "--samples does not apply to seg2d" in result.stderr


@pytest.mark.parametrize("dim", [2, 3])
def test_lowmem_forward_equals_model_forward(dim: int) -> None:
    """The memory-bounded inference path (slab steps, two buffers) computes the model's forward."""
    torch.manual_seed(0)
    cfg = SegModelConfig(
        dim=dim, channels=6, hidden=8, levels=2, scale=2, steps=(3, 2), kernels=(5, 3), fire_rate=1.0
    )
    model = SegmentationNCA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        image = torch.randn(2, 1, *((9, 10, 11)[:dim] if dim == 3 else (13, 12)))
        expected = model(image).logits
        got = model(image, step_budget=20_000).logits  # a few planes per slab
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the predictor takes this path when an item does not fit its budget
    run = (Seg2DConfig if dim == 2 else Seg3DConfig)(normalization="none", target_size=None)
    whole = SegmentationRunner(model, run, torch.device("cpu"))
    small = SegmentationRunner(model, run, torch.device("cpu"), step_budget=20_000)
    a, _, _, _ = whole._run_items(image.numpy(), None, 1)
    b, _, _, _ = small._run_items(image.numpy(), None, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _write_masks(
    folder: Path, masks: dict[str, np.ndarray], spacing: tuple[float, ...] | None = None
) -> None:
    for name, array in masks.items():
        write_image(Image.from_array(array.astype(np.uint8), spacing=spacing), folder / f"{name}.nii.gz")


def test_eval_folders_nan_semantics_labels_and_outputs(tmp_path: Path) -> None:
    ref_a = np.zeros((6, 6), np.uint8)
    ref_a[1:3, 1:3] = 1
    ref_a[4, 4] = 2
    pred_a = ref_a.copy()
    pred_a[4, 4] = 0  # label 2 missed
    ref_b = np.zeros((6, 6), np.uint8)
    ref_b[:, 0] = 1  # label 2 absent from both files of case b
    _write_masks(tmp_path / "gt", {"a": ref_a, "b": ref_b, "extra": ref_b}, spacing=(2.5, 1.0))
    _write_masks(tmp_path / "pred", {"a": pred_a, "b": ref_b})
    write_image(Image.from_array(np.zeros((6, 6), np.float32)), tmp_path / "pred" / "a_std.nii.gz")
    out = tmp_path / "ev"
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)
    assert [c["case"] for c in summary["metric_per_case"]] == ["a", "b"]  # a_std skipped
    assert summary["unmatched_references"] == ["extra"]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(1.0)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.0)  # case b (both empty) left out
    assert summary["metric_per_case"][1]["metrics"]["2"]["Dice"] is None  # NaN -> null
    assert summary["nan_excluded"]["2"]["Dice"] == 1
    assert any("label 2: Dice undefined" in n for n in summary["notes"])
    assert "left out of the mean" in result.stderr
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.5)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 and rows[3]["Dice"] == "NaN" and rows[0]["HD95"] == "0"
    # --labels picks a subset
    result = runner.invoke(app, [*args[:-3], "--labels", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["mean"]) == ["1"]


def test_eval_names_labels_of_a_labels_folder_inside_a_dataset(tmp_path: Path) -> None:
    ds = write_toy_dataset(tmp_path, 2, cases=2, size=8)
    ref = read_image(ds / "labelsTr" / "toy_000.nii.gz").array
    _write_masks(tmp_path / "pred", {"toy_000": ref, "toy_001": np.zeros_like(ref)})
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(ds / "labelsTr"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labels"] == {"1": "ball"}
    assert summary["metric_per_case"][0]["metrics"]["1"]["Dice"] == pytest.approx(1.0)


def test_eval_shape_mismatch_and_missing_partner_exit_2(tmp_path: Path) -> None:
    _write_masks(tmp_path / "gt", {"a": np.zeros((6, 6))})
    _write_masks(tmp_path / "pred", {"a": np.zeros((6, 7))})
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = result.stderr.replace("\n", "")
    assert str(tmp_path / "pred" / "a.nii.gz") in message and str(tmp_path / "gt" / "a.nii.gz") in message
    _write_masks(tmp_path / "pred", {"a": np.zeros((6, 6)), "b": np.zeros((6, 6))})
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = result.stderr.replace("\n", "")
    assert str(tmp_path / "pred" / "b.nii.gz") in message and str(tmp_path / "gt" / "b.nii.gz") in message
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "nothing to evaluate"),
        (["--pred", "x"], "--pred and --gt"),
        (["--pred", "x", "--gt", "y", "--data", "z"], "either"),
        (["--data", "x"], "--data needs --checkpoint"),
        (["--checkpoint", "/no/ckpt.pt"], "/no/ckpt.pt"),
        (["--pred", "/no/such", "--gt", "/no/gt"], "/no/such"),
        (["--pred", "x", "--gt", "y", "--labels", "0"], "--labels"),
    ],
)
def test_eval_bad_options_exit_2(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr


def test_eval_checkpoint_end_to_end(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ev"
    args = ["eval", "-c", str(runs["seg2d"]), "-d", str(runs["ds2"]), "-o", str(out), "-n", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    payload = torch.load(runs["seg2d"], weights_only=False)
    val = payload["task_state"]["split"]["val"]
    assert [c["case"] for c in summary["metric_per_case"]] == val
    assert summary["split"] == "val" and summary["labels"] == {"1": "ball"}
    assert 0.0 <= summary["mean"]["1"]["Dice"] <= 1.0
    assert math.isfinite(summary["metric_per_case"][0]["quality"])
    assert set(summary["foreground_mean"]) >= {"Dice", "IoU", "HD95", "precision", "recall"}
    assert (out / "summary.json").is_file() and (out / "metrics.csv").is_file()
    assert (out / "predictions" / f"{val[0]}.nii.gz").is_file()
    # every case, into a temporary folder that is removed again
    result = runner.invoke(
        app, ["eval", "-c", str(runs["seg2d"]), "-d", str(runs["ds2"]), "--split", "all", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["metric_per_case"]) == 4


GEN_TINY = {"grow": TINY_GROW, "digits": TINY_DIGITS}


@pytest.mark.parametrize("task", ["grow", "digits"])
def test_generation_checkpoints_predict_pngs_and_evaluate(task: str, tmp_path: Path) -> None:
    from ncatool.tasks import config_class, make_task

    values = {**dict(i.split("=") for i in GEN_TINY[task]), "epochs": 1, "samples": 0, "val_max": 40}
    if task == "grow":
        values.pop("val_max")
    cfg = build_config(config_class(task), values)
    Trainer(make_task(cfg, torch.device("cpu")), tmp_path / "run", torch.device("cpu")).fit()
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    out = tmp_path / "png"
    extra = ["--labels", "3,7"] if task == "digits" else []
    result = runner.invoke(app, ["predict", "-c", ckpt, "-o", str(out), "--samples", "2", *extra, "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    if task == "digits":
        assert sorted(Path(f).name for f in files) == [
            f"digit_{k}_{i:03d}.png" for k in (3, 7) for i in range(2)
        ]
        assert read_image(files[0]).array.shape == (8, 8)
    else:
        assert sorted(Path(f).name for f in files) == ["sample_000.png", "sample_001.png"]
        assert read_image(files[0]).array.shape == (12, 12, 3)
    bad = runner.invoke(app, ["predict", "-c", ckpt, "-o", str(out), "-i", str(tmp_path)])
    assert bad.exit_code == 2 and "--input does not apply" in bad.stderr
    result = runner.invoke(app, ["eval", "-c", ckpt, "-o", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    wanted = {"psnr", "psnr_long"} if task == "grow" else {"pixel_acc", "recognised", "mse_means"}
    assert wanted <= set(metrics)
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["metrics"] == metrics


def test_help_of_both_commands() -> None:
    for command, needles in [
        ("predict", ["--ensemble", "--native", "--amp"]),
        ("eval", ["--split", "--labels"]),
    ]:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        for needle in needles:
            assert needle in result.output
