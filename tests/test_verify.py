"""``ncatool verify``: nnU-Net v2 raw dataset integrity checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import Image, read_image, write_image
from ncatool.data.nnunet.prepare import PrepareOptions, prepare_dataset
from ncatool.data.nnunet.verify import verify_raw_dataset
from ncatool.errors import ValidationError

SHAPE = (6, 7, 8)
SPACING = (0.5, 0.75, 2.0)
ORIGIN = (1.0, -2.0, 3.5)

runner = CliRunner()


def flat(text: str) -> str:
    """Output without the line breaks rich adds at 80 columns."""
    return text.replace("\n", "")


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def geometry() -> dict:
    return {"spacing": SPACING, "origin": ORIGIN}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A prepared 3D dataset: 3 training cases and 1 test case, labels 0..2."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(4):
        label = np.zeros(SHAPE, np.uint8)
        label[1:3, 1:3, 1:3] = 1
        label[3:5, 3:5, 3:5] = 2
        write_image(
            Image.from_array(rng.normal(size=SHAPE).astype(np.float32), **geometry()),
            src / f"c{i}_img.nii.gz",
        )
        write_image(Image.from_array(label, **geometry()), src / f"c{i}_gt.nii.gz")
    options = PrepareOptions(out=tmp_path / "raw", dataset_id=11, name="V", folder=src, test_fraction=0.25)
    return prepare_dataset(options).dataset


@pytest.fixture
def rgb_dataset(tmp_path: Path) -> Path:
    """A prepared 2D RGB dataset: 2 cases with three channel files each."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
        write_image(Image.from_array(pixels, is_vector=True), images / f"p{i}.png")
        mask = np.zeros((9, 11), np.uint8)
        mask[2:5, 2:5] = 255
        write_image(Image.from_array(mask), labels / f"p{i}.png")
    options = PrepareOptions(out=tmp_path / "raw2d", dataset_id=12, name="Rgb", images=images, labels=labels)
    return prepare_dataset(options).dataset


def train_case(dataset: Path) -> str:
    return json.loads((dataset / "splits.json").read_text())["train"][0]


