"""Loading the cases of a dataset: case records, reading with the integrity rules, normalisation.

The runtime side of an nnU-Net v2 raw dataset (training, predict, eval and the quality baselines all
load cases here):

* :class:`NnUNetDataset` reads ``dataset.json`` with the one reader
  (:mod:`ncatool.data.nnunet.dataset_json`) and lists cases as :class:`CaseRecord` with the file rules
  of :mod:`ncatool.data.nnunet.verify` (missing or undeclared channel files, missing labels,
  ``numTraining``);
* :func:`load_case` reads a case and checks it with verify's per-case rules (NaN/Inf, label values not
  in ``dataset.json``, size or geometry of channels and label disagreeing), so ``train`` refuses what
  ``verify`` reports: :class:`~ncatool.errors.NcaError` naming the file, exit code 2 in the CLI;
* :func:`normalize` applies the intensity normalisation of a run.

Arrays follow :mod:`ncatool.data.io`: spatial axes in SimpleITK order, ``(Z, Y, X)`` or ``(Y, X)``.
A loaded case's image is ``(C, *spatial)`` float32 (channels stacked), its label ``(*spatial)`` int64.
A 2D dataset stored as 3D NIfTI with a singleton z axis (``(1, Y, X)``) is squeezed to 2D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ncatool.data.io import Image, read_header, read_image
from ncatool.data.nnunet.dataset_json import SOURCE_LAYOUT_KEY, read_dataset_json
from ncatool.data.nnunet.layout import DATASET_JSON, find_raw_cases
from ncatool.data.nnunet.verify import Issue, case_file_issues, check_case, num_training_problem
from ncatool.errors import NcaError, ValidationError

#: Intensity normalisations understood by :func:`normalize`.
NORMALIZATIONS: tuple[str, ...] = ("zscore", "ct", "minmax", "none")
#: Case sets understood by :meth:`NnUNetDataset.cases`: ``train`` = imagesTr, ``test`` = imagesTs.
SPLITS: tuple[str, ...] = ("train", "test")


class NormalizationSettings(Protocol):
    """What :func:`load_case` needs from a config (:class:`ncatool.data.datasets.DataConfig` has it)."""

    @property
    def normalization(self) -> str: ...

    @property
    def ct_window(self) -> tuple[float, float]: ...

    @property
    def zscore_nonzero(self) -> bool: ...


@dataclass
class CaseRecord:
    """The files of one case.

    Attributes:
        name: Case identifier (``CASE`` in ``CASE_0000.nii.gz``).
        image_paths: One file per channel, in channel order (or one multi-component file, e.g. an
            RGB PNG, holding all channels).
        label_path: The label file, or None (test split without labels).
    """

    name: str
    image_paths: list[Path]
    label_path: Path | None


@dataclass
class CaseData:
    """One loaded case.

    Attributes:
        name: Case identifier.
        image: ``(C, *spatial)`` float32, channels stacked, normalised if a config was given.
        label: ``(*spatial)`` int64, or None.
        spacing: Voxel size as in the file, SimpleITK ``(x, y[, z])`` order (3 values for a squeezed
            singleton-z 2D image).
        origin: Origin as in the file, ``(x, y[, z])``.
        direction: Direction cosines as in the file.
        squeezed_z: True if the file was 3D with a singleton z axis that was dropped.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    squeezed_z: bool = False

    @property
    def dim(self) -> int:
        """Number of spatial dimensions of ``image`` (2 or 3)."""
        return self.image.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape of ``image`` in array order."""
        return tuple(self.image.shape[1:])

    @property
    def num_channels(self) -> int:
        """Number of stacked channels C."""
        return int(self.image.shape[0])

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing of ``image``'s spatial axes in array order (``(z, y, x)`` or ``(y, x)``)."""
        spacing = tuple(reversed(self.spacing))
        return spacing[1:] if self.squeezed_z else spacing

    def to_image(self, array: np.ndarray) -> Image:
        """Wrap an array of this case's spatial shape (e.g. a prediction) with the case geometry.

        Args:
            array: ``(*spatial)`` in the (unresized) shape of ``image``.

        Returns:
            An :class:`Image` laid out like the source file (singleton z restored).
        """
        if tuple(array.shape) != self.spatial_shape:
            raise ValueError(f"array shape {array.shape} does not match case shape {self.spatial_shape}")
        if self.squeezed_z:
            array = array[None]
        return Image(array=array, spacing=self.spacing, origin=self.origin, direction=self.direction)


