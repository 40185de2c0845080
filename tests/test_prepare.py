"""``ncatool prepare``: pairing, validation, nnU-Net v2 raw layout, geometry, atomicity."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import Image, read_image, write_image
from ncatool.data.loading import NnUNetDataset
from ncatool.data.nnunet import prepare as nnunet_prepare
from ncatool.data.nnunet.pairs import discover_pairs
from ncatool.data.nnunet.prepare import PrepareOptions, prepare_dataset
from ncatool.data.nnunet.verify import geometry_issues
from ncatool.data.splits import split_cases

SHAPE = (8, 10, 12)  # (Z, Y, X)
SPACING = (0.75, 1.25, 2.5)  # (x, y, z), exact in float32
ORIGIN = (-10.5, 3.25, 7.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# A permutation with a flip (x' = z, y' = x, z' = -y): non-identity, orthonormal, left-handed.
PERMUTED = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

runner = CliRunner()


def flat(text: str) -> str:
    """Output without the line breaks rich adds at 80 columns."""
    return text.replace("\n", "")


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def make_image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


def make_label(shape: tuple[int, ...] = SHAPE, values: tuple[int, ...] = (1,)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for i, value in enumerate(values):
        label[(slice(1 + i, 3 + i),) * len(shape)] = value
    return label


def write_case(
    folder: Path,
    case: str,
    *,
    image: np.ndarray | None = None,
    label: np.ndarray | None = None,
    ext: str = ".nii.gz",
    spacing: tuple[float, ...] = SPACING,
    origin: tuple[float, ...] = ORIGIN,
    direction: tuple[float, ...] = IDENTITY,
    label_geometry: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``<case>_img<ext>`` and ``<case>_gt<ext>`` (mock layout)."""
    image = make_image(len(case)) if image is None else image
    label = make_label(image.shape) if label is None else label
    geometry = {"spacing": spacing, "origin": origin, "direction": direction}
    img_path = write_image(Image.from_array(image, **geometry), folder / f"{case}_img{ext}")
    gt_geometry = {**geometry, **(label_geometry or {})}
    gt_path = write_image(Image.from_array(label, **gt_geometry), folder / f"{case}_gt{ext}")
    return img_path, gt_path


@pytest.fixture
def mock_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mock"
    for i in range(3):
        write_case(folder, f"case_{i:03d}", label=make_label(values=(1, 2)))
    return folder


