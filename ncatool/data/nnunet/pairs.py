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
the first, with the rules of :mod:`ncatool.data.nnunet.verify` (NaN/Inf, label values, geometry
tolerances). Raw inputs get two allowances that a finished dataset does not: colour images (split
into channel files by ``prepare``), and label geometry that differs within the warning limits (the
label is then written with the image's geometry, so the prepared dataset passes nnU-Net's checks).

Label values must be non-negative integers (integer-valued floats are accepted and converted). A
planar (PNG/JPG/...) mask that only holds ``0`` and ``255`` is read as a binary mask ``0/1``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncatool.data.io import PLANAR_EXTENSIONS, Image, is_image_file, read_image, split_extension
from ncatool.data.nnunet.verify import (
    Issue,
    format_values,
    geometry_issues,
    image_form_problems,
    label_value_problems,
    nonfinite_problem,
    size_problem,
)
from ncatool.errors import NcaError

#: Pairing layouts, ``auto`` first.
LAYOUTS: tuple[str, ...] = ("auto", "mock", "isic", "dirs")
MOCK_IMAGE_SUFFIX = "_img"
MOCK_LABEL_SUFFIX = "_gt"
ISIC_LABEL_SUFFIX = "_segmentation"

#: Luminance weights (ITU-R BT.601) for ``--grayscale``.
_LUMA = np.array([0.299, 0.587, 0.114])


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


def label_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer type for labels up to ``max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


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
    problems = image_form_problems(label, "label", components=None)
    for problem in problems:
        check.error(pair.label, problem)
    if problems:
        return check
    array, problems = label_array(label, pair.label)
    for problem in problems:
        check.error(pair.label, problem)
    if array is None:
        return check
    allowed = None if max_label is None else range(max_label + 1)
    problems, values = label_value_problems(array, allowed, allowed_from="--label-names values")
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
    # Raw inputs may be colour images: prepare splits their components into channel files.
    problems = image_form_problems(image, "image", components=None)
    for problem in problems:
        check.error(path, problem)
    if problems:
        return []
    problem = nonfinite_problem(image.array)
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
    problem = size_problem(image, label, "image", "label")
    if problem:
        check.error(path, problem)
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
