"""nnU-Net v2 raw datasets: writing them (``prepare``), reading them, and checking them (``verify``).

The layout is nnU-Net v2's ``nnUNet_raw`` format::

    nnUNet_raw/Dataset001_Name/
        dataset.json            channel_names, labels, numTraining, file_ending (+ name, description)
        imagesTr/{CASE}_0000.nii.gz   one file per channel: _0000, _0001, ...
        labelsTr/{CASE}.nii.gz
        imagesTs/{CASE}_0000.nii.gz   optional held-out cases (``--test-fraction``)
        labelsTs/{CASE}.nii.gz        their labels (an ncatool addition; nnU-Net ignores it)
        splits.json             {"train": [...], "test": [...]} (an ncatool addition)

**2D images** (PNG/JPG or 2D NIfTI/NRRD inputs) are written as genuine *2D* NIfTI files: array
``(Y, X)``, spacing ``(x, y)``, no invented z axis. nnU-Net's ``SimpleITKIO`` reads a 2D file as
``(1, Y, X)`` with a dummy out-of-plane spacing of 999 (how it marks 2D data), so nnU-Net plans the
dataset as 2D. In ncatool, :func:`ncatool.data.io.read_image` returns ``Image.ndim == 2`` for such
files and :func:`read_raw_case` returns arrays ``(C, Y, X)``; 3D cases give ``(C, Z, Y, X)``.

Every case is read, converted and written into a hidden temporary sibling folder
(``.DatasetNNN_Name.tmp-XXXX``) which is renamed into place only when everything succeeded, so a
crash never leaves half a dataset under the final name; validation happens before anything is
written, so a dataset with invalid pairs leaves the output folder untouched.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ncatool import console
from ncatool.data.io import SUPPORTED_EXTENSIONS, Image, read_image, write_image, write_text_atomic
from ncatool.data.pairs import (
    Issue,
    PairCheck,
    check_dataset,
    check_pair,
    discover_pairs,
    file_nonfinite_problem,
    format_size,
    format_values,
    geometry_issues,
    image_channels,
    label_array,
    label_dtype,
    label_value_problems,
)
from ncatool.data.tiles import crop_image, tile_name, tile_slices
from ncatool.errors import NcaError, ValidationError

#: The file ending ``prepare`` writes.
FILE_ENDING = ".nii.gz"
#: Keys nnU-Net v2 requires in ``dataset.json``.
REQUIRED_KEYS: tuple[str, ...] = ("channel_names", "labels", "numTraining", "file_ending")
DATASET_JSON = "dataset.json"
SPLITS_JSON = "splits.json"
TILES_JSON = "tiles.json"
MAX_DATASET_ID = 999

_CHANNEL_STEM = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------------
# Names and dataset.json


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """The nnU-Net folder name ``Dataset{id:03d}_{name}``.

    Raises:
        NcaError: The id is outside 1..999 or the name has characters other than letters, digits,
            ``_``, ``-`` and ``.``.
    """
    if not 1 <= dataset_id <= MAX_DATASET_ID:
        raise NcaError(f"--dataset-id must be between 1 and {MAX_DATASET_ID}, got {dataset_id}")
    if not _DATASET_NAME.match(name):
        raise NcaError(
            f"--name {name!r} is not a valid dataset name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return f"Dataset{dataset_id:03d}_{name}"


def channel_file_name(case: str, channel: int, file_ending: str = FILE_ENDING) -> str:
    """The image file name of one channel of a case: ``{case}_{channel:04d}{file_ending}``."""
    return f"{case}_{channel:04d}{file_ending}"


def label_file_name(case: str, file_ending: str = FILE_ENDING) -> str:
    """The label file name of a case: ``{case}{file_ending}``."""
    return f"{case}{file_ending}"


def build_dataset_json(
    channel_names: Iterable[str],
    label_names: Iterable[str],
    num_training: int,
    name: str | None = None,
    description: str | None = None,
    file_ending: str = FILE_ENDING,
) -> dict[str, Any]:
    """The content of nnU-Net v2's ``dataset.json``.

    Args:
        channel_names: One name per channel (nnU-Net picks the normalisation from it: ``CT`` is
            special, anything else means z-scoring).
        label_names: The *foreground* label names, for values 1, 2, ...; background is always 0.
        num_training: Number of training cases (files in ``labelsTr``).
        name: Optional dataset name.
        description: Optional free text.
        file_ending: The image file ending.

    Returns:
        The dictionary, keys in nnU-Net's order.
    """
    content: dict[str, Any] = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {"background": 0, **{n: i for i, n in enumerate(label_names, start=1)}},
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    if name is not None:
        content["name"] = name
    if description is not None:
        content["description"] = description
    return content


def write_json(content: Any, path: Path) -> Path:
    """Write JSON (indented, trailing newline) atomically."""
    return write_text_atomic(json.dumps(content, indent=2) + "\n", path)


def read_dataset_json(folder: Path) -> dict[str, Any]:
    """Read ``dataset.json`` of a raw dataset.

    Raises:
        NcaError: The file is missing, not valid JSON, or not a JSON object.
    """
    path = folder / DATASET_JSON
    if not path.is_file():
        raise NcaError("no dataset.json (not an nnU-Net v2 raw dataset folder?)", folder)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NcaError(f"invalid JSON: {exc}", path) from exc
    if not isinstance(content, dict):
        raise NcaError("expected a JSON object", path)
    return content


# --------------------------------------------------------------------------------------------------
# Cases in a raw folder


@dataclass
class RawCases:
    """The files of one split (``Tr`` or ``Ts``) of a raw dataset.

    Attributes:
        images: ``case -> {channel index -> file}``.
        labels: ``case -> label file``.
        unexpected: Files in the images folder not named ``{CASE}_{XXXX}{file_ending}``.
    """

    images: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    unexpected: list[Path] = field(default_factory=list)

    @property
    def cases(self) -> list[str]:
        """All case identifiers with an image or a label, sorted."""
        return sorted(set(self.images) | set(self.labels))


def find_raw_cases(folder: Path, split: str = "Tr", file_ending: str = FILE_ENDING) -> RawCases:
    """List the cases of ``images{split}`` and ``labels{split}`` (hidden files are skipped).

    Args:
        folder: The dataset folder.
        split: ``"Tr"`` or ``"Ts"``.
        file_ending: From ``dataset.json``.

    Returns:
        The :class:`RawCases`; missing folders give empty mappings.
    """
    found = RawCases()
    for path in _files_with_ending(folder / f"images{split}", file_ending):
        match = _CHANNEL_STEM.match(path.name[: -len(file_ending)])
        if match is None:
            found.unexpected.append(path)
            continue
        found.images.setdefault(match["case"], {})[int(match["channel"])] = path
    for path in _files_with_ending(folder / f"labels{split}", file_ending):
        found.labels[path.name[: -len(file_ending)]] = path
    return found


def _files_with_ending(folder: Path, file_ending: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.endswith(file_ending) and not p.is_dir()
    )


@dataclass
class RawCase:
    """One case of a raw dataset, loaded.

    Attributes:
        case: The identifier.
        image: Channels first: ``(C, Y, X)`` for 2D, ``(C, Z, Y, X)`` for 3D.
        label: ``(Y, X)`` or ``(Z, Y, X)`` integers, or None if the case has no label.
        spacing: ``(x, y[, z])`` in mm.
        origin: ``(x, y[, z])``.
        direction: Flattened row-major direction cosines.
    """

    case: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def read_raw_case(folder: Path, case: str, split: str = "Tr") -> RawCase:
    """Load one case (all channels and the label) of a raw dataset.

    Args:
        folder: The dataset folder.
        case: The case identifier.
        split: ``"Tr"`` or ``"Ts"``.

    Returns:
        The :class:`RawCase`.

    Raises:
        NcaError: Missing or unreadable files.
    """
    content = read_dataset_json(folder)
    file_ending = str(content.get("file_ending", FILE_ENDING))
    channels = content.get("channel_names") or content.get("modality") or {"0": "image"}
    arrays = []
    first: Image | None = None
    for index in range(len(channels)):
        image = read_image(folder / f"images{split}" / channel_file_name(case, index, file_ending))
        first = first or image
        arrays.append(image.array)
    if first is None:
        raise NcaError("dataset.json declares no channels", folder / DATASET_JSON)
    label_path = folder / f"labels{split}" / label_file_name(case, file_ending)
    label = read_image(label_path).array if label_path.exists() else None
    return RawCase(
        case=case,
        image=np.stack(arrays),
        label=label,
        spacing=first.spacing,
        origin=first.origin,
        direction=first.direction,
    )


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

    Checks: required ``dataset.json`` keys; consecutive labels starting with background 0; numTraining
    equals the number of ``labelsTr`` cases; every case has all channel files and a label; readable
    2D/3D single-component files; no NaN/Inf in images; label values are integers listed in
    ``labels``; shapes agree between channels and label; spacing agrees (nnU-Net's tolerance); origin
    and direction agree (small differences are warnings, see :mod:`ncatool.data.pairs`); the same
    for ``imagesTs``/``labelsTs`` if present.

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
    content = read_dataset_json(folder)
    found = _Findings()
    json_path = folder / DATASET_JSON
    num_channels, channel_names = _check_channel_names(content, json_path, found)
    expected_labels = _check_labels(content.get("labels"), json_path, found)
    file_ending = content.get("file_ending")
    num_training = content.get("numTraining")
    for key in REQUIRED_KEYS:
        if key not in content and not (key == "channel_names" and "modality" in content):
            found.errors.append(f"{json_path}: missing required key {key!r}")
    if "file_ending" in content and (
        not isinstance(file_ending, str) or file_ending.lower() not in SUPPORTED_EXTENSIONS
    ):
        found.errors.append(
            f"{json_path}: file_ending {file_ending!r} is not one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
        file_ending = None
    if "numTraining" in content and (isinstance(num_training, bool) or not isinstance(num_training, int)):
        found.errors.append(f"{json_path}: numTraining must be an integer, got {num_training!r}")
        num_training = None
    if "dataset" in content:
        found.warnings.append(f"{json_path}: explicit 'dataset' file lists are not checked")
    if not isinstance(file_ending, str) or num_channels is None:
        _raise(folder, found)

    for sub in ("imagesTr", "labelsTr"):
        if not (folder / sub).is_dir():
            found.errors.append(f"{folder / sub}: required folder is missing")
    train = find_raw_cases(folder, "Tr", file_ending)
    if isinstance(num_training, int) and num_training != len(train.labels):
        found.errors.append(
            f"{json_path}: numTraining is {num_training} but labelsTr has {len(train.labels)} cases"
        )
    _check_split(folder, "Tr", train, num_channels, expected_labels, file_ending, found, labels_required=True)
    test = find_raw_cases(folder, "Ts", file_ending)
    has_test_labels = (folder / "labelsTs").is_dir()
    _check_split(
        folder, "Ts", test, num_channels, expected_labels, file_ending, found, labels_required=has_test_labels
    )

    ndims = sorted(set(found.ndims.values()))
    if len(ndims) > 1:
        majority = max(ndims, key=lambda d: sum(1 for v in found.ndims.values() if v == d))
        for path, ndim in sorted(found.ndims.items()):
            if ndim != majority:
                found.errors.append(f"{path}: image is {ndim}D but most cases are {majority}D")
    if expected_labels is not None and train.labels:
        never = sorted(expected_labels - found.label_values - {0})
        if never:
            found.warnings.append(
                f"{json_path}: labels {format_values(never)} do not occur in any label file"
            )
    if found.errors:
        _raise(folder, found)
    return VerifyReport(
        dataset=folder,
        num_training=len(train.labels),
        num_test=len(test.images),
        channel_names=channel_names,
        labels=dict(content.get("labels", {})),
        ndim=ndims[0] if len(ndims) == 1 else None,
        warnings=found.warnings,
    )


def _raise(folder: Path, found: _Findings) -> NoReturn:
    for warning in found.warnings:
        console.warn(console_escape(warning))
    n = len(found.errors)
    raise ValidationError(
        found.errors, f"{folder}: {n} problem{'s' if n != 1 else ''}; not a valid nnU-Net v2 raw dataset"
    )


def console_escape(text: str) -> str:
    """Escape rich markup in a message that contains paths."""
    from rich.markup import escape

    return escape(text)


def _check_channel_names(
    content: dict[str, Any], json_path: Path, found: _Findings
) -> tuple[int | None, dict[str, str]]:
    names = content.get("channel_names", content.get("modality"))
    if names is None:
        return None, {}
    if "channel_names" not in content:
        found.warnings.append(f"{json_path}: legacy key 'modality' used instead of 'channel_names'")
    if not isinstance(names, dict) or not names:
        found.errors.append(f'{json_path}: channel_names must be a non-empty object like {{"0": "CT"}}')
        return None, {}
    expected = [str(i) for i in range(len(names))]
    if sorted(names, key=lambda k: (len(str(k)), str(k))) != expected:
        found.errors.append(
            f'{json_path}: channel_names keys must be "0".."{len(names) - 1}", got {sorted(names)}'
        )
        return None, {}
    return len(names), {str(k): str(v) for k, v in names.items()}


def _check_labels(labels: Any, json_path: Path, found: _Findings) -> set[int] | None:
    if labels is None:
        return None
    if not isinstance(labels, dict) or not labels:
        found.errors.append(f'{json_path}: labels must be a non-empty object like {{"background": 0}}')
        return None
    values: set[int] = set()
    for name, value in labels.items():
        items = value if isinstance(value, list | tuple) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            found.errors.append(f"{json_path}: label {name!r} has value {value!r}; expected an integer")
            return None
        values.update(items)
    ignore = labels.get("ignore")
    regular = set(values)
    if isinstance(ignore, int) and not isinstance(ignore, bool):
        if ignore != max(values):
            found.errors.append(f"{json_path}: the 'ignore' label must have the highest value")
        regular.discard(ignore)
    if 0 not in regular:
        found.errors.append(f"{json_path}: labels must contain background with value 0")
    elif sorted(regular) != list(range(len(regular))):
        found.errors.append(
            f"{json_path}: labels must be consecutive integers 0, 1, 2, ...; found {format_values(regular)}"
        )
    return values


def _check_split(
    folder: Path,
    split: str,
    cases: RawCases,
    num_channels: int,
    expected_labels: set[int] | None,
    file_ending: str,
    found: _Findings,
    labels_required: bool,
) -> None:
    images_dir, labels_dir = folder / f"images{split}", folder / f"labels{split}"
    for path in cases.unexpected:
        found.errors.append(f"{path}: file name does not follow {{CASE}}_XXXX{file_ending}")
    for case in cases.cases:
        channel_files = cases.images.get(case, {})
        label_path = cases.labels.get(case)
        orphan = f"; label {label_path.name} has no image" if not channel_files and label_path else ""
        if label_path is None and labels_required:
            first = channel_files[min(channel_files)]
            found.errors.append(
                f"{first}: image has no label (expected {labels_dir / label_file_name(case, file_ending)})"
            )
        for index in range(num_channels):
            if index not in channel_files:
                missing = images_dir / channel_file_name(case, index, file_ending)
                found.errors.append(
                    f"{missing}: missing channel file ({num_channels} channels declared{orphan})"
                )
        for index in sorted(i for i in channel_files if i >= num_channels):
            found.errors.append(
                f"{channel_files[index]}: channel {index} is not declared in channel_names "
                f"({num_channels} channels)"
            )
        present = [channel_files[i] for i in sorted(channel_files) if i < num_channels]
        _check_case_files(present, label_path, expected_labels, found)


def _check_case_files(
    channel_paths: list[Path], label_path: Path | None, expected_labels: set[int] | None, found: _Findings
) -> None:
    reference: Image | None = None
    reference_path: Path | None = None
    for path in channel_paths:
        image = _read_single(path, "image", found)
        if image is None:
            continue
        problem = file_nonfinite_problem(path, image.array)
        if problem:
            found.errors.append(f"{path}: {problem}")
        if reference is None or reference_path is None:
            reference, reference_path = image, path
            found.ndims[path] = image.ndim
            continue
        _compare(reference, image, path, f"channel file {reference_path.name}", found)
    if label_path is None:
        return
    label = _read_single(label_path, "label", found)
    if label is None:
        return
    problems, values = label_value_problems(label.array)
    nonfinite = (
        file_nonfinite_problem(label_path, label.array, "label") if label.array.dtype.kind == "f" else None
    )
    if nonfinite and not any("NaN" in p for p in problems):
        problems.append(nonfinite)
    found.errors.extend(f"{label_path}: {p}" for p in problems)
    found.label_values.update(values)
    if expected_labels is not None:
        unexpected = sorted(values - expected_labels)
        if unexpected:
            found.errors.append(
                f"{label_path}: label values {format_values(unexpected)} are not in dataset.json labels "
                f"{format_values(expected_labels)}"
            )
    if not problems and values <= {0}:
        found.warnings.append(f"{label_path}: label is empty (no foreground voxels)")
    if reference is not None and reference_path is not None:
        _compare(reference, label, label_path, f"image {reference_path.name}", found)


def _read_single(path: Path, what: str, found: _Findings) -> Image | None:
    try:
        image = read_image(path)
    except NcaError as exc:
        found.errors.append(f"{path}: {exc.message}")
        return None
    if image.ndim not in (2, 3):
        found.errors.append(f"{path}: {what} is {image.ndim}D; expected 2D or 3D")
        return None
    if image.is_vector:
        found.errors.append(
            f"{path}: {what} has {image.components} components per voxel; "
            "nnU-Net expects one file per channel"
        )
        return None
    return image


def _compare(reference: Image, other: Image, path: Path, ref_name: str, found: _Findings) -> None:
    if reference.ndim != other.ndim or reference.spatial_shape != other.spatial_shape:
        found.errors.append(
            f"{path}: size {format_size(other)} differs from the {ref_name} size {format_size(reference)} "
            "(x, y[, z])"
        )
        return
    errors, warnings = geometry_issues(reference, other, ref_name=ref_name, strict_spacing=True)
    found.errors.extend(f"{path}: {m}" for m in errors)
    found.warnings.extend(f"{path}: {m}" for m in warnings)


# --------------------------------------------------------------------------------------------------
# prepare


@dataclass
class PrepareOptions:
    """What ``ncatool prepare`` was asked to do (see the command's help for each option)."""

    out: Path
    dataset_id: int
    name: str
    layout: str = "auto"
    folder: Path | None = None
    images: Path | None = None
    labels: Path | None = None
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    description: str | None = None
    grayscale: bool = False
    link: bool = False
    test_fraction: float = 0.0
    seed: int = 0
    skip_invalid: bool = False
    overwrite: bool = False
    tile: tuple[int, ...] | None = None


#: Tiles of each source case: ``{case: [(tile case, region in array order), ...]}``.
TilePlan = dict[str, list[tuple[str, tuple[slice, ...]]]]


@dataclass
class SkippedCase:
    """A case left out by ``--skip-invalid`` and why."""

    case: str
    problems: list[str]


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    dataset: Path
    layout: str
    ndim: int
    train: list[str]
    test: list[str]
    channel_names: dict[str, str]
    labels: dict[str, int]
    skipped: list[SkippedCase] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=lambda: {"linked": 0, "copied": 0, "converted": 0})
    tiles: TilePlan | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "dataset": str(self.dataset),
            "dataset_name": self.dataset.name,
            "layout": self.layout,
            "ndim": self.ndim,
            "num_training": len(self.train),
            "num_test": len(self.test),
            "cases": {"train": self.train, "test": self.test},
            "channel_names": self.channel_names,
            "labels": self.labels,
            "files": self.files,
            "skipped": [{"case": s.case, "problems": s.problems} for s in self.skipped],
            "warnings": self.warnings,
            "ignored": self.ignored,
            "tiled_from": None
            if self.tiles is None
            else {c: [t for t, _ in ts] for c, ts in self.tiles.items()},
        }


