"""Integrity of an nnU-Net v2 raw dataset: the per-case rules, and ``ncatool verify``.

The rules are plain functions over files already listed or images already read, so every stage
applies the same ones: ``prepare`` to raw pairs (:mod:`ncatool.data.nnunet.pairs`), ``verify`` to a
whole dataset (:func:`verify_raw_dataset`, which collects every problem and fails once, as nnU-Net's
``verify_dataset_integrity`` does), and training, predict and eval to each case as they load it
(:mod:`ncatool.data.loading`, which raises the first case's problems at once).

* files (:func:`case_file_issues`): each case has every declared channel file ``CASE_XXXX`` (or, as in
  nnU-Net's natural-image datasets, one ``CASE_0000`` file whose colour components are the declared
  channels), no undeclared channel, a label where labels are required, and a label has an image;
* images (:func:`image_form_problems`, :func:`nonfinite_problem`): 2D or 3D, one value per voxel,
  no NaN/Inf;
* labels (:func:`label_value_problems`): integers, non-negative, listed in ``dataset.json``;
* channels and label of a case agree in size and geometry (:func:`geometry_issues`):

========= ============================================ =============== ===============
aspect    measure                                      ok up to        warning up to
========= ============================================ =============== ===============
spacing   largest relative difference per axis         1e-5            1e-3
origin    largest offset, in voxels of the image       1e-3 voxel      0.5 voxel
direction largest difference of a direction cosine     1e-5            1e-3
========= ============================================ =============== ===============

Anything beyond the warning limit is an error. ``1e-5`` is the relative tolerance of nnU-Net's own
spacing check (``np.allclose``) and absorbs the float32 rounding of NIfTI headers; in a dataset
(``strict_spacing``) any spacing difference beyond it is an error, as in nnU-Net, while ``prepare``
only warns up to ``1e-3`` and writes such a label with the image's geometry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ncatool import console
from ncatool.data.io import Image, read_header, read_image
from ncatool.data.nnunet.dataset_json import check_dataset_json
from ncatool.data.nnunet.layout import (
    DATASET_JSON,
    RawCases,
    channel_file_name,
    find_raw_cases,
    label_file_name,
)
from ncatool.errors import NcaError, ValidationError

SPACING_RTOL_OK = 1e-5
SPACING_RTOL_WARN = 1e-3
ORIGIN_VOXELS_OK = 1e-3
ORIGIN_VOXELS_WARN = 0.5
DIRECTION_ATOL_OK = 1e-5
DIRECTION_ATOL_WARN = 1e-3
#: Label arrays whose values lie in ``0..MAX_COUNTED_LABEL`` are counted with one pass (bincount)
#: instead of sorted (np.unique), which keeps the check cheap on large volumes.
MAX_COUNTED_LABEL = 65_535


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


# --------------------------------------------------------------------------------------------------
# Rules on values


def nonfinite_problem(array: np.ndarray, what: str = "image") -> str | None:
    """A message if a float array holds NaN or Inf values, else None.

    Args:
        array: Voxel values (as :func:`ncatool.data.io.read_image` returns them: NaN kept).
        what: ``"image"`` or ``"label"``, for the message.
    """
    if array.dtype.kind not in "fc" or np.isfinite(array).all():
        return None
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    return f"{what} contains {nan} NaN and {inf} Inf values"


def image_form_problems(image: Image, what: str = "image", components: int | None = 1) -> list[str]:
    """Problems of the form of one file as read: dimension, voxels, data type, components.

    Args:
        image: The file as read.
        what: ``"image"`` or ``"label"``, for the messages.
        components: Components per voxel allowed (3 for an RGB file holding three channels); None
            allows any number (raw inputs that ``prepare`` splits into channel files).

    Returns:
        Messages; empty if the file has a usable form (its values are checked separately).
    """
    if image.ndim not in (2, 3):
        return [f"{what} is {image.ndim}D; expected 2D or 3D"]
    if image.array.size == 0:
        return [f"{what} has no voxels"]
    if image.array.dtype.kind not in "uifb":
        return [f"{what} has unsupported data type {image.array.dtype}"]
    if components is not None and image.components != components:
        expected = "one value per voxel" if components == 1 else f"{components} (the declared channels)"
        return [f"{what} has {image.components} components per voxel; expected {expected}"]
    return []


def label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label array, sorted (one counting pass when they are small)."""
    if array.size and array.dtype.kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= MAX_COUNTED_LABEL:
            return np.flatnonzero(np.bincount(array.ravel().astype(np.intp, copy=False), minlength=high + 1))
    return np.unique(array)


