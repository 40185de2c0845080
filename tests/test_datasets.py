"""Tests for ncatool.data.loading, .transforms, .splits and .datasets: reading cases, normalisation,
resizing, splits, torch datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ncatool.data.datasets import DataConfig, SliceDataset, VolumeDataset
from ncatool.data.io import Image, write_image
from ncatool.data.loading import CaseRecord, NnUNetDataset, dataset_info, load_case, load_cases, normalize
from ncatool.data.splits import held_out_count, split_cases, split_indices
from ncatool.data.transforms import (
    crop,
    flip,
    one_hot_foreground,
    random_patch_start,
    resize_image,
    resize_label,
    rot90,
)
from ncatool.errors import NcaError, ValidationError

SHAPE = (8, 12, 16)  # (Z, Y, X)
SPACING = (0.5, 0.75, 2.0)  # (x, y, z)


def _label(shape: tuple[int, ...], case: int) -> np.ndarray:
    """A small box of label 1 and a smaller one of label 2, shifted per case."""
    if len(shape) == 3 and shape[0] == 1:
        return _label(shape[1:], case)[None]
    label = np.zeros(shape, np.uint8)
    if len(shape) == 3:
        label[2:5, 3 + case : 7 + case, 4:9] = 1
        label[3, 5 + case, 10 + case] = 2
    else:
        label[3 + case : 7 + case, 4:9] = 1
        label[5 + case, 10 + case] = 2
    return label


def _write_json(root: Path, num_channels: int, num_training: int, **extra: object) -> None:
    meta = {
        "channel_names": {str(c): f"ch{c}" for c in range(num_channels)},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": "Test",
    }
    meta.update(extra)
    (root / "dataset.json").write_text(json.dumps(meta))


def make_dataset(
    root: Path,
    n_cases: int = 3,
    num_channels: int = 2,
    shape: tuple[int, ...] = SHAPE,
    image_from_label: bool = False,
    n_test: int = 0,
) -> Path:
    """Write a tiny nnU-Net raw dataset; channel c of case k is ``rand * (c + 1) + 10 * c``."""
    rng = np.random.default_rng(42)
    spacing = SPACING if len(shape) == 3 else SPACING[:2]
    for split, n, img_dir, lab_dir in (
        ("tr", n_cases, "imagesTr", "labelsTr"),
        ("ts", n_test, "imagesTs", "labelsTs"),
    ):
        for k in range(n):
            name = f"{split}{k:03d}"
            label = _label(shape, k)
            base = (
                label.astype(np.float32) if image_from_label else rng.normal(50, 20, shape).astype(np.float32)
            )
            for c in range(num_channels):
                arr = base * (c + 1) + 10 * c if not image_from_label else base
                write_image(Image.from_array(arr, spacing=spacing), root / img_dir / f"{name}_{c:04d}.nii.gz")
            write_image(Image.from_array(label, spacing=spacing), root / lab_dir / f"{name}.nii.gz")
    _write_json(root, num_channels, n_cases)
    return root


@pytest.fixture(scope="module")
def ds3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("Dataset001_Test"), n_test=1)


@pytest.fixture(scope="module")
def ds_label_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One channel equal to the label (as float): lets tests check image/label alignment."""
    return make_dataset(
        tmp_path_factory.mktemp("Dataset002_Aligned"), n_cases=2, num_channels=1, image_from_label=True
    )


# --- reading


def test_load_cases_and_channel_stacking(ds3d: Path) -> None:
    cases = load_cases(ds3d)
    assert [c.name for c in cases] == ["tr000", "tr001", "tr002"]
    assert all(len(c.image_paths) == 2 and c.label_path is not None for c in cases)
    data = load_case(cases[1])
    assert data.image.shape == (2, *SHAPE) and data.image.dtype == np.float32
    assert data.label is not None and data.label.shape == SHAPE and data.label.dtype == np.int64
    np.testing.assert_allclose(data.image[1], data.image[0] * 2 + 10, rtol=1e-5)
    np.testing.assert_array_equal(data.label, _label(SHAPE, 1))
    assert data.spacing == pytest.approx(SPACING)
    assert data.array_spacing == pytest.approx((2.0, 0.75, 0.5))
    assert data.to_image(data.label).array.shape == SHAPE


