"""``benchmarks/quality/baselines.py``: threshold and U-Net baselines write honest predictions for imagesTs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ncatool.data.io import Image, read_image, write_image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality" / "baselines.py"
SPACING = {2: (0.5, 0.75), 3: (0.5, 0.75, 2.0)}
ORIGIN = {2: (3.0, -2.0), 3: (3.0, -2.0, 10.0)}
#: A 90 degree rotation in-plane, so geometry that is not the identity must survive.
DIRECTION = {2: (0.0, -1.0, 1.0, 0.0), 3: (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}


def make_dataset(
    root: Path, dim: int = 2, classes: int = 2, train: int = 4, test: int = 2, size: int = 24, seed: int = 0
) -> Path:
    """An nnU-Net raw dataset with imagesTr/labelsTr and imagesTs/labelsTs.

    Each case is a noisy bright ball on a dark background (label 1); with ``classes=3`` a brighter
    inner ball is label 2. Images are float32 with a non-trivial geometry.
    """
    ds = root / "Dataset001_Toy"
    rng = np.random.default_rng(seed)
    shape = (size,) * dim
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    for i in range(train + test):
        centre = rng.uniform(size * 0.4, size * 0.6, dim)
        radius = rng.uniform(size * 0.25, size * 0.35)
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)))
        label = (dist < radius).astype(np.uint8)
        if classes == 3:
            label[dist < radius * 0.55] = 2
        levels = np.array([0.1, 0.6, 1.0] if classes == 3 else [0.1, 0.9])
        image = (levels[label] + rng.normal(0, 0.06, shape)).astype(np.float32)
        split = "Tr" if i < train else "Ts"
        geometry = {"spacing": SPACING[dim], "origin": ORIGIN[dim], "direction": DIRECTION[dim]}
        write_image(Image.from_array(image, **geometry), ds / f"images{split}" / f"toy_{i:03d}_0000.nii.gz")
        write_image(Image.from_array(label, **geometry), ds / f"labels{split}" / f"toy_{i:03d}.nii.gz")
    names = ["ball", "core"][: classes - 1]
    meta = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, **{n: v for v, n in enumerate(names, start=1)}},
        "numTraining": train,
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the script from the repository root on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one label."""
    p, r = pred == label, ref == label
    return 2.0 * float((p & r).sum()) / float(p.sum() + r.sum())