def prepare_dataset(options: PrepareOptions) -> PrepareResult:
    """Validate raw image/label pairs and write them as an nnU-Net v2 raw dataset.

    Nothing is written unless every pair is valid (or ``skip_invalid``): all pairs are read and
    checked first, then converted into a temporary sibling folder that is renamed into place.

    Args:
        options: The inputs, the target and the conversion options.

    Returns:
        What was written, skipped and warned about.

    Raises:
        NcaError: Bad options, no pairs, or the dataset folder exists without ``overwrite``.
        ValidationError: Invalid pairs (without ``skip_invalid``), all listed.
    """
    folder_name = dataset_folder_name(options.dataset_id, options.name)
    if not 0.0 <= options.test_fraction < 1.0:
        raise NcaError(f"--test-fraction must be in [0, 1), got {options.test_fraction}")
    if options.out.exists() and not options.out.is_dir():
        raise NcaError("--out is not a folder", options.out)
    target = options.out / folder_name
    _check_target(options.out, target, options.dataset_id, options.overwrite)

    pairing = discover_pairs(options.layout, options.folder, options.images, options.labels)
    if not pairing.pairs and not pairing.problems:
        where = options.folder or options.images
        raise NcaError(f"no image/label pairs found ({pairing.layout} layout)", where)
    unpaired = f", {len(pairing.problems)} unpaired" if pairing.problems else ""
    console.info(f"checking {len(pairing.pairs)} image/label pairs ({pairing.layout} layout{unpaired})")
    max_label = len(options.label_names) if options.label_names else None
    checks = [check_pair(p, options.grayscale, max_label) for p in pairing.pairs]
    check_dataset(checks, len(options.label_names) if options.label_names else None)

    skipped = _skipped(pairing.problems, checks)
    if skipped and not options.skip_invalid:
        problems = [p for case in skipped for p in case.problems]
        total = len({*(p.case for p in pairing.problems), *(c.pair.case for c in checks)})
        raise ValidationError(
            problems,
            f"{len(skipped)} of {total} cases are invalid; nothing was written "
            "(fix them, or use --skip-invalid to prepare only the valid ones)",
        )
    valid = [c for c in checks if c.valid]
    if not valid:
        raise ValidationError([p for case in skipped for p in case.problems], "no valid cases to prepare")
    for s in skipped:
        console.warn(console_escape(f"skipping case {s.case!r}: " + "; ".join(s.problems)))

    warnings = [str(w) for c in valid for w in c.warnings]
    labels = _labels(options.label_names, valid, warnings)
    channel_names = _channel_names(options.channel_names, valid[0])
    tiles = plan_tiles(valid, options.tile) if options.tile else None
    cases = [t for ts in tiles.values() for t, _ in ts] if tiles else [c.pair.case for c in valid]
    train, test = split_cases(cases, options.test_fraction, options.seed, warnings)
    result = PrepareResult(
        dataset=target,
        layout=pairing.layout,
        ndim=valid[0].ndim or 0,
        train=train,
        test=test,
        channel_names={str(i): n for i, n in enumerate(channel_names)},
        labels=labels,
        skipped=skipped,
        warnings=warnings,
        ignored=[str(p) for p in pairing.ignored],
        tiles=tiles,
    )
    dataset_json = build_dataset_json(
        channel_names, list(labels)[1:], len(train), name=options.name, description=options.description
    )
    _build(options, valid, result, dataset_json)
    return result