def test_test_split_and_info(ds3d: Path) -> None:
    test = load_cases(ds3d, "test")
    assert [c.name for c in test] == ["ts000"] and test[0].label_path is not None
    info = dataset_info(ds3d)
    assert info["num_channels"] == 2 and info["dim"] == 3 and info["numTraining"] == 3
    assert info["labels"] == {"background": 0, "organ": 1, "lesion": 2} and info["num_foreground"] == 2


def test_test_split_without_labels(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n_cases=1, num_channels=1, n_test=1)
    (root / "labelsTs" / "ts000.nii.gz").unlink()
    assert load_cases(root, "test")[0].label_path is None


# --- errors


def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(NcaError, match=r"dataset\.json"):
        load_cases(tmp_path)


def test_missing_channel_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n_cases=2, num_channels=2)
    (root / "imagesTr" / "tr001_0001.nii.gz").unlink()
    with pytest.raises(NcaError, match=r"tr001_0001\.nii\.gz"):
        load_cases(root)


def test_missing_label_and_count_mismatch(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n_cases=2, num_channels=1)
    _write_json(root, 1, 3)
    with pytest.raises(NcaError, match="numTraining"):
        load_cases(root)
    _write_json(root, 1, 2)
    (root / "labelsTr" / "tr000.nii.gz").unlink()
    with pytest.raises(NcaError, match=r"tr000\.nii\.gz"):
        load_cases(root)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"channel_names": None}, "channel_names"),
        ({"labels": {"background": 0, "x": 2}}, "labels"),
        ({"labels": {"background": 0, "x": [1, 2]}}, "region"),
        ({"labels": {"background": 0, "x": 1, "ignore": 2}}, "ignore"),
        ({"labels": {"x": 1, "y": 2}}, "background"),
        ({"file_ending": None}, "file_ending"),
        ({"file_ending": ".xyz"}, "file_ending"),
        ({"numTraining": "3"}, "numTraining"),
        ({"numTraining": -1}, "numTraining"),
        ({"channel_names": {"1": "CT"}}, "channel_names"),
    ],
)
def test_invalid_dataset_json(tmp_path: Path, meta: dict, match: str) -> None:
    """One reader: what ncatool cannot use is refused by training and, if nnU-Net's rules forbid
    it too (not regions and ignore labels, which nnU-Net allows), by verify."""
    from ncatool.data.nnunet.verify import verify_raw_dataset

    _write_json(tmp_path, 1, 0)
    full = json.loads((tmp_path / "dataset.json").read_text())
    for key, value in meta.items():
        if value is None:
            del full[key]
        else:
            full[key] = value
    (tmp_path / "dataset.json").write_text(json.dumps(full))
    with pytest.raises(NcaError, match=match) as info:
        NnUNetDataset(tmp_path)
    assert "dataset.json" in str(info.value)
    if match in ("region", "ignore"):
        return
    with pytest.raises(ValidationError, match=match):
        verify_raw_dataset(tmp_path)


def test_bad_json_and_label_out_of_range(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n_cases=1, num_channels=1)
    ds = NnUNetDataset(root)
    bad = np.full(SHAPE, 5, np.uint8)
    write_image(Image.from_array(bad, spacing=SPACING), root / "labelsTr" / "tr000.nii.gz")
    with pytest.raises(NcaError, match=r"tr000\.nii\.gz: label values \[5\] are not in dataset.json labels"):
        ds.load(ds.cases()[0])
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(NcaError, match="invalid JSON"):
        NnUNetDataset(root)


def test_config_validation() -> None:
    with pytest.raises(NcaError, match="normalization"):
        DataConfig(normalization="foo")
    with pytest.raises(NcaError, match="ct_window"):
        DataConfig(ct_window=(400, -1000))
    with pytest.raises(NcaError, match="val_fraction"):
        DataConfig(val_fraction=1.0)


# --- normalisation


def test_zscore_per_channel() -> None:
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100, 30, SHAPE), rng.normal(-5, 2, SHAPE)]).astype(np.float32)
    out = normalize(image, "zscore")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(2, -1).mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(2, -1).std(1), 1, atol=1e-4)


def test_zscore_nonzero_keeps_background() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((1, *SHAPE), np.float32)
    image[0, 2:6] = rng.normal(300, 50, (4, *SHAPE[1:]))
    out = normalize(image, "zscore", nonzero=True)
    inside = out[0, 2:6]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
    assert np.all(out[0, :2] == 0) and np.all(out[0, 6:] == 0)