class NnUNetDataset:
    """An nnU-Net v2 raw dataset folder, as ncatool trains, predicts and evaluates on it.

    Args:
        root: The ``DatasetNNN_Name`` folder containing ``dataset.json``.

    Raises:
        NcaError: The folder or ``dataset.json`` is missing or breaks nnU-Net's rules (all listed), or
            it declares labels ncatool cannot train on (region-based labels, an ``ignore`` label).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NcaError("dataset folder does not exist", self.root)
        self.json_path = self.root / DATASET_JSON
        meta = read_dataset_json(self.root)
        # nnU-Net allows both; ncatool's losses and metrics know one integer class per label.
        if meta.has_regions:
            raise NcaError(
                "region-based labels (a list of values per label) are not supported by ncatool; "
                "use one integer value per label",
                self.json_path,
            )
        if meta.ignore_label is not None:
            raise NcaError(
                f"the 'ignore' label (value {meta.ignore_label}) is not supported by ncatool", self.json_path
            )
        self.meta = meta.content
        self.channel_names = meta.channel_names
        self.labels = {name: int(v) for name, v in sorted(meta.labels.items(), key=lambda kv: kv[1])}  # type: ignore[arg-type]
        self.file_ending = meta.file_ending
        self.num_training = meta.num_training
        self._dim: int | None = None

    @property
    def name(self) -> str:
        """Dataset name from ``dataset.json`` (``name``), else the folder name."""
        return str(self.meta.get("name", self.root.name))

    @property
    def num_channels(self) -> int:
        """Number of input channels C."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of label values including background."""
        return len(self.labels)

    @property
    def num_foreground(self) -> int:
        """Number of foreground labels (``num_classes - 1``)."""
        return self.num_classes - 1

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Foreground label names to values (background excluded)."""
        return {k: v for k, v in self.labels.items() if v != 0}

    def cases(self, split: str = "train") -> list[CaseRecord]:
        """List the cases of a case set, checking their files with verify's rules.

        Args:
            split: ``train`` (``imagesTr``/``labelsTr``, labels required, ``numTraining`` checked) or
                ``test`` (``imagesTs``, labels from ``labelsTs`` where present).

        Returns:
            Cases sorted by name.

        Raises:
            NcaError: A folder is missing, or a case's files break a rule (every such problem listed).
        """
        if split not in SPLITS:
            raise NcaError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        train = split == "train"
        found = find_raw_cases(self.root, "Tr" if train else "Ts", self.file_ending)
        if not found.images_dir.is_dir():
            raise NcaError(f"folder missing ({'training' if train else 'test'} images)", found.images_dir)
        if train and not found.labels_dir.is_dir():
            raise NcaError("folder missing (training labels)", found.labels_dir)
        issues = case_file_issues(found, self.num_channels, self.file_ending, labels_required=train)
        problem = num_training_problem(self.num_training, found) if train else None
        if problem:
            issues.append(Issue(self.json_path, problem))
        if issues:
            raise issues_error(issues, f"{found.images_dir}")
        return [
            CaseRecord(case, [files[c] for c in sorted(files)], found.labels.get(case))
            for case, files in sorted(found.images.items())
        ]

    @property
    def dim(self) -> int:
        """Spatial dimension of the training images, 2 or 3 (singleton-z 3D files count as 2D)."""
        if self._dim is None:
            cases = self.cases("train")
            if not cases:
                raise NcaError("no training cases", self.root / "imagesTr")
            self._dim = _header_dim(cases[0].image_paths[0])
        return self._dim

    def load(self, record: CaseRecord, config: NormalizationSettings | None = None) -> CaseData:
        """Load a case of this dataset with the integrity rules and ``dataset.json``'s labels.

        Args:
            record: A case from :meth:`cases`.
            config: Normalisation settings; None keeps raw intensities.

        Returns:
            The loaded :class:`CaseData`.
        """
        data = load_case(record, config, num_classes=self.num_classes)
        if data.num_channels != self.num_channels:
            raise NcaError(
                f"case has {data.num_channels} channel(s), dataset.json declares {self.num_channels}",
                record.image_paths[0],
            )
        return data

    def info(self) -> dict[str, Any]:
        """Summary: see :func:`dataset_info`."""
        return {
            "name": self.name,
            "num_channels": self.num_channels,
            "channel_names": dict(self.channel_names),
            "labels": dict(self.labels),
            "num_classes": self.num_classes,
            "num_foreground": self.num_foreground,
            "dim": self.dim,
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
            "source_layout": self.meta.get(SOURCE_LAYOUT_KEY),
        }


def load_cases(root: str | Path, split: str = "train") -> list[CaseRecord]:
    """List the cases of an nnU-Net raw dataset (see :meth:`NnUNetDataset.cases`).

    Args:
        root: The dataset folder (with ``dataset.json``).
        split: ``train`` or ``test``.

    Returns:
        Cases sorted by name.
    """
    return NnUNetDataset(root).cases(split)


def dataset_info(root: str | Path) -> dict[str, Any]:
    """Describe an nnU-Net raw dataset.

    Args:
        root: The dataset folder.

    Returns:
        ``{"name", "num_channels", "channel_names", "labels" (name -> value), "num_classes",
        "num_foreground", "dim" (2 or 3; singleton-z counts as 2), "numTraining", "file_ending",
        "source_layout" (``"isic"`` for a dataset ``prepare --layout isic`` made, else None)}``.
    """
    return NnUNetDataset(root).info()


def issues_error(issues: Sequence[Issue], where: str) -> NcaError:
    """One error for the problems of a case or a folder: the problem itself if there is one, else all."""
    if len(issues) == 1:
        return NcaError(issues[0].message, issues[0].path)
    return ValidationError([str(i) for i in issues], f"{where}: {len(issues)} problems")


def _header_dim(path: Path) -> int:
    """Spatial dimension of an image file from its header (singleton-z 3D counts as 2D)."""
    size, _ = read_header(path)
    if len(size) == 3 and size[2] == 1:
        return 2
    if len(size) not in (2, 3):
        raise NcaError(f"expected a 2D or 3D image, got {len(size)}D of size {size}", path)
    return len(size)


def _squeeze_z(img: Image) -> tuple[np.ndarray, bool]:
    """Array with spatial axes first and components last; singleton z dropped."""
    array = img.array
    if img.ndim == 3 and img.spatial_shape[0] == 1:
        return array[0], True
    return array, False


def load_case(
    record: CaseRecord, config: NormalizationSettings | None = None, num_classes: int | None = None
) -> CaseData:
    """Read a case, check it with verify's per-case rules, stack its channels and normalise.

    One file holding several components (an RGB PNG) contributes one channel per component.

    Args:
        record: The case files.
        config: Normalisation settings; None keeps raw intensities (as float32).
        num_classes: If given, label values must lie in ``[0, num_classes)`` (``dataset.json``'s labels).

    Returns:
        :class:`CaseData` with image ``(C, *spatial)`` float32 and label ``(*spatial)`` int64.

    Raises:
        NcaError: A file is unreadable, or the case breaks an integrity rule (each problem names its
            file): NaN/Inf voxels, label values that are not non-negative integers in the labels,
            channels and label that differ in size, spacing, origin or direction.
    """
    if not record.image_paths:
        raise NcaError(f"case {record.name!r} has no image files")
    images = [read_image(path) for path in record.image_paths]
    label = None if record.label_path is None else (record.label_path, read_image(record.label_path))
    num_channels = images[0].components if len(images) == 1 else len(images)
    allowed = None if num_classes is None else range(num_classes)
    checked = check_case(
        list(zip(record.image_paths, images, strict=True)), label, allowed, num_channels, record.name
    )
    if checked.errors:
        raise issues_error(checked.errors, f"case {record.name!r}")
    channels: list[np.ndarray] = []
    for img in images:
        array, squeezed = _squeeze_z(img)
        if img.is_vector:
            channels.extend(np.moveaxis(array, -1, 0).astype(np.float32, copy=False))
        else:
            channels.append(array.astype(np.float32, copy=False))
    image = np.stack(channels, axis=0)
    label_array = None if label is None else _squeeze_z(label[1])[0].astype(np.int64)
    if config is not None:
        image = normalize(image, config.normalization, config.ct_window, config.zscore_nonzero)
    first = images[0]
    return CaseData(
        name=record.name,
        image=image,
        label=label_array,
        spacing=first.spacing,
        origin=first.origin,
        direction=first.direction,
        squeezed_z=squeezed,
    )


def normalize(
    image: np.ndarray,
    method: str = "zscore",
    ct_window: tuple[float, float] = (-1000.0, 400.0),
    nonzero: bool = False,
) -> np.ndarray:
    """Normalise intensities per channel.

    Args:
        image: ``(C, *spatial)``.
        method: ``zscore``, ``ct``, ``minmax`` or ``none``.
        ct_window: ``(low, high)`` for ``ct``: clip, then map linearly to [0, 1].
        nonzero: For ``zscore``: statistics over nonzero voxels only, zero voxels stay 0.

    Returns:
        ``(C, *spatial)`` float32, a new array.
    """
    out = image.astype(np.float32, copy=True)
    if method == "none":
        return out
    if method == "ct":
        low, high = ct_window
        np.clip(out, low, high, out=out)
        out -= low
        out /= high - low
        return out
    for c in range(out.shape[0]):
        channel = out[c]
        if method == "zscore":
            mask = channel != 0 if nonzero else None
            values = channel[mask] if mask is not None and mask.any() else channel
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            scaled = (channel - mean) / (std if std > 1e-8 else 1.0)
            if mask is not None:
                scaled[~mask] = 0.0
            out[c] = scaled
        elif method == "minmax":
            lo, hi = float(channel.min()), float(channel.max())
            out[c] = (channel - lo) / (hi - lo) if hi > lo else 0.0
        else:
            raise ValueError(f"unknown normalization {method!r}; choose from {NORMALIZATIONS}")
    return out
