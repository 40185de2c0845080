"""Images from label maps (SynthSeg / SynthICL style): any real label map gives unlimited training
images for all its structures (``ncatool mock-data --from-labels LABELMAPS``).

Each synthetic case is drawn from one label map in this order:

1. **deformation** of the label map: a random affine (rotation up to ``15° × deform`` in every plane,
   scaling ``1 ± 0.1 × deform``, shear up to ``0.05 × deform``, translation up to ``3 % × deform`` of
   each side) and a smooth elastic field (Gaussian noise of standard deviation ``2 voxels × deform``
   on a grid 8 voxels apart, upsampled cubically), resampled with nearest neighbours; the grid,
   spacing, origin and direction stay the label map's;
2. **intensities** from a random mixture: every label value (background included) has a Gaussian
   whose mean is one of evenly spaced levels in [0.05, 0.95], in a random order and jittered by a
   quarter of the spacing (so no structure vanishes into another), and standard deviation
   ``U(0.01, 0.08)``. The mixture is drawn once for the whole set from the seed (one "contrast", so
   that a structure looks alike in every case, as in a real dataset of one modality) and jittered
   per case (means ``± N(0, 0.03)``); ``per_case=True`` draws a new mixture for every case
   (SynthSeg's domain randomisation);
3. a smooth multiplicative **bias field** (:func:`ncatool.data.mock.bias_field`, strength ``bias``);
4. **blur** to a random resolution: a Gaussian of standard deviation ``U(0, blur)`` voxels per axis;
5. Gaussian **noise** of standard deviation ``U(0, noise)``;
6. the image min-max scaled to [0, 1].

Every case has its own generator from ``(seed, case index)`` (:func:`ncatool.data.mock.case_rng`),
so the same seed gives byte-identical files and case ``i`` does not depend on how many are made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ncatool.data.io import Image, is_image_file, read_image, split_extension, write_image
from ncatool.data.mock import bias_field, case_rng
from ncatool.errors import NcaError

#: Spacing (voxels) of the elastic field's control grid.
ELASTIC_GRID = 8


@dataclass(frozen=True)
class Mixture:
    """Per-label intensity Gaussians: ``means[v]``, ``stds[v]`` for label value ``v``."""

    means: dict[int, float]
    stds: dict[int, float]

    @staticmethod
    def draw(rng: np.random.Generator, values: Sequence[int]) -> Mixture:
        """A random mixture for label ``values`` (background included): the means are evenly spaced
        levels in [0.05, 0.95] in a random order, each moved by up to a quarter of the spacing, so
        that every structure differs from every other (none vanishes into the background)."""
        values = [int(v) for v in values]
        gap = 0.9 / max(len(values) - 1, 1)
        levels = 0.05 + gap * rng.permutation(len(values)) + rng.uniform(-gap / 4, gap / 4, len(values))
        return Mixture(
            {v: float(m) for v, m in zip(values, levels, strict=True)},
            {v: float(rng.uniform(0.01, 0.08)) for v in values},
        )

    def jittered(self, rng: np.random.Generator, sd: float = 0.03) -> Mixture:
        """The same contrast with means moved by ``N(0, sd)``."""
        return Mixture({v: m + float(rng.normal(0.0, sd)) for v, m in self.means.items()}, dict(self.stds))


def rotation_matrix(rng: np.random.Generator, dim: int, max_deg: float) -> np.ndarray:
    """A rotation of up to ``max_deg`` degrees in every plane of ``dim`` axes."""
    out = np.eye(dim)
    for a in range(dim):
        for b in range(a + 1, dim):
            t = math.radians(rng.uniform(-max_deg, max_deg))
            r = np.eye(dim)
            r[a, a] = r[b, b] = math.cos(t)
            r[a, b], r[b, a] = -math.sin(t), math.sin(t)
            out = out @ r
    return out


def deform_labels(labels: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Random affine and elastic deformation of a label map (nearest neighbour, same grid).

    Args:
        labels: ``(Z, Y, X)`` or ``(Y, X)`` integer labels.
        rng: Random generator.
        strength: Scales every deformation parameter (0 returns a copy).

    Returns:
        The deformed labels, same shape and dtype.
    """
    from scipy import ndimage

    if strength <= 0:
        return labels.copy()
    dim, shape = labels.ndim, np.array(labels.shape, dtype=float)
    matrix = rotation_matrix(rng, dim, 15.0 * strength) @ np.diag(
        1.0 + rng.uniform(-0.1, 0.1, dim) * strength
    )
    shear = np.eye(dim) + np.triu(rng.uniform(-0.05, 0.05, (dim, dim)) * strength, 1)
    matrix = matrix @ shear
    centre = (shape - 1) / 2
    shift = rng.uniform(-0.03, 0.03, dim) * shape * strength
    grid = np.indices(labels.shape, dtype=np.float32).reshape(dim, -1)
    coords = matrix @ (grid - centre[:, None]) + (centre + shift)[:, None]
    coarse = [max(2, math.ceil(s / ELASTIC_GRID) + 1) for s in labels.shape]
    for axis in range(dim):
        field = rng.normal(0.0, 2.0 * strength, coarse)
        zoom = [s / c for s, c in zip(labels.shape, coarse, strict=True)]
        coords[axis] += ndimage.zoom(field, zoom, order=3, mode="nearest", grid_mode=True).reshape(-1)
    out = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    return out.reshape(labels.shape).astype(labels.dtype, copy=False)