def test_ct_window_and_minmax() -> None:
    image = np.array([[-3000.0, -1000.0, -300.0, 400.0, 3000.0]], np.float32)
    np.testing.assert_allclose(normalize(image, "ct", (-1000, 400)), [[0, 0, 0.5, 1, 1]], atol=1e-6)
    mm = normalize(image, "minmax")
    assert mm.min() == 0 and mm.max() == 1
    np.testing.assert_array_equal(normalize(image, "none"), image)


def test_normalization_applied_on_load(ds3d: Path) -> None:
    data = load_case(load_cases(ds3d)[0], DataConfig(normalization="ct", ct_window=(40.0, 60.0)))
    assert data.image.min() >= 0 and data.image.max() <= 1


# --- resize / patches


def test_resize_shapes_and_label_values() -> None:
    label = torch.from_numpy(_label(SHAPE, 0).astype(np.int64))
    image = label[None].float().repeat(2, 1, 1, 1)
    assert resize_image(image, (4, 6, 8)).shape == (2, 4, 6, 8)
    small = resize_label(label, (5, 7, 9))
    assert small.shape == (5, 7, 9) and small.dtype == torch.int64
    assert set(small.unique().tolist()) <= {0, 1, 2}
    big = resize_label(label, (16, 24, 32))
    assert set(big.unique().tolist()) == {0, 1, 2}
    assert resize_image(image[:, 0], (3, 5)).shape == (2, 3, 5)


def test_volume_dataset_resize(ds3d: Path) -> None:
    ds = VolumeDataset(load_cases(ds3d), DataConfig(target_size=(4, 6, 8)), train=False)
    image, label = ds[0]
    assert len(ds) == 3
    assert image.shape == (2, 4, 6, 8) and image.dtype == torch.float32
    assert label.shape == (4, 6, 8) and label.dtype == torch.int64


def test_random_patch_start_inside() -> None:
    rng = np.random.default_rng(0)
    fg = {1: np.array([[0, 0, 0], [7, 11, 15]])}
    for _ in range(200):
        start = random_patch_start(SHAPE, (4, 5, 6), rng, fg, foreground_prob=0.5)
        assert all(0 <= s <= n - p for s, n, p in zip(start, SHAPE, (4, 5, 6), strict=True))


def test_volume_patches_are_crops(ds3d: Path) -> None:
    cases = load_cases(ds3d)
    full_image, full_label = VolumeDataset(cases, DataConfig(normalization="none"), train=False)[0]
    cfg = DataConfig(normalization="none", patch_size=(4, 5, 6), foreground_prob=0.0, seed=3)
    ds = VolumeDataset(cases, cfg, train=True)
    for _ in range(10):
        image, label = ds[0]
        assert image.shape == (2, 4, 5, 6) and label.shape == (4, 5, 6)
        # Locate the patch in the full volume by its first voxel (random values are unique).
        where = (full_image[0] == image[0, 0, 0, 0]).nonzero()
        assert len(where) == 1
        start = where[0].tolist()
        assert torch.equal(crop(full_image, start, (4, 5, 6)), image)
        assert torch.equal(crop(full_label, start, (4, 5, 6)), label)


def test_foreground_patches_and_padding(ds3d: Path) -> None:
    cfg = DataConfig(normalization="none", patch_size=(2, 2, 2), foreground_prob=1.0)
    ds = VolumeDataset(load_cases(ds3d), cfg, train=True)
    assert all((ds[i % 3][1] > 0).any() for i in range(12))
    big = VolumeDataset(load_cases(ds3d), DataConfig(patch_size=(10, 12, 20)), train=True)
    image, label = big[0]
    assert image.shape == (2, 10, 12, 20) and label.shape == (10, 12, 20)


def test_epoch_seeding(ds3d: Path) -> None:
    cfg = DataConfig(patch_size=(4, 4, 4), flip_axes=(0, 1, 2), seed=5)
    a, b = VolumeDataset(load_cases(ds3d), cfg, True), VolumeDataset(load_cases(ds3d), cfg, True)
    first = [a[0][0] for _ in range(3)]
    assert all(torch.equal(x, b[0][0]) for x in first)
    a.set_epoch(1)
    b.set_epoch(1)
    again = [a[0][0] for _ in range(3)]
    assert all(torch.equal(x, b[0][0]) for x in again)
    assert not all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


