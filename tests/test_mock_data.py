"""Tests for ``ncatool mock-data`` and :mod:`ncatool.data.mock` (small sizes, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import read_image
from ncatool.data.mock import (
    SHAPE_ALIASES,
    SHAPES,
    SHAPES_2D,
    case_rng,
    generate_case,
    parse_shapes,
    parse_spacing,
    write_mock_dataset,
)
from ncatool.errors import NcaError

runner = CliRunner()
SMALL = ["--size-min", "16", "--size-max", "20"]


def run(*args: str):
    return runner.invoke(app, ["mock-data", *args])


def flat(text: str) -> str:
    """Output without whitespace (rich wraps long lines, even inside file names)."""
    return "".join(text.split())


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------- CLI


def test_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--out", "--cases", "--dim", "--shapes", "--multi", "--noise", "--bias", "--spacing"):
        assert option in result.output


def test_writes_pairs_with_geometry(tmp_path: Path) -> None:
    out = tmp_path / "mock"
    result = run("--out", str(out), "--cases", "2", *SMALL, "--spacing", "0.5,0.75,2.5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "case_001_gt.nii.gz",
        "case_001_img.nii.gz",
        "case_002_gt.nii.gz",
        "case_002_img.nii.gz",
    ]
    for case in ("case_001", "case_002"):
        img = read_image(out / f"{case}_img.nii.gz")
        gt = read_image(out / f"{case}_gt.nii.gz")
        assert img.array.dtype == np.float32
        assert gt.array.dtype == np.uint8
        assert img.array.ndim == 3 and img.array.shape == gt.array.shape
        assert all(16 <= n <= 20 for n in img.array.shape)
        for im in (img, gt):
            assert im.spacing == pytest.approx((0.5, 0.75, 2.5))
            assert im.origin == pytest.approx((0.0, 0.0, 0.0))
            assert im.direction == pytest.approx(tuple(np.eye(3).ravel()))
        assert set(np.unique(gt.array)) == {0, 1}
        # objects are bright, background dark
        assert img.array[gt.array == 1].mean() > img.array[gt.array == 0].mean() + 0.4
        # fully inside: the border is background
        border = np.ones(gt.array.shape, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not gt.array[border].any()
    assert "case_001" in flat(result.stderr)  # summary table on stderr
    assert result.stdout == ""


def test_same_seed_byte_identical_different_seed_differs(tmp_path: Path) -> None:
    args = ["--cases", "2", *SMALL, "--multi", "2"]
    assert run("--out", str(tmp_path / "a"), *args).exit_code == 0
    assert run("--out", str(tmp_path / "b"), *args).exit_code == 0
    assert run("--out", str(tmp_path / "c"), *args, "--seed", "1").exit_code == 0
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_case_does_not_depend_on_number_of_cases(tmp_path: Path) -> None:
    assert run("--out", str(tmp_path / "one"), "--cases", "1", *SMALL).exit_code == 0
    assert run("--out", str(tmp_path / "three"), "--cases", "3", *SMALL).exit_code == 0
    one, three = files(tmp_path / "one"), files(tmp_path / "three")
    assert one["case_001_img.nii.gz"] == three["case_001_img.nii.gz"]
    assert one["case_001_gt.nii.gz"] == three["case_001_gt.nii.gz"]


def test_multi_labels(tmp_path: Path) -> None:
    result = run("--out", str(tmp_path), "--cases", "3", *SMALL, "--multi", "3", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    for rec in records:
        gt = read_image(rec["label"]).array
        img = read_image(rec["image"]).array
        assert gt.dtype == np.uint8
        assert set(np.unique(gt)) == {0, 1, 2, 3}
        assert rec["label_voxels"] == {str(k): int((gt == k).sum()) for k in (1, 2, 3)}
        assert len(rec["shapes"]) == 3
        # label k has a higher mean intensity than label k-1 (learnable)
        means = [float(img[gt == k].mean()) for k in range(4)]
        assert means == sorted(means)


def test_2d(tmp_path: Path) -> None:
    result = run("--out", str(tmp_path), "--cases", "2", "--dim", "2", *SMALL, "--spacing", "0.8", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    for rec in records:
        img, gt = read_image(rec["image"]), read_image(rec["label"])
        assert img.array.ndim == 2 and gt.array.shape == img.array.shape
        assert img.spacing == pytest.approx((0.8, 0.8))
        assert rec["spacing"] == pytest.approx([0.8, 0.8])
        assert rec["size"] == list(reversed(img.array.shape))
        assert all(s in SHAPES_2D.values() for s in rec["shapes"])


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("shape", [*SHAPES, *SHAPES_2D.values()])
def test_every_shape_name(tmp_path: Path, dim: int, shape: str) -> None:
    result = run(
        "--out", str(tmp_path), "--cases", "1", "--dim", str(dim), *SMALL, "--shapes", shape, "--json"
    )
    assert result.exit_code == 0, result.output
    (rec,) = json.loads(result.stdout)
    canonical = SHAPE_ALIASES[shape]
    assert rec["shapes"] == [SHAPES_2D[canonical] if dim == 2 else canonical]
    gt = read_image(rec["label"]).array
    assert gt.ndim == dim
    assert rec["label_voxels"]["1"] == int((gt == 1).sum()) > 0


def test_json_output(tmp_path: Path) -> None:
    result = run(
        "--out", str(tmp_path), "--cases", "2", *SMALL, "--prefix", "demo", "--json", "--shapes", "torus"
    )
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["case"] for r in records] == ["demo_001", "demo_002"]
    for rec in records:
        assert set(rec) >= {"case", "image", "label", "shape", "spacing", "shapes", "label_voxels"}
        assert Path(rec["image"]).name == f"{rec['case']}_img.nii.gz"
        assert Path(rec["label"]).name == f"{rec['case']}_gt.nii.gz"
        assert rec["shapes"] == ["torus"]
        assert rec["spacing"] == [1.0, 1.0, 1.0]


def test_shapes_repeated_and_comma(tmp_path: Path) -> None:
    result = run(
        "--out",
        str(tmp_path),
        "--cases",
        "4",
        *SMALL,
        "--multi",
        "3",
        "--shapes",
        "sphere,cube",
        "--shapes",
        "cube",
        "--json",
    )
    assert result.exit_code == 0, result.output
    used = {s for rec in json.loads(result.stdout) for s in rec["shapes"]}
    assert used <= {"sphere", "cube"}


def test_bad_shape_name(tmp_path: Path) -> None:
    out = tmp_path / "mock"
    result = run("--out", str(out), "--cases", "1", *SMALL, "--shapes", "sphere,blob")
    assert result.exit_code == 2
    assert "blob" in flat(result.stderr)
    assert not out.exists()


@pytest.mark.parametrize("spacing", ["1,2", "0,1,1", "a"])
def test_bad_spacing(tmp_path: Path, spacing: str) -> None:
    result = run("--out", str(tmp_path / "m"), "--cases", "1", *SMALL, "--spacing", spacing)
    assert result.exit_code == 2
    assert "--spacing" in flat(result.stderr)
    assert not (tmp_path / "m").exists()


def test_bad_sizes(tmp_path: Path) -> None:
    result = run("--out", str(tmp_path / "m"), "--size-min", "20", "--size-max", "10")
    assert result.exit_code == 2
    assert "--size-max" in flat(result.stderr)
    assert not (tmp_path / "m").exists()


def test_existing_files_need_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mock"
    out.mkdir()
    (out / "case_002_gt.nii.gz").write_bytes(b"precious")
    result = run("--out", str(out), "--cases", "2", *SMALL)
    assert result.exit_code == 2
    assert "case_002_gt.nii.gz" in flat(result.stderr)
    assert "--overwrite" in flat(result.stderr)
    assert [p.name for p in out.iterdir()] == ["case_002_gt.nii.gz"]  # nothing written
    assert (out / "case_002_gt.nii.gz").read_bytes() == b"precious"

    result = run("--out", str(out), "--cases", "2", *SMALL, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(list(out.iterdir())) == 4
    assert read_image(out / "case_002_gt.nii.gz").array.dtype == np.uint8


def test_out_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = run("--out", str(target), "--cases", "1", *SMALL)
    assert result.exit_code == 2
    assert "file.txt" in flat(result.stderr)


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["-q", "mock-data", "--out", str(tmp_path), "--cases", "1", *SMALL])
    assert result.exit_code == 0, result.output
    assert result.output == ""


# ---------------------------------------------------------------------------------------------------- library


def test_parse_shapes() -> None:
    assert parse_shapes(None) == SHAPES
    assert parse_shapes(["all"]) == SHAPES
    assert parse_shapes(["disk, Ring", "sphere"]) == ("sphere", "torus")
    with pytest.raises(NcaError, match="'hexagon'"):
        parse_shapes(["hexagon"])


def test_parse_spacing() -> None:
    assert parse_spacing(None, 3) == (1.0, 1.0, 1.0)
    assert parse_spacing("2", 2) == (2.0, 2.0)
    assert parse_spacing("1,1,2.5", 3) == (1.0, 1.0, 2.5)
    with pytest.raises(NcaError, match="expected 1 or 2"):
        parse_spacing("1,1,2.5", 2)
    with pytest.raises(NcaError, match="positive"):
        parse_spacing("1,-1,1", 3)


@pytest.mark.parametrize("dim", [2, 3])
def test_generate_case_contract(dim: int) -> None:
    for index in range(5):
        image, mask, info = generate_case(
            case_rng(3, index), dim=dim, size_min=12, size_max=16, n_objects=2, noise=0.0, bias=0.0
        )
        assert image.dtype == np.float32 and mask.dtype == np.uint8
        assert image.shape == mask.shape and image.ndim == dim
        assert list(image.shape) == info["shape"]
        assert set(np.unique(mask)) == {0, 1, 2}
        # no noise, no bias: intensities are piecewise constant per label
        for label in (0, 1, 2):
            assert np.ptp(image[mask == label]) == 0
        assert image[mask == 0].max() <= 0.2 and image[mask > 0].min() >= 0.5


def test_tiny_crowded_volume_keeps_every_label() -> None:
    for index in range(10):
        _, mask, info = generate_case(case_rng(0, index), dim=3, size_min=8, size_max=8, n_objects=12)
        assert set(np.unique(mask)) == set(range(13))
        assert all(v > 0 for v in info["label_voxels"].values())


def test_anisotropic_sphere_is_round_in_mm() -> None:
    _, mask, _ = generate_case(
        case_rng(0, 0), dim=3, size_min=40, size_max=40, shapes=("sphere",), spacing=(1.0, 1.0, 2.0)
    )
    zs, _, xs = np.nonzero(mask)
    extent_z = (zs.max() - zs.min() + 1) * 2.0
    extent_x = (xs.max() - xs.min() + 1) * 1.0
    assert abs(extent_z - extent_x) <= 2.5


def test_library_refuses_existing(tmp_path: Path) -> None:
    write_mock_dataset(tmp_path, 1, dim=2, size_min=10, size_max=10)
    before = files(tmp_path)
    with pytest.raises(NcaError, match=r"case_001_img\.nii\.gz"):
        write_mock_dataset(tmp_path, 1, dim=2, size_min=10, size_max=10, seed=5)
    assert files(tmp_path) == before