def label_value_problems(
    array: np.ndarray, allowed: Iterable[int] | None = None, allowed_from: str = "dataset.json labels"
) -> tuple[list[str], frozenset[int]]:
    """Check that a label array holds non-negative integers, all in ``allowed``.

    Args:
        array: The label values.
        allowed: The values the labels declare, or None for no limit.
        allowed_from: Where ``allowed`` comes from, for the message.

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
    values = label_values(array)
    negative = values[values < 0]
    if negative.size:
        problems.append(f"label has negative values {format_values(negative)}")
    if allowed is not None:
        allowed = sorted(allowed)
        unexpected = np.setdiff1d(values, allowed)
        if unexpected.size:
            problems.append(
                f"label values {format_values(unexpected)} are not in {allowed_from} {format_values(allowed)}"
            )
    return problems, frozenset(int(v) for v in values)


# --------------------------------------------------------------------------------------------------
# Rules on geometry


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
    """Classify the geometry differences of ``other`` against ``ref`` (see the module docstring).

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


def size_problem(ref: Image, other: Image, ref_name: str, what: str) -> str | None:
    """A message if ``other`` (an ``what``: image or label) differs from ``ref`` in dimension or size."""
    if ref.ndim != other.ndim:
        return f"{what} is {other.ndim}D but the {ref_name} is {ref.ndim}D"
    if ref.spatial_shape != other.spatial_shape:
        return f"{what} size {format_size(other)} differs from the {ref_name} size {format_size(ref)} (x, y[, z])"
    return None


# --------------------------------------------------------------------------------------------------
# Rules on a case


@dataclass
class CaseCheck:
    """What :func:`check_case` found.

    Attributes:
        errors: Problems that make the case unusable.
        warnings: Problems that do not.
        ndim: Spatial dimension of the first channel, if readable.
        label_values: The values present in the label.
    """

    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    ndim: int | None = None
    label_values: frozenset[int] = frozenset()


def check_case(
    channels: Sequence[tuple[Path, Image]],
    label: tuple[Path, Image] | None,
    allowed_labels: Iterable[int] | None,
    num_channels: int,
    case: str | None = None,
) -> CaseCheck:
    """Check the channel images and the label of one case, as read.

    Args:
        channels: ``(file, image)`` per channel file, in channel order.
        label: ``(file, image)`` of the label, or None.
        allowed_labels: The values ``dataset.json`` declares, or None for no limit.
        num_channels: Channels ``dataset.json`` declares (a single file may hold them as components).
        case: The case identifier, for the issues.

    Returns:
        The errors and warnings, each naming its file.
    """
    found = CaseCheck()
    reference: tuple[Path, Image] | None = None
    single_vector = len(channels) == 1 and num_channels > 1 and channels[0][1].is_vector
    components = num_channels if single_vector else 1
    for path, image in channels:
        problems = image_form_problems(image, "image", components)
        if problems:
            found.errors.extend(Issue(path, p, case) for p in problems)
            continue
        nonfinite = nonfinite_problem(image.array)
        if nonfinite:
            found.errors.append(Issue(path, nonfinite, case))
        if reference is None:
            reference = (path, image)
            found.ndim = image.ndim
            continue
        _compare(reference, path, image, "image", found, case)
    if label is None:
        return found
    path, image = label
    problems = image_form_problems(image, "label")
    if problems:
        found.errors.extend(Issue(path, p, case) for p in problems)
        return found
    problems, values = label_value_problems(image.array, allowed_labels)
    found.errors.extend(Issue(path, p, case) for p in problems)
    found.label_values = values
    if not problems and values <= {0}:
        found.warnings.append(Issue(path, "label is empty (no foreground voxels)", case))
    if reference is not None:
        _compare(reference, path, image, "label", found, case)
    return found


