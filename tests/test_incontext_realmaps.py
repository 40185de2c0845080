"""The real-label-map helpers of the in-context benchmark (benchmarks/incontext/realmaps.py) on tiny
hand-made label volumes: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "incontext" / "realmaps.py"
_spec = importlib.util.spec_from_file_location("realmaps", PATH)
assert _spec is not None and _spec.loader is not None
realmaps = importlib.util.module_from_spec(_spec)
sys.modules["realmaps"] = realmaps
_spec.loader.exec_module(realmaps)


def test_table_covers_every_dk_parcel_once() -> None:
    """34 cortical names into 6 lobes, 7 subcortical kept; every task has a source."""
    cortical = [n for n, s in realmaps.DK_TO_STRUCTURE.items() if s in realmaps.STRUCTURES[:6]]
    assert len(cortical) == 34
    assert set(realmaps.DK_TO_STRUCTURE.values()) == set(realmaps.STRUCTURES) | {"accumbens"}
    assert set(realmaps.HELD_OUT) <= set(realmaps.STRUCTURES)


def test_lookup_table_merges_hemispheres_and_drops() -> None:
    table = {1: "superiorfrontal", 2: "putamen", 3: "accumbensarea", 4: "brainstem", 5: "putamen"}
    lut = realmaps.lookup_table(table)
    putamen = realmaps.STRUCTURES.index("putamen") + 1
    assert lut.tolist() == [0, 1, putamen, realmaps.ACCUMBENS, 0, putamen]
    written = realmaps.task_labels(lut[np.array([[1, 3], [4, 5]])])
    assert written.dtype == np.uint8
    assert written.tolist() == [[1, 0], [0, putamen]]  # accumbens is synthesis-only


def test_mode_downsample_blocks_2d() -> None:
    """A 4×4 map to 2×2: each output pixel is its 2×2 block's most frequent label, ties the lower."""
    labels = np.array([[1, 1, 2, 2], [1, 3, 0, 0], [0, 0, 3, 3], [0, 5, 3, 5]])  # block (0, 1): a tie
    out = realmaps.mode_downsample(labels, 2)
    assert out.tolist() == [[1, 0], [0, 3]]
    assert out.dtype == labels.dtype


@pytest.mark.parametrize("side", [5, 7, 10])
def test_mode_downsample_keeps_a_half_and_any_side(side: int) -> None:
    """Any side (not a multiple of the output) gives ``size``ⁿ; a half-plane stays a half-plane."""
    labels = np.zeros((side, side, side), dtype=np.int64)
    labels[: side // 2] = 4
    out = realmaps.mode_downsample(labels, 2)
    assert out.shape == (2, 2, 2)
    assert (out[0] == 4).all() and (out[1] == 0).all()


def test_mean_downsample_matches_block_means() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert realmaps.mean_downsample(image, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_axial_orientation_and_square_pad() -> None:
    """``(X, Y, Z)`` RAS → ``(Y, X)`` with the most anterior row first; padding is centred."""
    vol = np.zeros((3, 2, 1), dtype=np.int64)
    vol[2, 1, 0] = 7  # right, anterior
    sl = realmaps.axial(vol, 0)
    assert sl.shape == (2, 3) and sl[0, 2] == 7
    padded = realmaps.pad_square(sl)
    assert padded.shape == (3, 3) and padded[0, 2] == 7 and padded[2].sum() == 0


def test_white_matter_fills_the_hull_only() -> None:
    """A closed ring of cortex gets white matter inside; outside stays 0."""
    vol = np.zeros((12, 12, 3), dtype=np.int64)
    vol[2:10, 2:10, :] = 1
    vol[4:8, 4:8, :] = 0
    out = realmaps.add_white_matter(vol)
    assert (out[4:8, 4:8, 1] == realmaps.WHITE_MATTER).all()
    assert (out[0, :, :] == 0).all() and (out[2:10, 2:10][vol[2:10, 2:10] == 1] == 1).all()


def test_heights_favour_the_targets() -> None:
    """Two thirds of the heights lie where a target shows (enough voxels), the rest elsewhere."""
    vol = np.zeros((20, 20, 100), dtype=np.int64)
    vol[..., 10:90] = 1
    vol[5:15, 5:15, 40:60] = 9  # 100 voxels per slice: shows
    z = realmaps.heights(vol, [9], 12)
    assert z == sorted(set(z)) and len(z) == 12
    inside = [h for h in z if 40 <= h < 60]
    assert len(inside) == 8
    assert all(18 <= h <= 82 for h in z)  # not in the top and bottom tenth of the brain