def prepare_args(input_dir: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    return ["prepare", input_dir, "--out", out, "--dataset-id", "7", "--name", "Test", *extra]


# --------------------------------------------------------------------------------------------------
# Happy paths


def test_prepare_mock_layout_writes_nnunet_v2_raw(mock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "nnUNet_raw"
    result = invoke(*prepare_args(mock_dir, out, "--json"))
    assert result.exit_code == 0, result.output
    dataset = out / "Dataset007_Test"
    assert json.loads((dataset / "dataset.json").read_text()) == {
        "channel_names": {"0": "image"},
        "labels": {"background": 0, "label_1": 1, "label_2": 2},
        "numTraining": 3,
        "file_ending": ".nii.gz",
        "name": "Test",
    }
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        f"case_{i:03d}_0000.nii.gz" for i in range(3)
    ]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [
        f"case_{i:03d}.nii.gz" for i in range(3)
    ]
    assert not (dataset / "imagesTs").exists()
    assert json.loads((dataset / "splits.json").read_text()) == {
        "train": ["case_000", "case_001", "case_002"],
        "test": [],
    }
    summary = json.loads(result.stdout)
    assert summary["dataset"] == str(dataset)
    assert summary["cases"] == {"train": ["case_000", "case_001", "case_002"], "test": []}
    assert summary["skipped"] == [] and summary["warnings"] == []
    # nothing but the dataset folder in nnUNet_raw (no temporary leftovers)
    assert [p.name for p in out.iterdir()] == ["Dataset007_Test"]


def test_prepare_nifti_geometry_and_data_survive(tmp_path: Path) -> None:
    src = tmp_path / "in"
    image = make_image(3)
    label = make_label(values=(1,))
    write_case(src, "a", image=image, label=label, direction=PERMUTED)
    out = tmp_path / "raw"
    assert invoke(*prepare_args(src, out)).exit_code == 0
    dataset = out / "Dataset007_Test"
    got_img = read_image(dataset / "imagesTr" / "a_0000.nii.gz")
    got_lab = read_image(dataset / "labelsTr" / "a.nii.gz")
    for got in (got_img, got_lab):
        assert got.spacing == SPACING and got.origin == ORIGIN
        np.testing.assert_allclose(got.direction, PERMUTED, atol=1e-7)
    np.testing.assert_array_equal(got_img.array, image)
    np.testing.assert_array_equal(got_lab.array, label)


def test_prepare_nrrd_anisotropic_permuted_direction(tmp_path: Path) -> None:
    src = tmp_path / "in"
    spacing, origin = (0.7, 1.3, 3.1), (-12.3, 45.6, 7.89)
    image = make_image(5)
    label = make_label(values=(1, 2))
    write_case(
        src, "n1", image=image, label=label, ext=".nrrd", spacing=spacing, origin=origin, direction=PERMUTED
    )
    out = tmp_path / "raw"
    result = invoke(*prepare_args(src, out, "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == {"linked": 0, "copied": 0, "converted": 2}
    dataset = out / "Dataset007_Test"
    for path, data in (
        (dataset / "imagesTr" / "n1_0000.nii.gz", image),
        (dataset / "labelsTr" / "n1.nii.gz", label),
    ):
        got = read_image(path)
        np.testing.assert_allclose(got.spacing, spacing, rtol=1e-6)  # NIfTI stores float32
        np.testing.assert_allclose(got.origin, origin, rtol=1e-6)
        np.testing.assert_allclose(got.direction, PERMUTED, atol=1e-6)
        np.testing.assert_array_equal(got.array, data)
    assert invoke("verify", dataset).exit_code == 0


def test_link_symlinks_nifti_and_converts_other_formats(tmp_path: Path) -> None:
    src = tmp_path / "in"
    img_a, gt_a = write_case(src, "a")
    write_case(src, "b", ext=".mha")
    out = tmp_path / "raw"
    result = invoke(*prepare_args(src, out, "--link", "--json"))
    assert result.exit_code == 0, result.output
    dataset = out / "Dataset007_Test"
    linked_img, linked_gt = dataset / "imagesTr" / "a_0000.nii.gz", dataset / "labelsTr" / "a.nii.gz"
    assert linked_img.is_symlink() and linked_img.resolve() == img_a.resolve()
    assert linked_gt.is_symlink() and linked_gt.resolve() == gt_a.resolve()
    assert not (dataset / "imagesTr" / "b_0000.nii.gz").is_symlink()
    assert not (dataset / "labelsTr" / "b.nii.gz").is_symlink()
    assert json.loads(result.stdout)["files"] == {"linked": 2, "copied": 0, "converted": 2}
    assert invoke("verify", dataset).exit_code == 0


def test_without_link_nifti_is_copied(mock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    assert invoke(*prepare_args(mock_dir, out)).exit_code == 0
    copied = out / "Dataset007_Test" / "imagesTr" / "case_000_0000.nii.gz"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (mock_dir / "case_000_img.nii.gz").read_bytes()


def write_isic(folder: Path, n: int = 3, rgb: bool = True) -> tuple[Path, Path]:
    images, masks = folder / "ISIC2018_Task1-2_Training_Input", folder / "ISIC2018_Task1_Training_GroundTruth"
    rng = np.random.default_rng(1)
    for i in range(n):
        case = f"ISIC_{i:07d}"
        pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
        write_image(Image.from_array(pixels, is_vector=rgb), images / f"{case}.jpg")
        mask = np.zeros((10, 12), np.uint8)
        mask[2:6, 3:9] = 255
        write_image(Image.from_array(mask), masks / f"{case}_segmentation.png")
    (images / "ATTRIBUTION.txt").write_text("not an image")
    return images, masks


def test_isic_layout_rgb_becomes_three_2d_channels(tmp_path: Path) -> None:
    images, masks = write_isic(tmp_path)
    out = tmp_path / "raw"
    args = ["prepare", "--images", images, "--labels", masks, "--out", out, "--dataset-id", "120"]
    result = invoke(*args, "--name", "ISIC", "--label-names", "lesion", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "isic" and summary["ndim"] == 2
    dataset = out / "Dataset120_ISIC"
    content = json.loads((dataset / "dataset.json").read_text())
    assert content["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert content["labels"] == {"background": 0, "lesion": 1}
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir() if p.name.startswith("ISIC_0000000")) == [
        "ISIC_0000000_0000.nii.gz",
        "ISIC_0000000_0001.nii.gz",
        "ISIC_0000000_0002.nii.gz",
    ]
    red = read_image(dataset / "imagesTr" / "ISIC_0000000_0000.nii.gz")
    assert red.ndim == 2 and red.array.shape == (10, 12)  # the 2D convention: genuine 2D NIfTI
    label = read_image(dataset / "labelsTr" / "ISIC_0000000.nii.gz")
    assert label.ndim == 2 and set(np.unique(label.array)) == {0, 1}
    np.testing.assert_array_equal(
        read_image(images / "ISIC_0000000.jpg").array[..., 1],
        read_image(dataset / "imagesTr" / "ISIC_0000000_0001.nii.gz").array,
    )
    loaded = NnUNetDataset(dataset)
    case = loaded.load(next(r for r in loaded.cases() if r.name == "ISIC_0000001"))
    assert case.image.shape == (3, 10, 12) and case.label is not None and case.label.shape == (10, 12)
    assert invoke("verify", dataset).exit_code == 0


def test_isic_grayscale_gives_one_channel(tmp_path: Path) -> None:
    images, masks = write_isic(tmp_path, n=2)
    out = tmp_path / "raw"
    args = [
        "prepare",
        "--images",
        images,
        "--labels",
        masks,
        "--out",
        out,
        "--dataset-id",
        "1",
        "--name",
        "G",
    ]
    assert invoke(*args, "--grayscale", "--layout", "isic").exit_code == 0
    dataset = out / "Dataset001_G"
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "image"}
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "ISIC_0000000_0000.nii.gz",
        "ISIC_0000001_0000.nii.gz",
    ]


def test_dirs_layout_matches_stems_and_names(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    for case in ("liver_1", "liver_2"):
        geometry = {"spacing": SPACING, "origin": ORIGIN}
        write_image(Image.from_array(make_image(), **geometry), images / f"{case}.nrrd")
        write_image(Image.from_array(make_label(values=(1, 2)), **geometry), labels / f"{case}.nii.gz")
    out = tmp_path / "raw"
    args = [
        "prepare",
        "--images",
        images,
        "--labels",
        labels,
        "--out",
        out,
        "--dataset-id",
        "3",
        "--name",
        "L",
    ]
    result = invoke(*args, "--label-names", "liver,tumour", "--channel-names", "CT", "--description", "demo")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "Dataset003_L" / "dataset.json").read_text()) == {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "L",
        "description": "demo",
    }
    assert discover_pairs("auto", images=images, labels=labels).layout == "dirs"


def test_test_fraction_split_is_seeded(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i in range(10):
        write_case(src, f"c{i}", image=make_image(i, (4, 5, 6)), label=make_label((4, 5, 6)))
    splits = []
    for run, seed in enumerate(("1", "1", "2")):
        out = tmp_path / f"raw{run}"
        result = invoke(*prepare_args(src, out, "--test-fraction", "0.3", "--seed", seed))
        assert result.exit_code == 0, result.output
        dataset = out / "Dataset007_Test"
        split = json.loads((dataset / "splits.json").read_text())
        assert len(split["test"]) == 3 and len(split["train"]) == 7
        assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [
            f"{c}_0000.nii.gz" for c in split["test"]
        ]
        assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == [
            f"{c}.nii.gz" for c in split["test"]
        ]
        assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [
            f"{c}.nii.gz" for c in split["train"]
        ]
        assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 7
        splits.append(split)
    assert splits[0] == splits[1]
    assert split_cases([f"c{i}" for i in range(10)], 0.3, 1) == (splits[0]["train"], splits[0]["test"])


@pytest.mark.parametrize(("fraction", "n_test"), [(0.0, 0), (0.5, 2), (0.99, 3)])
def test_split_cases_counts(fraction: float, n_test: int) -> None:
    train, test = split_cases(["a", "b", "c", "d"], fraction, seed=0)
    assert len(test) == n_test and len(train) == 4 - n_test
    assert sorted(train + test) == ["a", "b", "c", "d"]


def test_input_option_and_quiet(mock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    result = invoke(
        "--quiet", "prepare", "--input", mock_dir, "--out", out, "--dataset-id", "9", "--name", "Q"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert (out / "Dataset009_Q" / "dataset.json").is_file()


# --------------------------------------------------------------------------------------------------
# Bad inputs: exit 2, the file named, nothing written


def _missing_label(folder: Path) -> str:
    img, gt = write_case(folder, "bad")
    gt.unlink()
    return img.name


def _missing_image(folder: Path) -> str:
    img, gt = write_case(folder, "bad")
    img.unlink()
    return gt.name


def _shape_mismatch(folder: Path) -> str:
    return write_case(folder, "bad", label=make_label((8, 10, 11)))[1].name


def _spacing_mismatch(folder: Path) -> str:
    return write_case(folder, "bad", label_geometry={"spacing": (0.75, 1.25, 3.0)})[1].name


def _origin_mismatch(folder: Path) -> str:
    return write_case(folder, "bad", label_geometry={"origin": (-10.5, 3.25, 12.0)})[1].name


def _direction_mismatch(folder: Path) -> str:
    return write_case(folder, "bad", label_geometry={"direction": PERMUTED})[1].name


def _nan_image(folder: Path) -> str:
    image = make_image()
    image[1, 2, 3] = np.nan
    return write_case(folder, "bad", image=image)[0].name


def _inf_image(folder: Path) -> str:
    image = make_image()
    image[0, 0, 0] = np.inf
    return write_case(folder, "bad", image=image)[0].name


def _fractional_label(folder: Path) -> str:
    label = make_label().astype(np.float32)
    label[0, 0, 0] = 0.5
    return write_case(folder, "bad", label=label)[1].name


def _negative_label(folder: Path) -> str:
    label = make_label().astype(np.int16)
    label[0, 0, 0] = -1
    return write_case(folder, "bad", label=label)[1].name


def _non_consecutive_labels(folder: Path) -> str:
    return write_case(folder, "bad", label=make_label(values=(1, 4)))[1].name


def _garbage_file(folder: Path) -> str:
    img, _ = write_case(folder, "bad")
    img.write_bytes(b"this is not a nifti file" * 10)
    return img.name


def _empty_file(folder: Path) -> str:
    _, gt = write_case(folder, "bad")
    gt.write_bytes(b"")
    return gt.name


def _four_d_image(folder: Path) -> str:
    img, _ = write_case(folder, "bad")
    write_image(Image.from_array(np.zeros((2, *SHAPE), np.float32)), img)
    return img.name


def _two_d_label_for_3d_image(folder: Path) -> str:
    _, gt = write_case(folder, "bad")
    write_image(Image.from_array(np.zeros(SHAPE[1:], np.uint8)), gt)
    return gt.name


BAD_INPUTS: dict[str, Callable[[Path], str]] = {
    "missing label": _missing_label,
    "missing image": _missing_image,
    "shape mismatch": _shape_mismatch,
    "spacing mismatch": _spacing_mismatch,
    "large origin mismatch": _origin_mismatch,
    "direction mismatch": _direction_mismatch,
    "NaN image": _nan_image,
    "Inf image": _inf_image,
    "non-integer label": _fractional_label,
    "negative label": _negative_label,
    "non-consecutive labels": _non_consecutive_labels,
    "unreadable file": _garbage_file,
    "empty file": _empty_file,
    "4D image": _four_d_image,
    "2D label for 3D image": _two_d_label_for_3d_image,
}
EXPECTED_MESSAGE = {
    "missing label": "no label",
    "missing image": "no image",
    "shape mismatch": "size",
    "spacing mismatch": "spacing",
    "large origin mismatch": "origin",
    "direction mismatch": "direction",
    "NaN image": "NaN",
    "Inf image": "Inf",
    "non-integer label": "non-integer",
    "negative label": "negative",
    "non-consecutive labels": "non-consecutive",
    "unreadable file": "cannot read",
    "empty file": "empty",
    "4D image": "4D",
    "2D label for 3D image": "2D",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_exits_2_names_file_writes_nothing(mock_dir: Path, tmp_path: Path, kind: str) -> None:
    bad_name = BAD_INPUTS[kind](mock_dir)
    out = tmp_path / "not" / "yet" / "raw"
    result = invoke(*prepare_args(mock_dir, out))
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert bad_name in message
    assert EXPECTED_MESSAGE[kind] in message
    assert "1 of 4 cases are invalid" in message
    assert not (tmp_path / "not").exists()


def test_bad_input_leaves_existing_out_folder_untouched(mock_dir: Path, tmp_path: Path) -> None:
    _nan_image(mock_dir)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert invoke(*prepare_args(mock_dir, out)).exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_all_problems_are_listed_together(mock_dir: Path, tmp_path: Path) -> None:
    _missing_label(mock_dir)
    spacing_name = write_case(mock_dir, "bad2", label_geometry={"spacing": (1.0, 1.0, 1.0)})[1].name
    result = invoke(*prepare_args(mock_dir, tmp_path / "raw", "--json"))
    assert result.exit_code == 2
    message = flat(result.stderr)
    assert "bad_img.nii.gz" in message and spacing_name in message and "2 of 5 cases" in message
    problems = json.loads(result.stdout)["problems"]
    assert len(problems) == 2 and json.loads(result.stdout)["ok"] is False


def test_label_value_outside_label_names(mock_dir: Path, tmp_path: Path) -> None:
    result = invoke(*prepare_args(mock_dir, tmp_path / "raw", "--label-names", "liver"))
    assert result.exit_code == 2
    assert "case_000_gt.nii.gz" in flat(result.stderr) and "[2]" in flat(result.stderr)
    assert not (tmp_path / "raw").exists()


def test_small_geometry_differences_warn_and_use_image_geometry(mock_dir: Path, tmp_path: Path) -> None:
    tiny = {"origin": (-10.5, 3.25, 7.0 + 0.5), "spacing": (0.75, 1.25, 2.5 * (1 + 2e-4))}  # 0.2 voxel
    write_case(mock_dir, "shifted", label_geometry=tiny)
    out = tmp_path / "raw"
    result = invoke(*prepare_args(mock_dir, out, "--link", "--json"))
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 2 and all("shifted_gt.nii.gz" in w for w in warnings)
    label = out / "Dataset007_Test" / "labelsTr" / "shifted.nii.gz"
    assert not label.is_symlink()  # rewritten with the image's geometry
    got = read_image(label)
    assert got.origin == ORIGIN and got.spacing == SPACING
    assert invoke("verify", out / "Dataset007_Test").exit_code == 0


def test_empty_mask_is_a_warning(mock_dir: Path, tmp_path: Path) -> None:
    write_case(mock_dir, "empty", label=np.zeros(SHAPE, np.uint8))
    result = invoke(*prepare_args(mock_dir, tmp_path / "raw", "--json"))
    assert result.exit_code == 0, result.output
    assert any("empty_gt.nii.gz" in w and "empty" in w for w in json.loads(result.stdout)["warnings"])


def test_skip_invalid_prepares_the_valid_cases(mock_dir: Path, tmp_path: Path) -> None:
    _nan_image(mock_dir)
    write_case(mock_dir, "gap", label=make_label(values=(1, 4)))
    out = tmp_path / "raw"
    result = invoke(*prepare_args(mock_dir, out, "--skip-invalid", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [s["case"] for s in summary["skipped"]] == ["bad", "gap"]
    assert "NaN" in summary["skipped"][0]["problems"][0]
    assert summary["cases"]["train"] == ["case_000", "case_001", "case_002"]
    assert "skipping case 'bad'" in flat(result.stderr)
    assert json.loads((out / "Dataset007_Test" / "dataset.json").read_text())["numTraining"] == 3


def test_skip_invalid_with_nothing_valid_fails(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _nan_image(src)
    result = invoke(*prepare_args(src, tmp_path / "raw", "--skip-invalid"))
    assert result.exit_code == 2 and "no valid cases" in flat(result.stderr)
    assert not (tmp_path / "raw").exists()


def test_overwrite_semantics(mock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    dataset = out / "Dataset007_Test"
    assert invoke(*prepare_args(mock_dir, out)).exit_code == 0
    (dataset / "marker.txt").write_text("old")
    result = invoke(*prepare_args(mock_dir, out))
    assert result.exit_code == 2
    assert "Dataset007_Test" in flat(result.stderr) and "--overwrite" in flat(result.stderr)
    assert (dataset / "marker.txt").exists()
    assert invoke(*prepare_args(mock_dir, out, "--overwrite")).exit_code == 0
    assert not (dataset / "marker.txt").exists()
    assert (dataset / "dataset.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["Dataset007_Test"]


def test_duplicate_dataset_id_is_refused(mock_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    (out / "Dataset007_Other").mkdir(parents=True)
    result = invoke(*prepare_args(mock_dir, out))
    assert result.exit_code == 2 and "Dataset007_Other" in flat(result.stderr)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--dataset-id", "0"), "between 1 and 999"),
        (("--name", "bad name"), "not a valid dataset name"),
        (("--test-fraction", "1.0"), "--test-fraction"),
        (("--channel-names", "R,G"), "--channel-names gives 2 names"),
        (("--label-names", "a,a"), "duplicate"),
        (("--layout", "isic"), "--images"),
    ],
)
def test_bad_options(mock_dir: Path, tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    result = invoke(*prepare_args(mock_dir, tmp_path / "raw", *extra))
    assert result.exit_code == 2
    assert message in flat(result.stderr)
    assert not (tmp_path / "raw").exists()


def test_crash_while_writing_leaves_no_dataset(
    mock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(mock_dir, "nrrd_case", ext=".nrrd")  # forces a conversion through write_image

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(nnunet_prepare, "write_image", boom)
    out = tmp_path / "raw"
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(PrepareOptions(out=out, dataset_id=7, name="Test", folder=mock_dir))
    assert not out.exists()


def test_geometry_tolerances() -> None:
    ref = Image.from_array(np.zeros(SHAPE), spacing=SPACING, origin=ORIGIN)
    same = Image.from_array(np.zeros(SHAPE), spacing=(0.75 * (1 + 1e-7), 1.25, 2.5), origin=ORIGIN)
    assert geometry_issues(ref, same) == ([], [])
    half = Image.from_array(np.zeros(SHAPE), spacing=SPACING, origin=(-10.5 + 0.3, 3.25, 7.0))  # 0.4 voxel
    errors, warnings = geometry_issues(ref, half)
    assert errors == [] and len(warnings) == 1
    far = Image.from_array(np.zeros(SHAPE), spacing=SPACING, origin=(-10.5 + 0.5, 3.25, 7.0))  # 0.67 voxel
    assert len(geometry_issues(ref, far)[0]) == 1
    spacing = Image.from_array(np.zeros(SHAPE), spacing=(0.75, 1.25, 2.5 * (1 + 5e-4)), origin=ORIGIN)
    assert geometry_issues(ref, spacing)[0] == []
    assert len(geometry_issues(ref, spacing, strict_spacing=True)[0]) == 1


# --------------------------------------------------------------------------------------------------
# --tile: spatially separate tiles as cases


def _physical(image: Image, index_zyx: tuple[int, ...]) -> np.ndarray:
    """Physical position of the voxel at array index ``index_zyx``."""
    nd = image.ndim
    direction = np.asarray(image.direction).reshape(nd, nd)
    return np.asarray(image.origin) + direction @ (np.asarray(image.spacing) * np.asarray(index_zyx[::-1]))


@pytest.mark.parametrize(
    ("length", "size", "expected"),
    [
        (10, 4, [(0, 3), (3, 7), (7, 10)]),
        (8, 4, [(0, 4), (4, 8)]),
        (5, 0, [(0, 5)]),
        (3, 10, [(0, 3)]),
    ],
)
def test_axis_bounds_near_equal_and_complete(length: int, size: int, expected: list[tuple[int, int]]) -> None:
    from ncatool.data.tiles import axis_bounds

    assert axis_bounds(length, size) == expected


def test_tile_3d_slabs_keep_voxels_and_physical_positions(tmp_path: Path) -> None:
    src = tmp_path / "in"
    shape = (9, 8, 6)
    spacing, origin = (0.7, 1.3, 3.1), (-12.3, 45.6, 7.89)
    image = make_image(3, shape)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:7, 2:6, 1:5] = 1
    label[4:6, 3:5, 2:4] = 2
    write_case(src, "vol", image=image, label=label, spacing=spacing, origin=origin, direction=PERMUTED)
    out = tmp_path / "raw"
    result = invoke(*prepare_args(src, out, "--tile", "3,0,0", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tiled_from"] == {"vol": ["vol_t000", "vol_t001", "vol_t002"]}
    dataset = out / "Dataset007_Test"
    tiles = json.loads((dataset / "tiles.json").read_text())
    source = read_image(src / "vol_img.nii.gz")
    rebuilt_image, rebuilt_label = np.zeros_like(image), np.zeros_like(label)
    for name, info in tiles.items():
        assert info["case"] == "vol" and info["shape"] == [3, 8, 6]
        region = tuple(slice(a, a + n) for a, n in zip(info["start"], info["shape"], strict=True))
        tile_img = read_image(dataset / "imagesTr" / f"{name}_0000.nii.gz")
        tile_gt = read_image(dataset / "labelsTr" / f"{name}.nii.gz")
        rebuilt_image[region] = tile_img.array
        rebuilt_label[region] = tile_gt.array
        np.testing.assert_allclose(tile_img.spacing, spacing, rtol=1e-6)
        np.testing.assert_allclose(tile_gt.origin, tile_img.origin, atol=1e-5)
        # the tile's first voxel sits where the source's voxel at its start index sits
        np.testing.assert_allclose(
            _physical(tile_img, (0, 0, 0)), _physical(source, tuple(info["start"])), atol=1e-4
        )
        np.testing.assert_allclose(
            _physical(tile_img, (2, 7, 5)),
            _physical(source, tuple(a + b for a, b in zip(info["start"], (2, 7, 5), strict=True))),
            atol=1e-4,
        )
    np.testing.assert_array_equal(rebuilt_image, image)
    np.testing.assert_array_equal(rebuilt_label, label)
    assert invoke("verify", dataset).exit_code == 0


def test_tile_2d_png_splits_tiles_into_train_and_test(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 8), dtype=np.uint8)
    mask = np.where(pixels > 128, 255, 0).astype(np.uint8)
    PILImage.fromarray(pixels).save(src / "field_img.png")
    PILImage.fromarray(mask).save(src / "field_gt.png")
    out = tmp_path / "raw"
    result = invoke(*prepare_args(src, out, "--tile", "4", "--test-fraction", "0.5", "--seed", "3", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    cases = summary["cases"]
    assert len(cases["train"]) == 3 and len(cases["test"]) == 3
    assert sorted(cases["train"] + cases["test"]) == [f"field_t{i:03d}" for i in range(6)]
    dataset = out / "Dataset007_Test"
    tiles = json.loads((dataset / "tiles.json").read_text())
    assert [tiles[f"field_t{i:03d}"]["start"] for i in range(6)] == [
        [0, 0], [0, 4], [3, 0], [3, 4], [7, 0], [7, 4]
    ]  # fmt: skip
    for name in cases["test"]:
        info = tiles[name]
        region = tuple(slice(a, a + n) for a, n in zip(info["start"], info["shape"], strict=True))
        got = read_image(dataset / "labelsTs" / f"{name}.nii.gz")
        assert got.ndim == 2
        np.testing.assert_array_equal(got.array, (mask[region] == 255).astype(np.uint8))
        np.testing.assert_array_equal(
            read_image(dataset / "imagesTs" / f"{name}_0000.nii.gz").array, pixels[region]
        )
    assert invoke("verify", dataset).exit_code == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [("abc", "--tile must be comma-separated integers"), ("0", "not all 0"), ("2,2", "images are 3D")],
)
def test_bad_tile_spec_exits_2_and_writes_nothing(
    mock_dir: Path, tmp_path: Path, spec: str, message: str
) -> None:
    out = tmp_path / "raw"
    result = invoke(*prepare_args(mock_dir, out, "--tile", spec))
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert not (out / "Dataset007_Test").exists()