def _compare(
    reference: tuple[Path, Image], path: Path, other: Image, what: str, found: CaseCheck, case: str | None
) -> None:
    ref_path, ref = reference
    ref_name = f"{'channel file' if what == 'image' else 'image'} {ref_path.name}"
    problem = size_problem(ref, other, ref_name, what)
    if problem:
        found.errors.append(Issue(path, problem, case))
        return
    errors, warnings = geometry_issues(ref, other, ref_name=ref_name, strict_spacing=True)
    found.errors.extend(Issue(path, m, case) for m in errors)
    found.warnings.extend(Issue(path, m, case) for m in warnings)


def case_file_issues(
    cases: RawCases, num_channels: int, file_ending: str, labels_required: bool
) -> list[Issue]:
    """Check which files the cases of one case set have (nothing is read but headers).

    Args:
        cases: The listed files (:func:`ncatool.data.nnunet.layout.find_raw_cases`).
        num_channels: Channels ``dataset.json`` declares.
        file_ending: From ``dataset.json``.
        labels_required: Every image needs a label (``labelsTr``; ``labelsTs`` when it exists).

    Returns:
        One issue per missing, undeclared or unexpected file.
    """
    issues = [Issue(p, f"file name does not follow {{CASE}}_XXXX{file_ending}") for p in cases.unexpected]
    for case in cases.cases:
        files = cases.images.get(case, {})
        label = cases.labels.get(case)
        orphan = f"; label {label.name} has no image" if label is not None and not files else ""
        if label is None and labels_required:
            expected = cases.labels_dir / label_file_name(case, file_ending)
            issues.append(Issue(files[min(files)], f"image has no label (expected {expected})", case))
        for index in missing_channels(files, num_channels):
            missing = cases.images_dir / channel_file_name(case, index, file_ending)
            message = f"missing channel file ({num_channels} channels declared{orphan})"
            issues.append(Issue(missing, message, case))
        for index in sorted(i for i in files if i >= num_channels):
            issues.append(
                Issue(
                    files[index],
                    f"channel {index} is not declared in channel_names ({num_channels} channels)",
                    case,
                )
            )
    return issues


def missing_channels(files: dict[int, Path], num_channels: int) -> list[int]:
    """Declared channel indices without a file.

    None are missing when one ``CASE_0000`` file holds all declared channels as components (an RGB
    PNG for ``R, G, B``: nnU-Net's natural-image convention); only then is its header read.
    """
    missing = [c for c in range(num_channels) if c not in files]
    if missing and set(files) == {0} and num_channels > 1:
        try:
            if read_header(files[0])[1] == num_channels:
                return []
        except NcaError:  # unreadable: reported when the file is read
            pass
    return missing


# --------------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    """A raw dataset that passed :func:`verify_raw_dataset`."""

    dataset: Path
    num_training: int
    num_test: int
    channel_names: dict[str, str]
    labels: dict[str, Any]
    ndim: int | None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "dataset": str(self.dataset),
            "ok": True,
            "num_training": self.num_training,
            "num_test": self.num_test,
            "ndim": self.ndim,
            "channel_names": self.channel_names,
            "labels": self.labels,
            "warnings": self.warnings,
        }


@dataclass
class _Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ndims: dict[Path, int] = field(default_factory=dict)
    label_values: set[int] = field(default_factory=set)


