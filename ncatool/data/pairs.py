"""Pair raw images with their label files, and validate each pair.

Pairing (:func:`discover_pairs`) finds ``(case, image, label)`` triples by file-name pattern:

* ``mock``: one folder with ``<case>_img.<ext>`` and ``<case>_gt.<ext>`` (what ``ncatool mock-data``
  writes).
* ``isic``: the ISIC 2018 layout, ``<case>.jpg`` in an images folder and ``<case>_segmentation.png``
  in a labels folder.
* ``dirs``: an images folder and a labels folder whose files have the same stems.
* ``auto``: ``mock`` for a single folder, ``isic`` for two folders whose label stems end in
  ``_segmentation``, else ``dirs``.

Validation (:func:`check_pair`) reads both files and collects every problem instead of stopping at
the first. Geometry is compared with these tolerances (:func:`geometry_issues`):

========= ============================================ =============== ===============
aspect    measure                                      ok up to        warning up to
========= ============================================ =============== ===============
spacing   largest relative difference per axis         1e-5            1e-3
origin    largest offset, in voxels of the image       1e-3 voxel      0.5 voxel
direction largest difference of a direction cosine     1e-5            1e-3
========= ============================================ =============== ===============

Anything beyond the warning limit is an error. ``1e-5`` is the relative tolerance of nnU-Net's own
spacing check (``np.allclose``) and absorbs the float32 rounding of NIfTI headers. When a label only
differs within the warning limits, ``prepare`` writes it with the image's geometry, so the prepared
dataset passes nnU-Net's checks; ``verify`` (see :mod:`ncatool.data.nnunet`) treats any spacing
difference beyond ``1e-5`` as an error, as nnU-Net does.

Label values must be non-negative integers (integer-valued floats are accepted and converted). A
planar (PNG/JPG/...) mask that only holds ``0`` and ``255`` is read as a binary mask ``0/1``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncatool.data.io import PLANAR_EXTENSIONS, Image, is_image_file, read_image, split_extension
from ncatool.errors import NcaError

#: Pairing layouts, ``auto`` first.
LAYOUTS: tuple[str, ...] = ("auto", "mock", "isic", "dirs")
MOCK_IMAGE_SUFFIX = "_img"
MOCK_LABEL_SUFFIX = "_gt"
ISIC_LABEL_SUFFIX = "_segmentation"

SPACING_RTOL_OK = 1e-5
SPACING_RTOL_WARN = 1e-3
ORIGIN_VOXELS_OK = 1e-3
ORIGIN_VOXELS_WARN = 0.5
DIRECTION_ATOL_OK = 1e-5
DIRECTION_ATOL_WARN = 1e-3

#: Luminance weights (ITU-R BT.601) for ``--grayscale``.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Issue:
    """One problem with one file.

    Attributes:
        path: The file concerned.
        message: What is wrong.
        case: The case it belongs to, if known.
    """

    path: Path
    message: str
    case: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Pair:
    """An image file and its label file."""

    case: str
    image: Path
    label: Path


@dataclass
class Pairing:
    """The result of :func:`discover_pairs`.

    Attributes:
        layout: The layout used (never ``auto``).
        pairs: Complete pairs, sorted by case.
        problems: Files without a partner, duplicate cases: one :class:`Issue` each.
        ignored: Image files that match no pattern of the layout.
    """

    layout: str
    pairs: list[Pair]
    problems: list[Issue] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


@dataclass
class PairCheck:
    """What :func:`check_pair` found out about a pair.

    Attributes:
        pair: The pair.
        errors: Problems that make the pair unusable.
        warnings: Problems that do not.
        ndim: Spatial dimensions of the image (2 or 3) if readable.
        shape: Spatial shape of the image in array order, ``(Z, Y, X)`` or ``(Y, X)``, if readable.
        channels: Number of channels the image yields.
        default_channel_names: Channel names implied by the file (``R,G,B`` for colour images).
        label_values: The label values present (after 0/255 → 0/1 for planar masks).
        harmonize_label: The label's geometry differs slightly: write it with the image's geometry.
        image_passthrough: The image file can be linked/copied as is (single-channel ``.nii.gz``).
        label_passthrough: The label file can be linked/copied as is.
    """

    pair: Pair
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    ndim: int | None = None
    shape: tuple[int, ...] | None = None
    channels: int | None = None
    default_channel_names: tuple[str, ...] = ()
    label_values: frozenset[int] = frozenset()
    harmonize_label: bool = False
    image_passthrough: bool = False
    label_passthrough: bool = False

    @property
    def valid(self) -> bool:
        """True if the pair has no errors."""
        return not self.errors

    def error(self, path: Path, message: str) -> None:
        """Record an error for ``path``."""
        self.errors.append(Issue(path, message, self.pair.case))

    def warn(self, path: Path, message: str) -> None:
        """Record a warning for ``path``."""
        self.warnings.append(Issue(path, message, self.pair.case))


# --------------------------------------------------------------------------------------------------
# Pairing


def discover_pairs(
    layout: str = "auto",
    folder: Path | None = None,
    images: Path | None = None,
    labels: Path | None = None,
) -> Pairing:
    """Find image/label pairs by file-name pattern.

    Args:
        layout: One of :data:`LAYOUTS`.
        folder: The single input folder (``mock`` layout).
        images: The images folder (``isic`` and ``dirs`` layouts).
        labels: The labels folder (``isic`` and ``dirs`` layouts).

    Returns:
        The pairs, plus one problem per file without a partner or per duplicate case.

    Raises:
        NcaError: Unknown layout, missing/contradictory folders, or the layout cannot be detected.
    """
    if layout not in LAYOUTS:
        raise NcaError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if folder is not None and (images is not None or labels is not None):
        raise NcaError("give either one input folder or --images and --labels, not both")
    if (images is None) != (labels is None):
        raise NcaError("--images and --labels go together")
    for path in (folder, images, labels):
        if path is not None and not path.is_dir():
            raise NcaError("input folder does not exist" if not path.exists() else "not a folder", path)

    if layout == "auto":
        layout = _detect_layout(folder, images, labels)
    if layout == "mock":
        if folder is None:
            raise NcaError("the mock layout needs one input folder (INPUT or --input)")
        return _pair_single_folder(folder)
    if images is None or labels is None:
        raise NcaError(f"the {layout} layout needs --images DIR and --labels DIR")
    suffix = ISIC_LABEL_SUFFIX if layout == "isic" else ""
    return _pair_two_folders(layout, images, labels, suffix)


def _detect_layout(folder: Path | None, images: Path | None, labels: Path | None) -> str:
    if folder is not None:
        if any(split_extension(p)[0].endswith(MOCK_IMAGE_SUFFIX) for p in _image_files(folder)):
            return "mock"
        raise NcaError(
            f"cannot detect the layout: no '*{MOCK_IMAGE_SUFFIX}.*' images; "
            "for separate image and label folders use --images DIR --labels DIR",
            folder,
        )
    if images is None or labels is None:
        raise NcaError("no input: give an input folder (INPUT or --input) or --images DIR --labels DIR")
    stems = [split_extension(p)[0] for p in _image_files(labels)]
    if stems and any(s.endswith(ISIC_LABEL_SUFFIX) for s in stems):
        return "isic"
    return "dirs"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _pair_single_folder(folder: Path) -> Pairing:
    image_files: dict[str, list[Path]] = {}
    label_files: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    for path in _image_files(folder):
        stem = split_extension(path)[0]
        if stem.endswith(MOCK_IMAGE_SUFFIX):
            image_files.setdefault(stem[: -len(MOCK_IMAGE_SUFFIX)], []).append(path)
        elif stem.endswith(MOCK_LABEL_SUFFIX):
            label_files.setdefault(stem[: -len(MOCK_LABEL_SUFFIX)], []).append(path)
        else:
            ignored.append(path)
    return _match(
        "mock",
        image_files,
        label_files,
        image_hint=lambda c: folder / f"{c}{MOCK_IMAGE_SUFFIX}.*",
        label_hint=lambda c: folder / f"{c}{MOCK_LABEL_SUFFIX}.*",
        ignored=ignored,
    )


def _pair_two_folders(layout: str, images: Path, labels: Path, label_suffix: str) -> Pairing:
    image_files: dict[str, list[Path]] = {}
    label_files: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    for path in _image_files(images):
        image_files.setdefault(split_extension(path)[0], []).append(path)
    for path in _image_files(labels):
        stem = split_extension(path)[0]
        if label_suffix and not stem.endswith(label_suffix):
            ignored.append(path)
            continue
        case = stem[: -len(label_suffix)] if label_suffix else stem
        label_files.setdefault(case, []).append(path)
    return _match(
        layout,
        image_files,
        label_files,
        image_hint=lambda c: images / f"{c}.*",
        label_hint=lambda c: labels / f"{c}{label_suffix}.*",
        ignored=ignored,
    )


def _match(
    layout: str,
    image_files: dict[str, list[Path]],
    label_files: dict[str, list[Path]],
    image_hint: Callable[[str], Path],
    label_hint: Callable[[str], Path],
    ignored: list[Path],
) -> Pairing:
    pairs: list[Pair] = []
    problems: list[Issue] = []
    for case in sorted(set(image_files) | set(label_files)):
        imgs, labs = image_files.get(case, []), label_files.get(case, [])
        for kind, found in (("images", imgs), ("labels", labs)):
            if len(found) > 1:
                others = ", ".join(p.name for p in found[1:])
                problems.append(Issue(found[0], f"case {case!r} has several {kind}: also {others}", case))
        if not labs:
            problems.append(Issue(imgs[0], f"image has no label (expected {label_hint(case)})", case))
        elif not imgs:
            problems.append(Issue(labs[0], f"label has no image (expected {image_hint(case)})", case))
        elif len(imgs) == 1 and len(labs) == 1:
            pairs.append(Pair(case, imgs[0], labs[0]))
    return Pairing(layout=layout, pairs=pairs, problems=problems, ignored=ignored)


# --------------------------------------------------------------------------------------------------
# Channels and labels


def image_channels(image: Image, path: Path, grayscale: bool = False) -> tuple[list[Image], tuple[str, ...]]:
    """Split an image into single-channel images, one per nnU-Net channel file.

    Planar files (PNG/JPG/...) lose an alpha channel; RGB becomes three channels ``R, G, B``, or one
    luminance channel with ``grayscale``. A vector volume (e.g. a multi-component NIfTI) gives one
    channel per component.

    Args:
        image: The image as read.
        path: Its file (decides planar vs volume).
        grayscale: Convert a three-component image to one luminance channel.

    Returns:
        The channel images and their default names.
    """
    if not image.is_vector:
        return [image], ("image",)
    array = image.array
    planar = split_extension(path)[1] in PLANAR_EXTENSIONS
    if planar and array.shape[-1] in (2, 4):
        array = array[..., :-1]  # drop alpha
    if array.shape[-1] == 3 and grayscale:
        luma = array.astype(np.float64) @ _LUMA
        if np.issubdtype(array.dtype, np.integer):
            luma = np.clip(np.rint(luma), np.iinfo(array.dtype).min, np.iinfo(array.dtype).max)
        gray = luma.astype(array.dtype if np.issubdtype(array.dtype, np.integer) else np.float32)
        return [image.with_array(gray, is_vector=False)], ("image",)
    channels = [
        image.with_array(np.ascontiguousarray(array[..., i]), is_vector=False) for i in range(array.shape[-1])
    ]
    if len(channels) == 1:
        return channels, ("image",)
    if planar and len(channels) == 3:
        return channels, ("R", "G", "B")
    return channels, tuple(f"channel_{i}" for i in range(len(channels)))


def label_array(label: Image, path: Path) -> tuple[np.ndarray | None, list[str]]:
    """The label's values as one scalar array (vector masks must have equal colour components).

    Planar masks holding only ``0`` and ``255`` are mapped to ``0/1``.

    Args:
        label: The label image as read.
        path: Its file (decides planar vs volume).

    Returns:
        ``(array, problems)``; ``array`` is None when the label cannot be used.
    """
    array = label.array
    if label.is_vector:
        colour = array[..., : min(3, array.shape[-1])]
        if not np.all(colour == colour[..., :1]):
            n = array.shape[-1]
            return None, [f"label is a colour image with {n} components; expected one value per voxel"]
        array = array[..., 0]
    if split_extension(path)[1] in PLANAR_EXTENSIONS and array.dtype.kind in "ui" and array.size:
        values = np.unique(array)
        if 255 in values and set(values.tolist()) <= {0, 255}:
            array = (array == 255).astype(np.uint8)
    return array, []


def label_value_problems(array: np.ndarray, max_label: int | None = None) -> tuple[list[str], frozenset[int]]:
    """Check that a label array holds non-negative integers within ``0..max_label``.

    Args:
        array: The label values.
        max_label: The largest allowed value, or None for no limit.

    Returns:
        ``(problems, values)``: the problems found and the distinct integer values.
    """
    problems: list[str] = []
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind not in "uif":
        return [f"label has unsupported data type {array.dtype}"], frozenset()
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            problems.append(f"label contains {int((~finite).sum())} NaN/Inf values")
            array = array[finite]
        fractional = array[array != np.round(array)]
        if fractional.size:
            problems.append(
                f"label has non-integer values (e.g. {_fmt(float(fractional.flat[0]))}); "
                "labels must be integers"
            )
            array = array[array == np.round(array)]
    values = np.unique(array)
    negative = values[values < 0]
    if negative.size:
        problems.append(f"label has negative values {format_values(negative)}")
    if max_label is not None:
        unexpected = values[values > max_label]
        if unexpected.size:
            problems.append(
                f"label values {format_values(unexpected)} are not in the labels (0..{max_label})"
            )
    return problems, frozenset(int(v) for v in values)


def label_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer type for labels up to ``max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def nonfinite_problem(array: np.ndarray) -> str | None:
    """A message if a float array holds NaN or Inf values, else None."""
    if array.dtype.kind not in "fc":
        return None
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    if not nan and not inf:
        return None
    return f"image contains {nan} NaN and {inf} Inf values"


def file_nonfinite_problem(path: Path, array: np.ndarray, what: str = "image") -> str | None:
    """Like :func:`nonfinite_problem`, but also sees NaN/Inf that the reader hid.

    SimpleITK's NIfTI reader silently replaces NaN and Inf by 0, so float NIfTI files are scanned
    again with nibabel, which keeps the stored values.

    Args:
        path: The file ``array`` was read from.
        array: Its data as read by :func:`ncatool.data.io.read_image`.
        what: ``"image"`` or ``"label"``, for the message.

    Returns:
        A message, or None if all values are finite.
    """
    problem = nonfinite_problem(array)
    if problem is None and split_extension(path)[1] in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            stored = nib.load(str(path))
            if stored.header.get_data_dtype().kind in "fc":
                problem = nonfinite_problem(np.asarray(stored.dataobj))
        except Exception:  # nibabel cannot parse what SimpleITK could: nothing more to learn
            problem = None
    return problem.replace("image", what, 1) if problem else None


# --------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class GeometryDiff:
    """How far apart two geometries are.

    Attributes:
        spacing: Largest relative spacing difference over the axes.
        origin: Largest origin offset along an image axis, in voxels of the reference.
        direction: Largest absolute difference of a direction cosine.
    """

    spacing: float
    origin: float
    direction: float


def geometry_diff(ref: Image, other: Image) -> GeometryDiff:
    """Compare the geometry of ``other`` with ``ref`` (both of the same dimension)."""
    sp_ref = np.asarray(ref.spacing, dtype=float)
    sp_other = np.asarray(other.spacing, dtype=float)
    scale = np.maximum(np.maximum(np.abs(sp_ref), np.abs(sp_other)), 1e-12)
    spacing = float(np.max(np.abs(sp_ref - sp_other) / scale))
    n = len(sp_ref)
    delta = np.asarray(other.origin, dtype=float) - np.asarray(ref.origin, dtype=float)
    matrix = np.asarray(ref.direction, dtype=float).reshape(n, n) * sp_ref[None, :]
    try:
        in_voxels = np.linalg.solve(matrix, delta)
    except np.linalg.LinAlgError:
        in_voxels = delta / max(float(np.min(np.abs(sp_ref))), 1e-12)
    origin = float(np.max(np.abs(in_voxels)))
    direction = float(np.max(np.abs(np.asarray(ref.direction) - np.asarray(other.direction))))
    return GeometryDiff(spacing=spacing, origin=origin, direction=direction)


def geometry_issues(
    ref: Image, other: Image, ref_name: str = "image", strict_spacing: bool = False
) -> tuple[list[str], list[str]]:
    """Classify the geometry differences of ``other`` against ``ref`` (see module docstring).

    Args:
        ref: The reference (the image, or the first channel).
        other: The file checked against it.
        ref_name: How to call the reference in messages.
        strict_spacing: Treat every spacing difference beyond the "ok" tolerance as an error.

    Returns:
        ``(errors, warnings)`` as messages about ``other``.
    """
    errors: list[str] = []
    warnings: list[str] = []
    diff = geometry_diff(ref, other)
    spacing_warn = SPACING_RTOL_OK if strict_spacing else SPACING_RTOL_WARN
    checks = (
        (
            "spacing",
            diff.spacing,
            SPACING_RTOL_OK,
            spacing_warn,
            "relative difference {v:.3g}; error above {w:g}",
        ),
        (
            "origin",
            diff.origin,
            ORIGIN_VOXELS_OK,
            ORIGIN_VOXELS_WARN,
            "{v:.3g} voxels apart; error above {w:g}",
        ),
        (
            "direction",
            diff.direction,
            DIRECTION_ATOL_OK,
            DIRECTION_ATOL_WARN,
            "cosines differ by {v:.3g}; error above {w:g}",
        ),
    )
    for aspect, value, ok, warn, how in checks:
        if value <= ok:
            continue
        mine, theirs = _tuple(getattr(other, aspect)), _tuple(getattr(ref, aspect))
        detail = how.format(v=value, w=warn)
        message = f"{aspect} {mine} differs from the {ref_name} {aspect} {theirs} ({detail})"
        (warnings if value <= warn else errors).append(message)
    return errors, warnings


# --------------------------------------------------------------------------------------------------
# Pair validation


def check_pair(pair: Pair, grayscale: bool = False, max_label: int | None = None) -> PairCheck:
    """Read a pair and collect every problem with it.

    Args:
        pair: The image and label files.
        grayscale: Whether colour images will be converted to one channel.
        max_label: The largest allowed label value (from ``--label-names``), or None.

    Returns:
        The :class:`PairCheck`; ``valid`` is False if any error was found.
    """
    check = PairCheck(pair=pair)
    image = _read(pair.image, check)
    label = _read(pair.label, check)
    channels: list[Image] = []
    if image is not None:
        channels = _check_image(image, pair.image, grayscale, check)
    if label is None:
        return check
    if label.ndim not in (2, 3):
        check.error(pair.label, f"label is {label.ndim}D; expected a 2D or 3D label")
        return check
    array, problems = label_array(label, pair.label)
    for problem in problems:
        check.error(pair.label, problem)
    if array is None:
        return check
    problems, values = label_value_problems(array, max_label)
    nonfinite = file_nonfinite_problem(pair.label, array, "label") if array.dtype.kind == "f" else None
    if nonfinite and not any("NaN" in p for p in problems):
        problems.append(nonfinite)
    for problem in problems:
        check.error(pair.label, problem)
    check.label_values = values
    if not problems and not np.any(array):
        check.warn(pair.label, "label is empty (no foreground voxels)")
    ext = split_extension(pair.label)[1]
    check.label_passthrough = (
        ext == ".nii.gz" and not label.is_vector and array.dtype.kind in "ui" and array is label.array
    )
    if channels:
        _check_alignment(channels[0], label.with_array(array, is_vector=False), check)
    return check


def _read(path: Path, check: PairCheck) -> Image | None:
    try:
        return read_image(path)
    except NcaError as exc:
        check.error(path, exc.message)
        return None


def _check_image(image: Image, path: Path, grayscale: bool, check: PairCheck) -> list[Image]:
    if image.ndim not in (2, 3):
        check.error(path, f"image is {image.ndim}D; expected a 2D or 3D image (one file per case)")
        return []
    if image.array.size == 0:
        check.error(path, "image has no voxels")
        return []
    if image.array.dtype.kind not in "uifb":
        check.error(path, f"image has unsupported data type {image.array.dtype}")
        return []
    problem = file_nonfinite_problem(path, image.array)
    if problem:
        check.error(path, problem)
    channels, names = image_channels(image, path, grayscale)
    check.ndim = image.ndim
    check.shape = image.spatial_shape
    check.channels = len(channels)
    check.default_channel_names = names
    check.image_passthrough = split_extension(path)[1] == ".nii.gz" and not image.is_vector
    return channels


def _check_alignment(image: Image, label: Image, check: PairCheck) -> None:
    path = check.pair.label
    if image.ndim != label.ndim:
        check.error(path, f"label is {label.ndim}D but the image is {image.ndim}D")
        return
    if image.spatial_shape != label.spatial_shape:
        check.error(
            path,
            f"label size {format_size(label)} differs from the image size {format_size(image)} (x, y[, z])",
        )
        return
    errors, warnings = geometry_issues(image, label)
    for message in errors:
        check.error(path, message)
    for message in warnings:
        check.warn(path, message + "; the label is written with the image's geometry")
    if warnings and not errors:
        check.harmonize_label = True
        check.label_passthrough = False


# --------------------------------------------------------------------------------------------------
# Dataset-level checks


def check_dataset(checks: Sequence[PairCheck], num_label_names: int | None = None) -> None:
    """Checks across pairs: same dimension and channel count everywhere, consecutive labels.

    Adds errors to the offending :class:`PairCheck` objects (only pairs valid so far are compared).

    Args:
        checks: The per-pair checks.
        num_label_names: Number of foreground label names given, or None (then the labels found
            must be consecutive: ``{0, 1, 3}`` is an error for every file holding ``3``).
    """
    valid = [c for c in checks if c.valid]
    for attr, what in (("ndim", "dimension"), ("channels", "channel count")):
        counts = Counter(getattr(c, attr) for c in valid)
        if len(counts) > 1:
            expected = counts.most_common(1)[0][0]
            for c in valid:
                if getattr(c, attr) != expected:
                    c.error(
                        c.pair.image,
                        f"image {what} is {getattr(c, attr)} but most cases have {expected}; "
                        "all cases must agree",
                    )
    if num_label_names is not None:
        return
    valid = [c for c in checks if c.valid]
    found = set().union(*(c.label_values for c in valid)) | {0}
    missing = sorted(set(range(max(found) + 1)) - found)
    if not missing:
        return
    gap = missing[0]
    for c in valid:
        beyond = sorted(v for v in c.label_values if v > gap)
        if beyond:
            c.error(
                c.pair.label,
                f"label values {format_values(beyond)} make the dataset's labels non-consecutive: "
                f"found {format_values(found)}, missing {format_values(missing)} (nnU-Net needs 0, 1, 2, ...)",
            )


def parse_names(text: str | None, what: str) -> list[str] | None:
    """Split a comma-separated list of names (``"liver,tumour"``); None for None or empty.

    Raises:
        NcaError: Empty or duplicate names.
    """
    if text is None or not text.strip():
        return None
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise NcaError(f"{what}: empty name in {text!r}")
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise NcaError(f"{what}: duplicate names {', '.join(duplicates)}")
    return names


def format_size(image: Image) -> str:
    """The spatial size in ``(x, y[, z])`` order, like spacing (the array shape reversed)."""
    return "(" + ", ".join(str(n) for n in reversed(image.spatial_shape)) + ")"


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _tuple(values: Iterable[float]) -> str:
    return "(" + ", ".join(_fmt(float(v)) for v in values) + ")"


def format_values(values: Iterable[float], limit: int = 10) -> str:
    """``[0, 1, 3]``, shortened to the first ``limit`` values (sorted) for long lists."""
    ordered = sorted(float(v) for v in values)
    items = [_fmt(v) for v in ordered[:limit]]
    more = f", ... ({len(ordered)} in all)" if len(ordered) > limit else ""
    return "[" + ", ".join(items) + more + "]"