def check_predictions(ds: Path, out: Path, labels: list[int], min_dice: float) -> None:
    """One prediction per test case, integer, with the image's geometry, and Dice above ``min_dice``."""
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds / "imagesTs").glob("*_0000.nii.gz"))
    written = sorted(p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz"))
    assert written == cases
    for case in cases:
        image = read_image(ds / "imagesTs" / f"{case}_0000.nii.gz")
        pred = read_image(out / f"{case}.nii.gz")
        ref = read_image(ds / "labelsTs" / f"{case}.nii.gz").array
        assert pred.array.shape == image.array.shape
        assert np.issubdtype(pred.array.dtype, np.integer)
        assert pred.spacing == pytest.approx(image.spacing)
        assert pred.origin == pytest.approx(image.origin)
        assert pred.direction == pytest.approx(image.direction)
        for label in labels:
            assert dice(pred.array, ref, label) > min_dice, (case, label)


@pytest.mark.parametrize("method", ["best", "otsu"])
def test_threshold_binary(tmp_path: Path, method: str) -> None:
    ds = make_dataset(tmp_path, dim=2)
    out = tmp_path / "pred"
    result = run_script("threshold", "--data", ds, "--output", out, "--method", method)
    assert result.returncode == 0, result.stderr
    assert f"wrote 2 predictions to {out}" in result.stdout
    check_predictions(ds, out, [1], 0.8)
    summary = json.loads((out / "thresholds.json").read_text())
    assert summary["method"] == method
    assert len(summary["thresholds"]) == 1
    assert 0.3 < summary["thresholds"][0] < 0.7
    assert summary["train_dice"]["ball"] > 0.9


@pytest.mark.parametrize("method", ["best", "otsu"])
def test_threshold_three_classes_3d(tmp_path: Path, method: str) -> None:
    ds = make_dataset(tmp_path, dim=3, classes=3, train=3, test=2, size=16)
    out = tmp_path / "pred"
    result = run_script("threshold", "--data", ds, "--output", out, "--method", method)
    assert result.returncode == 0, result.stderr
    check_predictions(ds, out, [1, 2], 0.8)
    thresholds = json.loads((out / "thresholds.json").read_text())["thresholds"]
    assert len(thresholds) == 2
    assert 0.1 < thresholds[0] < 0.6 < thresholds[1] < 1.0


def test_unet_2d_learns_and_keeps_geometry(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, dim=2, train=6, test=2)
    out = tmp_path / "pred"
    result = run_script(
        "unet", "--data", ds, "--output", out, "--seconds", "3", "--seed", "0", "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    check_predictions(ds, out, [1], 0.8)
    summary = json.loads((out / "unet.json").read_text())
    assert 5_000 <= summary["params"] <= 200_000
    assert summary["iterations"] >= 1
    assert summary["seed"] == 0
    assert summary["dim"] == 2
    assert 3.0 <= summary["seconds"] < 10.0
    assert np.isfinite(summary["final_loss"])
    assert f"{summary['params']:,} parameters" in result.stdout


def test_unet_3d_writes_predictions(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, dim=3, classes=3, train=2, test=1, size=13)
    out = tmp_path / "pred"
    result = run_script(
        "unet",
        "--data",
        ds,
        "--output",
        out,
        "--seconds",
        "2",
        "--seed",
        "1",
        "--threads",
        "1",
        "--depth",
        "2",
    )
    assert result.returncode == 0, result.stderr
    check_predictions(ds, out, [], 0.0)  # 13^3 is padded to 16^3 and cropped back
    summary = json.loads((out / "unet.json").read_text())
    assert summary["dim"] == 3
    assert 5_000 <= summary["params"] <= 200_000
    assert summary["patch"] == [12, 12, 12]


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (
        ["threshold", "--method", "best"],
        ["unet", "--seconds", "1", "--seed", "0"],
    ):
        result = run_script(*args, "--data", missing, "--output", tmp_path / "out")
        assert result.returncode == 2
        assert str(missing) in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_images_ts_is_a_clear_error(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, dim=2, train=2, test=0)
    result = run_script("threshold", "--data", ds, "--output", tmp_path / "out", "--method", "otsu")
    assert result.returncode == 2
    assert str(ds / "imagesTs") in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# The threshold search itself, in-process


@pytest.fixture(scope="module")
def baselines() -> Iterator[ModuleType]:
    """The script imported as a module (registered while in use: its dataclasses need that)."""
    name = "quality_baselines"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def test_best_partition_matches_brute_force(baselines: ModuleType) -> None:
    rng = np.random.default_rng(3)
    hist = rng.integers(0, 20, size=(3, 12)).astype(np.float64)
    centres = np.arange(12) + 0.5
    cases = {
        "dice": [np.zeros((13, 13)), baselines.dice_scores(hist, 1), baselines.dice_scores(hist, 2)],
        "otsu": [baselines.otsu_scores(hist.sum(axis=0), centres)] * 3,
    }
    for scores in cases.values():
        t1, t2 = baselines.best_partition(scores)
        best = max(
            scores[0][0, a] + scores[1][a, b] + scores[2][b, 12]
            for a, b in itertools.combinations(range(1, 12), 2)
        )
        assert scores[0][0, t1] + scores[1][t1, t2] + scores[2][t2, 12] == pytest.approx(best)


def test_plateau_boundary_is_centred(baselines: ModuleType) -> None:
    hist = np.array([[5, 5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 5, 5]], dtype=np.float64)
    scores = [np.zeros((9, 9)), baselines.dice_scores(hist, 1)]
    bounds = baselines.centre_plateaus(baselines.best_partition(scores), scores)
    assert bounds == [4]  # any of 2..6 gives Dice 1; the middle is 4
