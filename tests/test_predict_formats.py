"""``ncatool predict --format``: masks in the input's kind (issue 16, item 2).

PNG/JPG inputs give PNG masks of the input's size (ISIC-style ``CASE_segmentation.png`` with 0/255
for a binary model trained on a ``prepare --layout isic`` dataset, otherwise ``CASE.png`` with the
label values); volumes give NIfTI with the input's geometry; ``eval --pred`` pairs the PNG masks with
their references.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import Image, read_image, write_image

runner = CliRunner()
TINY = ["target_size=24,24", "steps=3,3", "hidden=8", "channels=8", "patch=0,8", "scale=2", "kernels=3,3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _invoke(*args: str) -> str:
    result = runner.invoke(app, ["-q", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def _lesions(folder: Path, gt: Path, n: int, rgb: bool, isic: bool) -> list[tuple[int, int]]:
    """``n`` images of a dark ellipse on a light background, sizes differing; their masks (0/255)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    gt.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(n):
        h, w = int(rng.integers(30, 40)), int(rng.integers(36, 48))
        yy, xx = np.mgrid[:h, :w]
        m = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1
        base = np.where(m, 60.0, 200.0) + rng.normal(0, 10, (h, w))
        img = np.stack([base, base * 0.9, base * 0.8], -1) if rgb else base
        img = np.clip(img, 0, 255).astype(np.uint8)
        name = f"ISIC_{i:07d}" if isic else f"case{i}"
        if isic:
            PILImage.fromarray(img).save(folder / f"{name}.jpg", quality=95)
            PILImage.fromarray((m * 255).astype(np.uint8)).save(gt / f"{name}_segmentation.png")
        else:
            PILImage.fromarray(img).save(folder / f"{name}_img.png")
            PILImage.fromarray((m * 255).astype(np.uint8)).save(gt / f"{name}_gt.png")
        sizes.append((w, h))
    return sizes


