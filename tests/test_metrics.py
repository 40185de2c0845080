"""Segmentation metrics on tiny hand-computed cases; NaN semantics; HD95 in mm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ncatool.metrics import (
    MetricAggregator,
    binary_metrics,
    hausdorff_distance,
    label_metrics,
    surface,
    surface_distances,
)


def test_two_by_two_case_by_hand() -> None:
    ref = np.array([[1, 1], [0, 0]])
    pred = np.array([[1, 1], [1, 0]])
    m = binary_metrics(pred, ref)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (2, 1, 0, 1)
    assert m["Dice"] == pytest.approx(0.8)
    assert m["IoU"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert (m["n_pred"], m["n_ref"]) == (3, 2)
    # spacing 0.5 x 2 mm: one voxel is 1 mm²
    m = binary_metrics(pred, ref, spacing=(0.5, 2.0))
    assert (m["volume_pred"], m["volume_ref"], m["volume_diff"]) == pytest.approx((3.0, 2.0, 1.0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_parallel_planes_anisotropic(axis: int) -> None:
    # Two one-voxel-thick planes 3 voxels apart along `axis`, whose spacing is 2.5 mm: 7.5 mm.
    shape = (8, 9, 10)
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    index = [slice(None)] * 3
    index[axis] = 2
    ref[tuple(index)] = True
    index[axis] = 5
    pred[tuple(index)] = True
    spacing = [1.0, 0.7, 1.3]
    spacing[axis] = 2.5
    assert hausdorff_distance(pred, ref, spacing) == pytest.approx(7.5)
    assert hausdorff_distance(ref, pred, spacing) == pytest.approx(7.5)
    assert binary_metrics(pred, ref, spacing)["HD95"] == pytest.approx(7.5)


def test_hd95_lines_2d_and_singleton_axis() -> None:
    # Lines along y, 4 voxels apart along x (spacing 2.5 mm): 10 mm; same as a one-slice volume.
    ref, pred = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    ref[:, 3] = True
    pred[:, 7] = True
    assert hausdorff_distance(pred, ref, (1.0, 2.5)) == pytest.approx(10.0)
    assert hausdorff_distance(pred[None], ref[None], (3.0, 1.0, 2.5)) == pytest.approx(10.0)


def test_hd_is_symmetric_max_and_percentile() -> None:
    # pred = ref square plus one far voxel: HD100 sees the outlier, HD95 (many surface voxels) does not.
    ref = np.zeros((40, 40), bool)
    ref[5:25, 5:25] = True
    pred = ref.copy()
    pred[35, 15] = True  # 11 voxels below the square's bottom row (row 24)
    assert hausdorff_distance(pred, ref, percentile=100) == pytest.approx(11.0)
    assert hausdorff_distance(ref, pred, percentile=100) == pytest.approx(11.0)
    assert hausdorff_distance(pred, ref) == pytest.approx(0.0)


def test_surface_distances_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        shape = (7, 9, 8)
        pred = rng.random(shape) < 0.15
        ref = rng.random(shape) < 0.15
        pred[0, 0, 0] = ref[3, 4, 4] = True
        spacing = (2.0, 0.5, 1.25)
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        sp, sr = np.argwhere(surface(pred)) * spacing, np.argwhere(surface(ref)) * spacing
        dist = np.linalg.norm(sp[:, None] - sr[None], axis=-1)
        np.testing.assert_allclose(np.sort(d_pr), np.sort(dist.min(axis=1)))
        np.testing.assert_allclose(np.sort(d_rp), np.sort(dist.min(axis=0)))


def test_nan_semantics() -> None:
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1:3, 1:3] = True
    both = binary_metrics(empty, empty)
    assert math.isnan(both["Dice"]) and math.isnan(both["IoU"]) and math.isnan(both["HD95"])
    assert both["accuracy"] == 1.0 and both["TN"] == 16
    ref_empty = binary_metrics(some, empty)  # prediction where there is nothing
    assert ref_empty["Dice"] == 0.0 and ref_empty["IoU"] == 0.0
    assert math.isnan(ref_empty["recall"]) and ref_empty["precision"] == 0.0
    assert math.isnan(ref_empty["HD95"])
    pred_empty = binary_metrics(empty, some)  # missed everything
    assert pred_empty["Dice"] == 0.0 and pred_empty["recall"] == 0.0
    assert math.isnan(pred_empty["precision"])


def test_aggregator_leaves_nan_out_and_counts_it() -> None:
    ref = np.array([[0, 1], [2, 2]])
    pred = np.array([[0, 1], [2, 0]])
    agg = MetricAggregator()
    agg.add("a", label_metrics(pred, ref, [1, 2]))  # Dice 1 and 2/3
    agg.add("b", label_metrics(np.zeros((2, 2)), np.zeros((2, 2)), [1, 2]))  # both empty: NaN
    agg.add("c", label_metrics(np.array([[1, 0], [0, 0]]), np.zeros((2, 2)), [1, 2]))  # label 1: 0
    mean = agg.mean()
    assert mean[1]["Dice"] == pytest.approx(0.5)  # (1 + 0) / 2, case b left out
    assert mean[2]["Dice"] == pytest.approx(2 / 3)  # only case a is defined
    assert agg.nan_counts()[1]["Dice"] == 1 and agg.nan_counts()[2]["Dice"] == 2
    assert agg.foreground_mean()["Dice"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert agg.cases == ["a", "b", "c"]


def test_shape_mismatch_and_bad_spacing_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.ones((2, 2)), np.ones((2, 2)), spacing=(1.0,))