def test_verify_passes_on_prepared_dataset(dataset: Path) -> None:
    result = invoke("verify", dataset, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["num_training"] == 3 and report["num_test"] == 1 and report["ndim"] == 3
    assert report["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert "ok" in result.stderr


def test_verify_passes_on_2d_rgb_dataset(rgb_dataset: Path) -> None:
    report = verify_raw_dataset(rgb_dataset)
    assert report.ndim == 2 and report.channel_names == {"0": "R", "1": "G", "2": "B"}


# --------------------------------------------------------------------------------------------------
# Corruptions: each returns the file name the message must contain.


def _missing_channel(ds: Path) -> str:
    path = ds / "imagesTr" / f"{train_case(ds)}_0000.nii.gz"
    path.unlink()
    return path.name


def _wrong_num_training(ds: Path) -> str:
    content = json.loads((ds / "dataset.json").read_text())
    content["numTraining"] = 5
    (ds / "dataset.json").write_text(json.dumps(content))
    return "dataset.json"


def _label_value_not_in_labels(ds: Path) -> str:
    path = ds / "labelsTr" / f"{train_case(ds)}.nii.gz"
    label = read_image(path)
    label.array[0, 0, 0] = 5
    write_image(label, path)
    return path.name


def _nan_image(ds: Path) -> str:
    path = ds / "imagesTr" / f"{train_case(ds)}_0000.nii.gz"
    image = read_image(path)
    image.array[2, 2, 2] = np.nan
    write_image(image, path)
    return path.name


def _nan_test_image(ds: Path) -> str:
    path = next((ds / "imagesTs").iterdir())
    image = read_image(path)
    image.array[0, 1, 2] = np.inf
    write_image(image, path)
    return path.name


def _shape_mismatch(ds: Path) -> str:
    path = ds / "labelsTr" / f"{train_case(ds)}.nii.gz"
    write_image(Image.from_array(np.zeros((6, 7, 9), np.uint8), **geometry()), path)
    return path.name


def _spacing_mismatch(ds: Path) -> str:
    path = ds / "labelsTr" / f"{train_case(ds)}.nii.gz"
    label = read_image(path)
    write_image(Image.from_array(label.array, spacing=(0.5, 0.75, 2.01), origin=ORIGIN), path)
    return path.name


def _missing_label(ds: Path) -> str:
    (ds / "labelsTr" / f"{train_case(ds)}.nii.gz").unlink()
    return f"{train_case(ds)}_0000.nii.gz"


def _label_without_image(ds: Path) -> str:
    write_image(Image.from_array(np.zeros(SHAPE, np.uint8), **geometry()), ds / "labelsTr" / "orphan.nii.gz")
    return "orphan.nii.gz"


def _missing_key(ds: Path) -> str:
    content = json.loads((ds / "dataset.json").read_text())
    del content["file_ending"]
    (ds / "dataset.json").write_text(json.dumps(content))
    return "dataset.json"


def _non_consecutive_labels_json(ds: Path) -> str:
    content = json.loads((ds / "dataset.json").read_text())
    content["labels"] = {"background": 0, "a": 1, "b": 3}
    (ds / "dataset.json").write_text(json.dumps(content))
    return "dataset.json"


def _extra_channel(ds: Path) -> str:
    source = ds / "imagesTr" / f"{train_case(ds)}_0000.nii.gz"
    target = ds / "imagesTr" / f"{train_case(ds)}_0001.nii.gz"
    target.write_bytes(source.read_bytes())
    return target.name


def _badly_named_file(ds: Path) -> str:
    (ds / "imagesTr" / "stray.nii.gz").write_bytes(
        (ds / "labelsTr" / f"{train_case(ds)}.nii.gz").read_bytes()
    )
    return "stray.nii.gz"


def _unreadable_label(ds: Path) -> str:
    path = ds / "labelsTr" / f"{train_case(ds)}.nii.gz"
    path.write_bytes(b"")
    return path.name


CORRUPTIONS: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing channel file": (_missing_channel, "missing channel file"),
    "wrong numTraining": (_wrong_num_training, "numTraining is 5 but imagesTr has 3"),
    "label value not in labels": (_label_value_not_in_labels, "[5]"),
    "NaN image": (_nan_image, "NaN"),
    "Inf in imagesTs": (_nan_test_image, "Inf"),
    "shape mismatch": (_shape_mismatch, "size (9, 7, 6) differs"),
    "spacing mismatch": (_spacing_mismatch, "spacing"),
    "missing label": (_missing_label, "no label"),
    "label without image": (_label_without_image, "no image"),
    "missing required key": (_missing_key, "file_ending"),
    "non-consecutive labels": (_non_consecutive_labels_json, "consecutive"),
    "undeclared channel": (_extra_channel, "not declared"),
    "unexpected file name": (_badly_named_file, "does not follow"),
    "empty label file": (_unreadable_label, "empty"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_fails_naming_the_file(dataset: Path, kind: str) -> None:
    corrupt, expected = CORRUPTIONS[kind]
    name = corrupt(dataset)
    result = invoke("verify", dataset)
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert name in message and expected in message
    assert "not a valid nnU-Net v2 raw dataset" in message


def test_verify_lists_every_problem(dataset: Path) -> None:
    _missing_channel(dataset)
    _wrong_num_training(dataset)
    with pytest.raises(ValidationError) as info:
        verify_raw_dataset(dataset)
    assert len(info.value.problems) == 2
    result = invoke("verify", dataset, "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["ok"] is False and len(json.loads(result.stdout)["problems"]) == 2


def test_verify_missing_rgb_channel(rgb_dataset: Path) -> None:
    (rgb_dataset / "imagesTr" / "p1_0001.nii.gz").unlink()
    result = invoke("verify", rgb_dataset)
    assert result.exit_code == 2 and "p1_0001.nii.gz" in flat(result.stderr)


def test_verify_small_origin_shift_is_a_warning(dataset: Path) -> None:
    path = dataset / "labelsTr" / f"{train_case(dataset)}.nii.gz"
    label = read_image(path)
    write_image(Image.from_array(label.array, spacing=SPACING, origin=(1.1, -2.0, 3.5)), path)  # 0.2 voxel
    result = invoke("verify", dataset, "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 1 and path.name in warnings[0] and "origin" in warnings[0]


@pytest.mark.parametrize("missing", ["folder", "dataset.json"])
def test_verify_not_a_dataset(tmp_path: Path, missing: str) -> None:
    target = tmp_path / "nothing"
    if missing == "dataset.json":
        target.mkdir()
    result = invoke("verify", target)
    assert result.exit_code == 2 and "nothing" in flat(result.stderr)


def test_verify_accepts_one_rgb_file_for_three_channels(tmp_path: Path) -> None:
    """nnU-Net's natural-image convention (one ``CASE_0000.png`` for R, G, B), as training reads it."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    write_image(Image.from_array(pixels, is_vector=True), tmp_path / "imagesTr" / "c1_0000.png")
    mask = np.zeros((9, 11), np.uint8)
    mask[2:5, 2:5] = 1
    write_image(Image.from_array(mask), tmp_path / "labelsTr" / "c1.png")
    meta = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "a": 1},
        "numTraining": 1,
        "file_ending": ".png",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert verify_raw_dataset(tmp_path).ndim == 2
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "R", "1": "G"}}))
    with pytest.raises(ValidationError, match=r"c1_0001\.png: missing channel file"):
        verify_raw_dataset(tmp_path)