def _train(ds: Path, out: Path) -> Path:
    sets = [x for item in TINY for x in ("--set", item)]
    _invoke("train", "--task", "seg2d", "--data", str(ds), "--epochs", "1", "--out", str(out),
            "--device", "cpu", "--set", "iters_per_epoch=1", "--set", "samples=0", "--set", "val_fraction=0.25",
            *sets)  # fmt: skip
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def isic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An ISIC layout (JPG images, ``_segmentation.png`` masks), prepared and trained on."""
    root = tmp_path_factory.mktemp("isic")
    sizes = _lesions(root / "in", root / "gt", 4, rgb=True, isic=True)
    _invoke("prepare", "--layout", "isic", "--images", str(root / "in"), "--labels", str(root / "gt"),
            "--out", str(root / "nn"), "--dataset-id", "14", "--name", "ISIC")  # fmt: skip
    ds = next((root / "nn").glob("Dataset014_*"))
    return {"root": root, "ds": ds, "sizes": sizes, "ckpt": _train(ds, root / "run")}


def test_prepare_records_the_isic_layout_and_the_checkpoint_keeps_it(isic: dict) -> None:
    meta = json.loads((isic["ds"] / "dataset.json").read_text())
    assert meta["source_layout"] == "isic"
    from ncatool.runtime import load

    assert load(isic["ckpt"], "cpu").source_layout == "isic"


def test_jpg_inputs_give_isic_png_masks_of_their_size(isic: dict) -> None:
    root: Path = isic["root"]  # type: ignore[assignment]
    out = json.loads(_invoke("predict", "-c", str(isic["ckpt"]), "-i", str(root / "in"), "-o",
                             str(root / "pred"), "--device", "cpu", "--json"))  # fmt: skip
    names = sorted(p.name for p in (root / "pred").iterdir())
    assert names == [f"ISIC_{i:07d}_segmentation.png" for i in range(4)]
    assert out["format"] == "auto" and all(row["mask"].endswith("_segmentation.png") for row in out["cases"])
    for i, size in enumerate(isic["sizes"]):  # type: ignore[arg-type]
        png = PILImage.open(root / "pred" / f"ISIC_{i:07d}_segmentation.png")
        assert png.size == size and png.mode == "L"
        assert set(np.unique(np.asarray(png)).tolist()) <= {0, 255}


def test_eval_pairs_isic_png_masks_with_references(isic: dict) -> None:
    root: Path = isic["root"]  # type: ignore[assignment]
    if not (root / "pred").is_dir():
        _invoke("predict", "-c", str(isic["ckpt"]), "-i", str(root / "in"), "-o", str(root / "pred"))
    # against the challenge's own masks (CASE_segmentation.png) and against the prepared dataset (CASE.nii.gz)
    for gt in (root / "gt", isic["ds"]):
        summary = json.loads(_invoke("eval", "--pred", str(root / "pred"), "--gt", str(gt), "--json"))
        cases = sorted(Path(e["prediction_file"]).name for e in summary["metric_per_case"])
        assert cases == [f"ISIC_{i:07d}_segmentation.png" for i in range(4)]


def test_format_nifti_keeps_the_old_masks(isic: dict) -> None:
    root: Path = isic["root"]  # type: ignore[assignment]
    _invoke("predict", "-c", str(isic["ckpt"]), "-i", str(root / "in"), "-o", str(root / "nii"),
            "--format", "nifti", "--ensemble", "2")  # fmt: skip
    names = sorted(p.name for p in (root / "nii").iterdir())
    assert names == sorted(
        [f"ISIC_{i:07d}.nii.gz" for i in range(4)] + [f"ISIC_{i:07d}_std.nii.gz" for i in range(4)]
    )


def test_png_inputs_of_another_layout_give_label_pngs_and_volumes_nifti(tmp_path: Path) -> None:
    sizes = _lesions(tmp_path / "raw", tmp_path / "raw", 4, rgb=False, isic=False)
    _invoke(
        "prepare", str(tmp_path / "raw"), "--out", str(tmp_path / "nn"), "--dataset-id", "3", "--name", "P"
    )
    ds = next((tmp_path / "nn").glob("Dataset003_*"))
    assert "source_layout" not in json.loads((ds / "dataset.json").read_text())
    ckpt = _train(ds, tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (tmp_path / "raw" / f"case{i}_img.png").rename(images / f"case{i}.png")
    _invoke("predict", "-c", str(ckpt), "-i", str(images), "-o", str(tmp_path / "pred"), "--ensemble", "2")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "case0.png", "case0_std.tif", "case1.png", "case1_std.tif"
    ]  # fmt: skip
    for i in range(2):
        png = PILImage.open(tmp_path / "pred" / f"case{i}.png")
        assert png.size == sizes[i]
        assert set(np.unique(np.asarray(png)).tolist()) <= {0, 1}  # label values
    # a volume (seg2d cuts it into slices) gives NIfTI with its geometry; --format png refuses it
    vol = np.random.default_rng(1).random((3, 20, 22)).astype(np.float32)
    write_image(
        Image.from_array(vol, spacing=(0.5, 0.5, 2.0), origin=(1.0, 2.0, 3.0)), tmp_path / "v" / "vol.nii.gz"
    )
    _invoke("predict", "-c", str(ckpt), "-i", str(tmp_path / "v"), "-o", str(tmp_path / "pv"))
    mask = read_image(tmp_path / "pv" / "vol.nii.gz")
    assert (
        mask.array.shape == (3, 20, 22) and mask.spacing == (0.5, 0.5, 2.0) and mask.origin == (1.0, 2.0, 3.0)
    )
    bad = runner.invoke(app, ["predict", "-c", str(ckpt), "-i", str(tmp_path / "v"), "-o", str(tmp_path / "pp"),
                              "--format", "png"])  # fmt: skip
    assert bad.exit_code == 2 and "--format png needs 2D images" in bad.output