def synthesize(
    labels: np.ndarray,
    rng: np.random.Generator,
    mixture: Mixture | None = None,
    deform: float = 1.0,
    bias: float = 0.2,
    blur: float = 1.0,
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its (deformed) labels from a label map (see the module docstring).

    Args:
        labels: ``(Z, Y, X)`` or ``(Y, X)`` integer labels.
        rng: The case's generator.
        mixture: The set's contrast (jittered here); None draws a new one.
        deform: Deformation strength (0: none).
        bias: Bias field strength (0: none).
        blur: Largest Gaussian blur, voxels.
        noise: Largest noise standard deviation (intensities are in [0, 1]).

    Returns:
        ``(image float32 in [0, 1], labels)`` of the label map's shape.
    """
    from scipy import ndimage

    warped = deform_labels(labels, rng, deform)
    values = np.unique(labels)
    mix = Mixture.draw(rng, values) if mixture is None else mixture.jittered(rng)
    lut_index = {int(v): i for i, v in enumerate(values)}
    means = np.array([mix.means[int(v)] for v in values], dtype=np.float32)
    stds = np.array([mix.stds[int(v)] for v in values], dtype=np.float32)
    index = np.vectorize(lut_index.__getitem__, otypes=[np.int64])(warped) if values.size else warped
    image = means[index] + stds[index] * rng.standard_normal(warped.shape, dtype=np.float32)
    image *= bias_field(rng, warped.shape, bias)
    sigma = rng.uniform(0.0, blur, warped.ndim) if blur > 0 else np.zeros(warped.ndim)
    if np.any(sigma > 0.05):
        image = ndimage.gaussian_filter(image, sigma)
    if noise > 0:
        image += rng.standard_normal(warped.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, noise))
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image.astype(np.float32), warped


def find_label_maps(path: str | Path) -> list[Path]:
    """The label maps of ``path``: a file, a folder of label files, or an nnU-Net dataset (labelsTr).

    Raises:
        NcaError: Missing, or no image file.
    """
    path = Path(path)
    if not path.exists():
        raise NcaError("label maps do not exist", path)
    if path.is_file():
        return [path]
    folder = path / "labelsTr" if (path / "dataset.json").is_file() else path
    maps = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)) if folder.is_dir() else []
    if not maps:
        raise NcaError("holds no label map files (.nii.gz, .nrrd, .mha, .png, ...)", folder)
    return maps


def read_label_map(path: Path) -> Image:
    """A label map with integer values.

    Raises:
        NcaError: Unreadable, multi-component, or non-integer values.
    """
    img = read_image(path)
    if img.is_vector:
        raise NcaError("a label map must have one component per voxel", path)
    array = np.asarray(img.array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise NcaError("a label map must hold integer values", path)
        array = array.astype(np.int64)
    if array.min() < 0:
        raise NcaError(f"a label map must hold non-negative labels, found {int(array.min())}", path)
    return img.with_array(array)


def write_synth_dataset(
    labels: str | Path,
    out: str | Path,
    cases: int = 6,
    *,
    seed: int = 0,
    deform: float = 1.0,
    bias: float = 0.2,
    blur: float = 1.0,
    noise: float = 0.1,
    per_case: bool = False,
    overwrite: bool = False,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``cases`` synthetic images per label map: ``out/<map>_sNNN_img.nii.gz`` and ``..._gt.nii.gz``
    (the layout ``ncatool prepare`` reads), each with the label map's geometry.

    Every target is checked before anything is written. Case ``i`` (over all maps, in order) uses
    :func:`ncatool.data.mock.case_rng` ``(seed, i)``; the set's mixture comes from ``seed`` alone.

    Returns:
        One record per case: ``case``, ``image``, ``label``, ``source``, ``shape``, ``label_voxels``.

    Raises:
        NcaError: Bad parameters or label maps, or a target exists without ``overwrite``.
    """
    if cases < 1:
        raise NcaError(f"--cases must be at least 1, got {cases}")
    if seed < 0:
        raise NcaError(f"--seed must be non-negative, got {seed}")
    for name, value in (("deform", deform), ("bias", bias), ("blur", blur), ("noise", noise)):
        if not (math.isfinite(value) and value >= 0):
            raise NcaError(f"--{name} must be a non-negative number, got {value}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NcaError("exists and is not a folder", out)
    maps = find_label_maps(labels)
    images = [read_label_map(p) for p in maps]  # all read (and checked) before anything is written
    width = max(3, len(str(cases)))
    jobs = [
        (m, img, f"{split_extension(m)[0]}_s{j:0{width}d}")
        for m, img in zip(maps, images, strict=True)
        for j in range(1, cases + 1)
    ]
    targets = [(out / f"{name}_img.nii.gz", out / f"{name}_gt.nii.gz") for _, _, name in jobs]
    existing = [p for pair in targets for p in pair if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise NcaError(f"already exists{more}; use --overwrite to replace", existing[0])
    values = sorted({int(v) for img in images for v in np.unique(img.array)})
    shared = None if per_case else Mixture.draw(np.random.default_rng((seed, 7_777)), values)
    records = []
    for index, ((source, img, name), (img_path, gt_path)) in enumerate(zip(jobs, targets, strict=True)):
        rng = case_rng(seed, index)
        image, warped = synthesize(img.array, rng, shared, deform, bias, blur, noise)
        write_image(img.with_array(image), img_path)
        write_image(img.with_array(warped.astype(np.uint8 if warped.max() < 256 else np.uint16)), gt_path)
        counts = np.bincount(warped.ravel().astype(np.int64))
        record = {
            "case": name,
            "image": str(img_path),
            "label": str(gt_path),
            "source": str(source),
            "shape": list(warped.shape),
            "size": list(reversed(warped.shape)),
            "spacing": list(img.spacing),
            "shapes": [],
            "label_voxels": {str(v): int(c) for v, c in enumerate(counts) if v > 0 and c > 0},
        }
        records.append(record)
        if on_case is not None:
            on_case(record)
    return records