def plan_tiles(valid: list[PairCheck], sizes: tuple[int, ...]) -> TilePlan:
    """Cut every valid case into tiles (see :mod:`ncatool.data.tiles`).

    Args:
        valid: The checked pairs (their image shapes are known).
        sizes: Tile sizes in array order (one for all axes, or one per axis; 0 = whole axis).

    Returns:
        The tiles of each case, named ``CASE_tNNN`` in C order.

    Raises:
        NcaError: ``sizes`` does not match the dimensionality.
    """
    plan: TilePlan = {}
    for check in valid:
        if check.shape is None:  # cannot happen for a valid pair
            raise NcaError("image shape unknown while tiling", check.pair.image)
        regions = tile_slices(check.shape, sizes)
        plan[check.pair.case] = [(tile_name(check.pair.case, i), r) for i, r in enumerate(regions)]
    return plan


def tiles_json(plan: TilePlan) -> dict[str, Any]:
    """``tiles.json`` content: for each tile, its source case and ``start``/``shape`` in array order."""
    return {
        tile: {
            "case": case,
            "start": [s.start for s in region],
            "shape": [s.stop - s.start for s in region],
        }
        for case, tiles in plan.items()
        for tile, region in tiles
    }


def split_cases(
    cases: list[str], test_fraction: float, seed: int, warnings: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Split case identifiers into train and test, reproducibly.

    Args:
        cases: The case identifiers.
        test_fraction: Share of cases for the test set, in ``[0, 1)``; rounded to the nearest count
            and capped so at least one training case remains.
        seed: Seed of the shuffle.
        warnings: Gets a message if a positive fraction gives no test case.

    Returns:
        ``(train, test)``, each sorted.
    """
    ordered = sorted(cases)
    n_test = min(math.floor(test_fraction * len(ordered) + 0.5), len(ordered) - 1)
    n_test = max(n_test, 0)
    if test_fraction > 0 and n_test == 0 and warnings is not None:
        warnings.append(f"--test-fraction {test_fraction} of {len(ordered)} cases gives no test case")
    test = set(random.Random(seed).sample(ordered, n_test))
    return [c for c in ordered if c not in test], [c for c in ordered if c in test]


def _check_target(out: Path, target: Path, dataset_id: int, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise NcaError("dataset folder already exists; use --overwrite to replace it", target)
    if out.is_dir():
        prefix = f"Dataset{dataset_id:03d}_"
        for other in sorted(out.iterdir()):
            if other.name.startswith(prefix) and other.name != target.name and other.is_dir():
                raise NcaError(
                    f"dataset id {dataset_id} is already used by {other.name}; nnU-Net needs unique ids "
                    "(choose another --dataset-id or remove that folder)",
                    other,
                )


def _skipped(pairing_problems: list[Issue], checks: list[PairCheck]) -> list[SkippedCase]:
    by_case: dict[str, list[str]] = {}
    for issue in pairing_problems:
        by_case.setdefault(issue.case or str(issue.path), []).append(str(issue))
    for check in checks:
        if not check.valid:
            by_case.setdefault(check.pair.case, []).extend(str(e) for e in check.errors)
    return [SkippedCase(case, problems) for case, problems in sorted(by_case.items())]


def _labels(label_names: list[str] | None, valid: list[PairCheck], warnings: list[str]) -> dict[str, int]:
    found = set().union(*(c.label_values for c in valid))
    if label_names is None:
        highest = max(found, default=0)
        if highest == 0:
            warnings.append("no label file has any foreground voxel")
        names = [f"label_{i}" for i in range(1, highest + 1)]
    else:
        if "background" in label_names:
            raise NcaError("--label-names names the foreground labels 1, 2, ...; background is always 0")
        names = label_names
        for value, name in enumerate(names, start=1):
            if value not in found:
                warnings.append(f"label {value} ({name!r}) does not occur in any label file")
    return {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}


def _channel_names(given: list[str] | None, reference: PairCheck) -> list[str]:
    defaults = list(reference.default_channel_names)
    if given is None:
        return defaults
    if len(given) != len(defaults):
        raise NcaError(
            f"--channel-names gives {len(given)} names but the images have {len(defaults)} channels "
            f"(e.g. {reference.pair.image})"
        )
    return given


def _build(
    options: PrepareOptions, valid: list[PairCheck], result: PrepareResult, dataset_json: dict[str, Any]
) -> None:
    created = _missing_parents(options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    tmp = options.out / f".{result.dataset.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        test = set(result.test)
        highest_label = max(result.labels.values())
        for check in valid:
            if result.tiles is not None:
                _write_tiles(check, result.tiles[check.pair.case], tmp, test, options, highest_label, result)
                continue
            split = "Ts" if check.pair.case in test else "Tr"
            console.debug(f"writing {check.pair.case} → images{split}")
            _write_case(check, tmp / f"images{split}", tmp / f"labels{split}", options, highest_label, result)
        if result.tiles is not None:
            write_json(tiles_json(result.tiles), tmp / TILES_JSON)
        (tmp / "imagesTr").mkdir(exist_ok=True)
        (tmp / "labelsTr").mkdir(exist_ok=True)
        write_json(dataset_json, tmp / DATASET_JSON)
        write_json({"train": result.train, "test": result.test}, tmp / SPLITS_JSON)
        _commit(tmp, result.dataset, options.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _missing_parents(path: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create, deepest first."""
    missing: list[Path] = []
    current = path.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    return missing


def _write_case(
    check: PairCheck,
    images_dir: Path,
    labels_dir: Path,
    options: PrepareOptions,
    highest_label: int,
    result: PrepareResult,
) -> None:
    pair = check.pair
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    reference: Image | None = None
    if check.image_passthrough:
        _transfer(pair.image, images_dir / channel_file_name(pair.case, 0), options.link, result)
    else:
        image = read_image(pair.image)
        channels, _ = image_channels(image, pair.image, options.grayscale)
        for index, channel in enumerate(channels):
            write_image(channel, images_dir / channel_file_name(pair.case, index))
        result.files["converted"] += len(channels)
        reference = channels[0]
    destination = labels_dir / label_file_name(pair.case)
    if check.label_passthrough:
        _transfer(pair.label, destination, options.link, result)
        return
    write_image(_label_image(check, highest_label, reference), destination)
    result.files["converted"] += 1


def _label_image(check: PairCheck, highest_label: int, reference: Image | None) -> Image:
    """The label of a pair as written: 0/1 for planar 0/255 masks, smallest dtype, image geometry if needed."""
    label = read_image(check.pair.label)
    array, _ = label_array(label, check.pair.label)
    if array is None:  # cannot happen for a valid pair
        raise NcaError("label became unreadable while preparing", check.pair.label)
    geometry = label
    if check.harmonize_label:
        geometry = reference if reference is not None else read_image(check.pair.image)
    return Image(
        array=array.astype(label_dtype(highest_label)),
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.direction,
    )


def _write_tiles(
    check: PairCheck,
    tiles: list[tuple[str, tuple[slice, ...]]],
    root: Path,
    test: set[str],
    options: PrepareOptions,
    highest_label: int,
    result: PrepareResult,
) -> None:
    """Write every tile of one case as a case of its own (always converted, never linked)."""
    channels, _ = image_channels(read_image(check.pair.image), check.pair.image, options.grayscale)
    label = _label_image(check, highest_label, channels[0])
    for tile, region in tiles:
        split = "Ts" if tile in test else "Tr"
        console.debug(f"writing {tile} ({check.pair.case} {region}) → images{split}")
        images_dir, labels_dir = root / f"images{split}", root / f"labels{split}"
        images_dir.mkdir(exist_ok=True)
        labels_dir.mkdir(exist_ok=True)
        for index, channel in enumerate(channels):
            write_image(crop_image(channel, region), images_dir / channel_file_name(tile, index))
        write_image(crop_image(label, region), labels_dir / label_file_name(tile))
        result.files["converted"] += len(channels) + 1


def _transfer(source: Path, destination: Path, link: bool, result: PrepareResult) -> None:
    if link:
        os.symlink(source.resolve(), destination)
        result.files["linked"] += 1
    else:
        shutil.copyfile(source, destination)
        result.files["copied"] += 1


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to ``target`` (replacing it with ``overwrite``)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise NcaError("dataset folder already exists; use --overwrite to replace it", target)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