# --- augmentation


def test_flip_rot90_functions() -> None:
    label = torch.arange(2 * 3 * 3).reshape(2, 3, 3)
    image = torch.stack([label.float(), -label.float()])
    fi, fl = flip(image, label, [0, -1])
    assert torch.equal(fl, label.flip(0, 2)) and torch.equal(fi[1], -fl.float())
    ri, rl = rot90(image, label, 1)
    assert torch.equal(rl, torch.rot90(label, 1, (1, 2))) and torch.equal(ri[0], rl.float())


def test_augmentation_same_transform(ds_label_image: Path) -> None:
    cases = load_cases(ds_label_image)
    # 3D: in-plane (12, 16) is not square, so only 0° / 180°; flips along every axis.
    cfg3 = DataConfig(normalization="none", flip_axes=(0, 1, 2), rot90=True, seed=1)
    ds3 = VolumeDataset(cases, cfg3, train=True)
    changed = False
    for _ in range(8):
        image, label = ds3[0]
        assert image.shape == (1, *SHAPE)
        assert torch.equal(image[0].long(), label)
        changed |= not torch.equal(label, torch.from_numpy(_label(SHAPE, 0).astype(np.int64)))
    assert changed
    # Square 2D patches of slices: all four rotations possible.
    cfg2 = DataConfig(normalization="none", flip_axes=(0, 1), rot90=True, patch_size=(8, 8), seed=2)
    ds2 = SliceDataset(cases, cfg2, train=True)
    for i in range(len(ds2)):
        image, label = ds2[i]
        assert image.shape == (1, 8, 8)
        assert torch.equal(image[0].long(), label)


def test_no_augmentation_in_eval(ds_label_image: Path) -> None:
    cfg = DataConfig(normalization="none", flip_axes=(0, 1, 2), rot90=True)
    ds = VolumeDataset(load_cases(ds_label_image), cfg, train=False)
    np.testing.assert_array_equal(ds[0][1].numpy(), _label(SHAPE, 0))


def test_config_must_fit_dataset(ds3d: Path) -> None:
    with pytest.raises(NcaError, match="target_size"):
        SliceDataset(load_cases(ds3d), DataConfig(target_size=(4, 4, 4)), train=False)
    with pytest.raises(NcaError, match="flip axis"):
        SliceDataset(load_cases(ds3d), DataConfig(flip_axes=(2,)), train=True)


# --- split