def verify_raw_dataset(folder: Path) -> VerifyReport:
    """Check a raw dataset the way nnU-Net's ``verify_dataset_integrity`` does, collecting everything.

    Checks ``dataset.json`` (:mod:`ncatool.data.nnunet.dataset_json`); numTraining equals the
    number of ``imagesTr`` cases; every case's files (:func:`case_file_issues`); every image and
    label as read (:func:`check_case`); one dimension for all cases; the same for
    ``imagesTs``/``labelsTs`` if present.

    Args:
        folder: The ``DatasetNNN_Name`` folder.

    Returns:
        The report (with warnings) if the dataset is valid.

    Raises:
        NcaError: The folder or its dataset.json cannot be read.
        ValidationError: Any problem; every problem is listed, each naming its file.
    """
    if not folder.is_dir():
        raise NcaError("dataset folder does not exist" if not folder.exists() else "not a folder", folder)
    meta = check_dataset_json(folder)
    found = _Findings(errors=list(meta.errors), warnings=list(meta.warnings))
    file_ending, channel_names = meta.file_ending, meta.channel_names
    if file_ending is None or channel_names is None:
        _raise(folder, found)
    allowed = meta.label_values

    for sub in ("imagesTr", "labelsTr"):
        if not (folder / sub).is_dir():
            found.errors.append(f"{folder / sub}: required folder is missing")
    train = find_raw_cases(folder, "Tr", file_ending)
    if meta.num_training is not None:
        problem = num_training_problem(meta.num_training, train)
        if problem:
            found.errors.append(f"{folder / DATASET_JSON}: {problem}")
    test = find_raw_cases(folder, "Ts", file_ending)
    for cases, labels_required in ((train, True), (test, test.labels_dir.is_dir())):
        _check_case_set(cases, len(channel_names), allowed, file_ending, labels_required, found)

    ndims = sorted(set(found.ndims.values()))
    if len(ndims) > 1:
        majority = max(ndims, key=lambda d: sum(1 for v in found.ndims.values() if v == d))
        for path, ndim in sorted(found.ndims.items()):
            if ndim != majority:
                found.errors.append(f"{path}: image is {ndim}D but most cases are {majority}D")
    if allowed is not None and train.labels:
        never = sorted(set(allowed) - found.label_values - {0})
        if never:
            found.warnings.append(
                f"{folder / DATASET_JSON}: labels {format_values(never)} do not occur in any label file"
            )
    if found.errors:
        _raise(folder, found)
    return VerifyReport(
        dataset=folder,
        num_training=len(train.images),
        num_test=len(test.images),
        channel_names=channel_names,
        labels=dict(meta.content.get("labels", {})),
        ndim=ndims[0] if len(ndims) == 1 else None,
        warnings=found.warnings,
    )


def num_training_problem(num_training: int, train: RawCases) -> str | None:
    """A message if ``numTraining`` is not the number of ``imagesTr`` cases (nnU-Net's count)."""
    if num_training == len(train.images):
        return None
    return f"numTraining is {num_training} but imagesTr has {len(train.images)} cases"


def _check_case_set(
    cases: RawCases,
    num_channels: int,
    allowed: frozenset[int] | None,
    file_ending: str,
    labels_required: bool,
    found: _Findings,
) -> None:
    found.errors.extend(str(i) for i in case_file_issues(cases, num_channels, file_ending, labels_required))
    for case in cases.cases:
        files = cases.images.get(case, {})
        channels = [(files[i], _read(files[i], found)) for i in sorted(files) if i < num_channels]
        label_path = cases.labels.get(case)
        label = None if label_path is None else (label_path, _read(label_path, found))
        readable = [(p, im) for p, im in channels if im is not None]
        label_image = None if label is None or label[1] is None else (label[0], label[1])
        checked = check_case(readable, label_image, allowed, num_channels, case)
        found.errors.extend(str(i) for i in checked.errors)
        found.warnings.extend(str(i) for i in checked.warnings)
        found.label_values.update(checked.label_values)
        if readable and checked.ndim is not None:
            found.ndims[readable[0][0]] = checked.ndim


def _read(path: Path, found: _Findings) -> Image | None:
    try:
        return read_image(path)
    except NcaError as exc:
        found.errors.append(f"{path}: {exc.message}")
        return None


def _raise(folder: Path, found: _Findings) -> NoReturn:
    for warning in found.warnings:
        console.warn(console_escape(warning))
    n = len(found.errors)
    raise ValidationError(
        found.errors, f"{folder}: {n} problem{'s' if n != 1 else ''}; not a valid nnU-Net v2 raw dataset"
    )


# --------------------------------------------------------------------------------------------------
# Message formatting


def console_escape(text: str) -> str:
    """Escape rich markup in a message that contains paths."""
    from rich.markup import escape

    return escape(text)


def format_size(image: Image) -> str:
    """The spatial size in ``(x, y[, z])`` order, like spacing (the array shape reversed)."""
    return "(" + ", ".join(str(n) for n in reversed(image.spatial_shape)) + ")"


def format_values(values: Iterable[float], limit: int = 10) -> str:
    """``[0, 1, 3]``, shortened to the first ``limit`` values (sorted) for long lists."""
    ordered = sorted(float(v) for v in values)
    items = [_fmt(v) for v in ordered[:limit]]
    more = f", ... ({len(ordered)} in all)" if len(ordered) > limit else ""
    return "[" + ", ".join(items) + more + "]"


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _tuple(values: Iterable[float]) -> str:
    return "(" + ", ".join(_fmt(float(v)) for v in values) + ")"