def test_split_cases() -> None:
    names = [f"case{i:02d}" for i in range(10)]
    train, val = split_cases(names, 0.2, seed=7)
    assert (train, val) == split_cases(list(reversed(names)), 0.2, seed=7)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == names
    assert split_cases(["a", "b"], 0.1, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    t, v = split_cases(["a", "b", "c"], 0.9, 0)
    assert len(t) == 1 and len(v) == 2
    assert split_cases(["a"], 0.5, 0) == (["a"], [])
    assert split_cases(names, 0.0, 0) == (names, [])


@pytest.mark.parametrize(("n", "fraction", "seed"), [(10, 0.2, 7), (7, 0.3, 0), (40, 0.25, 3), (2, 0.9, 1)])
def test_split_cases_draws_what_training_always_drew(n: int, fraction: float, seed: int) -> None:
    """The validation split of earlier versions: a NumPy permutation of the sorted names."""
    names = [f"case{i:02d}" for i in range(n)]
    n_val = min(max(round(n * fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    expected = sorted(names[i] for i in order[n_val:]), sorted(names[i] for i in order[:n_val])
    assert split_cases(names, fraction, seed) == expected


@pytest.mark.parametrize(("n", "limit"), [(100, None), (100, 30), (9, None)])
def test_split_indices_draws_what_digits_always_drew(n: int, limit: int | None) -> None:
    order = np.random.default_rng(5).permutation(n)[:limit]
    n_val = max(1, round(len(order) * 0.2))
    kept, held = split_indices(n, 0.2, 5, limit=limit)
    np.testing.assert_array_equal(kept, order[n_val:])
    np.testing.assert_array_equal(held, order[:n_val])


def test_held_out_count() -> None:
    assert [held_out_count(n, 0.25) for n in (0, 1, 2, 3, 4, 10, 16)] == [0, 0, 1, 1, 1, 2, 4]
    assert held_out_count(5, 0.0) == 0 and held_out_count(4, 0.99) == 3
    with pytest.raises(NcaError, match=r"\[0, 1\)"):
        held_out_count(4, 1.0)


# --- 2D / slices


@pytest.mark.parametrize("singleton_z", [True, False])
def test_2d_dataset_items(tmp_path: Path, singleton_z: bool) -> None:
    shape = (1, 12, 16) if singleton_z else (12, 16)
    root = make_dataset(tmp_path, n_cases=3, num_channels=3, shape=shape)
    assert dataset_info(root)["dim"] == 2
    data = load_case(load_cases(root)[0])
    assert data.image.shape == (3, 12, 16) and data.squeezed_z is singleton_z
    assert data.to_image(data.label).array.shape == shape
    ds = SliceDataset(load_cases(root), DataConfig(), train=True)
    assert len(ds) == 3
    image, label = ds[0]
    assert image.shape == (3, 12, 16) and label.shape == (12, 16)
    resized = SliceDataset(load_cases(root), DataConfig(target_size=(8, 8)), train=False)
    assert resized[2][0].shape == (3, 8, 8) and resized[2][1].shape == (8, 8)
    with pytest.raises(NcaError, match="VolumeDataset needs 3D"):
        VolumeDataset(load_cases(root), DataConfig(), train=False)


def test_slices_of_3d(ds3d: Path) -> None:
    cases = load_cases(ds3d)
    ds = SliceDataset(cases, DataConfig(), train=False)
    assert len(ds) == SHAPE[0] * 3
    image, label = ds[0]
    assert image.shape == (2, 12, 16) and label.shape == (12, 16)
    ds_x = SliceDataset(cases, DataConfig(slice_axis=2, target_size=(10, 10)), train=False)
    assert len(ds_x) == SHAPE[2] * 3 and ds_x[0][0].shape == (2, 10, 10)
    # Training with only foreground slices: z = 2..4 in each case.
    fg_only = SliceDataset(cases, DataConfig(empty_slice_fraction=0.0), train=True)
    assert len(fg_only) == 3 * 3
    assert all((fg_only[i][1] > 0).any() for i in range(len(fg_only)))
    half = SliceDataset(cases, DataConfig(empty_slice_fraction=0.5), train=True)
    assert len(half) == 9 + round(0.5 * 15)


def test_cache_off_matches_cache_on(ds3d: Path) -> None:
    cases = load_cases(ds3d)
    on = SliceDataset(cases, DataConfig(target_size=(6, 8)), train=False)
    off = SliceDataset(cases, DataConfig(target_size=(6, 8), cache=False), train=False)
    for i in (0, 5, 20):
        assert torch.equal(on[i][0], off[i][0]) and torch.equal(on[i][1], off[i][1])
    # Items are copies: modifying one does not change the cache.
    on[0][0].fill_(123)
    assert not torch.equal(on[0][0], torch.full_like(on[0][0], 123))


def test_one_hot_foreground() -> None:
    label = torch.tensor([[0, 1], [2, 1]])
    out = one_hot_foreground(label, 3)
    assert out.shape == (2, 2, 2) and out.dtype == torch.float32
    assert torch.equal(out[0], (label == 1).float()) and torch.equal(out[1], (label == 2).float())


def test_case_record_fields(ds3d: Path) -> None:
    rec = load_cases(ds3d)[0]
    assert isinstance(rec, CaseRecord)
    assert rec.image_paths[0].name == "tr000_0000.nii.gz" and rec.label_path is not None


def test_rgb_png_single_file(tmp_path: Path) -> None:
    """nnU-Net's natural-image layout: one RGB file ``CASE_0000.png`` for 3 channel names."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rgb = (np.random.default_rng(0).random((10, 14, 3)) * 255).astype(np.uint8)
    write_image(Image.from_array(rgb, is_vector=True), tmp_path / "imagesTr" / "c1_0000.png")
    write_image(Image.from_array(_label((10, 14), 0)), tmp_path / "labelsTr" / "c1.png")
    meta = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 1,
        "file_ending": ".png",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = NnUNetDataset(tmp_path)
    assert ds.dim == 2
    data = ds.load(ds.cases()[0])
    assert data.image.shape == (3, 10, 14)
    np.testing.assert_array_equal(data.image[1], rgb[..., 1])
    image, label = SliceDataset(ds.cases(), DataConfig(), train=False)[0]
    assert image.shape == (3, 10, 14) and label.shape == (10, 14)


# --- integrity rules on load: train refuses what verify reports


def _nan_image(root: Path) -> Path:
    path = root / "imagesTr" / "tr001_0000.nii.gz"
    array = np.full(SHAPE, 50.0, np.float32)
    array[3] = np.nan  # one whole slice, as another tool would leave it
    write_image(Image.from_array(array, spacing=SPACING), path)
    return path


def _inf_second_channel(root: Path) -> Path:
    path = root / "imagesTr" / "tr001_0001.nii.gz"
    array = np.full(SHAPE, 50.0, np.float32)
    array[0, 0, 0] = np.inf
    write_image(Image.from_array(array, spacing=SPACING), path)
    return path


def _label_value_not_declared(root: Path) -> Path:
    path = root / "labelsTr" / "tr001.nii.gz"
    write_image(Image.from_array(np.full(SHAPE, 3, np.uint8), spacing=SPACING), path)
    return path


def _label_spacing(root: Path) -> Path:
    path = root / "labelsTr" / "tr001.nii.gz"
    write_image(Image.from_array(_label(SHAPE, 1), spacing=(0.5, 0.75, 2.1)), path)
    return path


def _label_size(root: Path) -> Path:
    path = root / "labelsTr" / "tr001.nii.gz"
    write_image(Image.from_array(np.zeros((8, 12, 15), np.uint8), spacing=SPACING), path)
    return path


LOAD_CORRUPTIONS = {
    "NaN image": (_nan_image, r"image contains 192 NaN and 0 Inf values"),
    "Inf in channel 1": (_inf_second_channel, r"image contains 0 NaN and 1 Inf values"),
    "label value not in dataset.json": (
        _label_value_not_declared,
        r"label values \[3\] are not in dataset.json",
    ),
    "label spacing": (_label_spacing, r"spacing \(0.5, 0.75, 2.1\) differs"),
    "label size": (_label_size, r"label size \(15, 12, 8\) differs"),
}


@pytest.mark.parametrize("kind", list(LOAD_CORRUPTIONS))
def test_loading_refuses_what_verify_reports(tmp_path: Path, kind: str) -> None:
    root = make_dataset(tmp_path, n_cases=2, num_channels=2)
    corrupt, message = LOAD_CORRUPTIONS[kind]
    path = corrupt(root)
    dataset = NnUNetDataset(root)
    with pytest.raises(NcaError, match=message) as info:
        VolumeDataset(dataset.cases(), DataConfig(), train=True, num_classes=dataset.num_classes)
    assert info.value.path == path and str(path) in str(info.value)


def test_nan_nifti_is_seen_although_simpleitk_hides_it(tmp_path: Path) -> None:
    """ITK's NIfTI reader turns NaN into 0; read_image keeps what the file stores."""
    import SimpleITK as sitk

    root = make_dataset(tmp_path, n_cases=2, num_channels=1)
    path = _nan_image(root)
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()
    with pytest.raises(NcaError, match="192 NaN") as info:
        load_case(load_cases(root)[1])
    assert info.value.path == path


def test_train_refuses_nan_image_exit_2_naming_the_file(
    toy_dataset: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ncatool.cli import app

    monkeypatch.setenv("NCATOOL_NO_PROGRESS", "1")
    ds = toy_dataset(3, cases=3, size=16)
    victim = ds / "imagesTr" / "toy_001_0000.nii.gz"
    array = np.ones((16, 16, 16), np.float32)
    array[8] = np.nan
    write_image(Image.from_array(array), victim)
    args = ["train", "--task", "seg3d", "--data", str(ds), "--out", str(tmp_path / "run"), "--epochs", "1"]
    for setting in ("iters_per_epoch=1", "target_size=16,16,16", "patch=0,8", "steps=2,2", "samples=0"):
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = result.stderr.replace("\n", "")
    assert "toy_001_0000.nii.gz" in message and "256 NaN" in message and "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
