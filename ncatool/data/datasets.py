"""Read nnU-Net v2 raw datasets and serve them as torch datasets for NCA training.

Layout read (as written by ``ncatool prepare``)::

    DatasetNNN_Name/
        dataset.json            channel_names, labels, numTraining, file_ending
        imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
        labelsTr/CASE.nii.gz
        imagesTs/, labelsTs/    optional

Conventions:

* Arrays follow :mod:`ncatool.data.io`: spatial axes in SimpleITK order, ``(Z, Y, X)`` or ``(Y, X)``.
  A loaded case's image is ``(C, *spatial)`` float32 (channels stacked), its label ``(*spatial)``
  int64. A 2D dataset stored as 3D NIfTI with a singleton z axis (``(1, Y, X)``) is squeezed to 2D.
* Torch items are ``(image, label)``: ``((C, D, H, W), (D, H, W))`` for :class:`VolumeDataset` and
  ``((C, H, W), (H, W))`` for :class:`SliceDataset`; image float32, label int64.
* Randomness (patches, augmentation, empty-slice selection) comes from a NumPy generator seeded with
  ``(config.seed, epoch, stream)``; call ``set_epoch`` every epoch, and pass :func:`worker_init_fn`
  to a ``DataLoader`` with workers so workers draw different numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ncatool.data.io import Image, read_image
from ncatool.data.nnunet import read_dataset_json
from ncatool.errors import NcaError

#: Intensity normalisations understood by :func:`normalize`.
NORMALIZATIONS: tuple[str, ...] = ("zscore", "ct", "minmax", "none")
#: Splits understood by :func:`load_cases`.
SPLITS: tuple[str, ...] = ("train", "test")
#: At most this many foreground coordinates per class are kept for foreground-biased patches.
MAX_FOREGROUND_COORDS = 10_000

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SPLIT_FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _as_int_tuple(value: Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise NcaError(f"{name} must be a list of integers, got {value!r}") from err
    if not out or any(v < 1 for v in out):
        raise NcaError(f"{name} must be positive integers, got {value!r}")
    return out


@dataclass(frozen=True)
class DataConfig:
    """How cases are normalised, resized, cut and augmented.

    Attributes:
        normalization: ``zscore`` (per channel and case), ``ct`` (clip to ``ct_window``, scale to
            [0, 1]), ``minmax`` (per channel and case to [0, 1]) or ``none``.
        zscore_nonzero: With ``zscore``: compute mean/std over nonzero voxels only and keep zero
            voxels at 0 (skull-stripped MRI, as nnU-Net does).
        ct_window: ``(low, high)`` in HU for ``ct``.
        target_size: Resize every case (or every 2D slice) to this spatial size, in array order
            (``(D, H, W)`` for volumes, ``(H, W)`` for slices); image (bi/tri)linear, label nearest.
        patch_size: In training, return random patches of this size (array order) instead of whole
            images; smaller images are zero-padded at the far end first.
        foreground_prob: Probability that a training patch is centred near a foreground voxel (of a
            randomly chosen foreground class present in the case).
        flip_axes: Spatial axes (of the item, array order, negatives from the end) that are each
            flipped with probability 0.5 in training.
        rot90: In training, rotate by a random multiple of 90° in the last two spatial axes (the
            in-plane ``(Y, X)`` / ``(H, W)`` plane); only 0° or 180° when that plane is not square.
        val_fraction: Fraction of cases held out by :func:`split_cases` (0 = none).
        seed: Seed for the split, patches, augmentation and slice selection.
        slice_axis: Spatial axis (SimpleITK order, 0 = z) along which :class:`SliceDataset` cuts
            3D volumes into 2D slices.
        empty_slice_fraction: In training, :class:`SliceDataset` keeps every slice with foreground
            plus this fraction of the empty ones (redrawn each epoch); 1.0 keeps all slices.
        cache: Keep preprocessed cases in memory (the datasets here are small).
    """

    normalization: str = "zscore"
    zscore_nonzero: bool = False
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    target_size: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    foreground_prob: float = 0.5
    flip_axes: tuple[int, ...] = ()
    rot90: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    slice_axis: int = 0
    empty_slice_fraction: float = 1.0
    cache: bool = True

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise NcaError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {self.normalization!r}"
            )
        try:
            low, high = (float(v) for v in self.ct_window)
        except (TypeError, ValueError) as err:
            raise NcaError(f"ct_window must be two numbers LOW,HIGH, got {self.ct_window!r}") from err
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise NcaError(f"ct_window must be finite with LOW < HIGH, got {self.ct_window!r}")
        object.__setattr__(self, "ct_window", (low, high))
        object.__setattr__(self, "target_size", _as_int_tuple(self.target_size, "target_size"))
        object.__setattr__(self, "patch_size", _as_int_tuple(self.patch_size, "patch_size"))
        try:
            object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
        except (TypeError, ValueError) as err:
            raise NcaError(f"flip_axes must be a list of integers, got {self.flip_axes!r}") from err
        for name in ("foreground_prob", "empty_slice_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise NcaError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise NcaError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.slice_axis not in (0, 1, 2):
            raise NcaError(f"slice_axis must be 0 (z), 1 (y) or 2 (x), got {self.slice_axis}")
        if self.seed < 0:
            raise NcaError(f"seed must be >= 0, got {self.seed}")


def parse_ct_window(text: str) -> tuple[float, float]:
    """Parse a ``--ct-window`` value such as ``"-1000,400"``.

    Args:
        text: ``LOW,HIGH`` in HU.

    Returns:
        ``(low, high)`` with ``low < high``.

    Raises:
        NcaError: The text is not two numbers with LOW < HIGH.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError as err:
        raise NcaError(f"--ct-window must be LOW,HIGH (e.g. -1000,400), got {text!r}") from err
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise NcaError(f"--ct-window needs finite LOW < HIGH, got {text!r}")
    return low, high


def parse_size(text: str, option: str = "--target-size") -> tuple[int, ...]:
    """Parse a size option such as ``"64,64"`` or ``"32x64x64"``.

    Args:
        text: Comma- or ``x``-separated positive integers, in array order.
        option: The option name, for the error message.

    Returns:
        The sizes as a tuple.

    Raises:
        NcaError: The text is not a list of positive integers.
    """
    parts = [p.strip() for p in re.split(r"[,xX]", text.strip())]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError as err:
        raise NcaError(f"{option} must be positive integers such as 64,64, got {text!r}") from err
    if any(s < 1 for s in sizes):
        raise NcaError(f"{option} must be positive integers such as 64,64, got {text!r}")
    return sizes


# --------------------------------------------------------------------------------------------------
# nnU-Net raw dataset: dataset.json, case discovery, loading
# --------------------------------------------------------------------------------------------------


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


def _parse_channel_names(meta: dict[str, Any], path: Path) -> dict[str, str]:
    channels = meta.get("channel_names", meta.get("modality"))
    if channels is None:
        raise NcaError('missing key "channel_names" (e.g. {"0": "CT"})', path)
    if not isinstance(channels, dict) or not channels:
        raise NcaError(
            f'"channel_names" must be a non-empty object like {{"0": "CT"}}, got {channels!r}', path
        )
    expected = {str(i) for i in range(len(channels))}
    if set(channels) != expected:
        raise NcaError(
            f'"channel_names" keys must be "0".."{len(channels) - 1}", got {sorted(channels)}', path
        )
    return {str(i): str(channels[str(i)]) for i in range(len(channels))}


def _parse_labels(meta: dict[str, Any], path: Path) -> dict[str, int]:
    labels = meta.get("labels")
    if labels is None:
        raise NcaError('missing key "labels" (e.g. {"background": 0, "tumour": 1})', path)
    if not isinstance(labels, dict) or not labels:
        raise NcaError(f'"labels" must be a non-empty object of name: value, got {labels!r}', path)
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise NcaError(
                f"region-based label {name!r}: {value!r} is not supported; use integer values", path
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise NcaError(f'"labels" value of {name!r} must be an integer, got {value!r}', path)
        out[str(name)] = value
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise NcaError(
            f'"labels" values must be consecutive integers 0..N with background 0, got {values}', path
        )
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _read_header(path: Path) -> tuple[tuple[int, ...], int]:
    """``(size in (x, y[, z]) order, components per pixel)`` from an image file's header."""
    import SimpleITK as sitk

    if not path.is_file():
        raise NcaError("file does not exist", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise NcaError("cannot read image header (unreadable or corrupt)", path) from err
    return tuple(reader.GetSize()), int(reader.GetNumberOfComponents())


def _header_dim(path: Path) -> int:
    """Spatial dimension of an image file from its header (singleton-z 3D counts as 2D)."""
    size, _ = _read_header(path)
    if len(size) == 3 and size[2] == 1:
        return 2
    if len(size) not in (2, 3):
        raise NcaError(f"expected a 2D or 3D image, got {len(size)}D of size {size}", path)
    return len(size)


class NnUNetDataset:
    """An nnU-Net v2 raw dataset folder.

    Args:
        root: The ``DatasetNNN_Name`` folder containing ``dataset.json``.

    Raises:
        NcaError: The folder or ``dataset.json`` is missing, or a key is missing or invalid.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NcaError("dataset folder does not exist", self.root)
        self.json_path = self.root / "dataset.json"
        self.meta = read_dataset_json(self.json_path.parent)
        self.channel_names = _parse_channel_names(self.meta, self.json_path)
        self.labels = _parse_labels(self.meta, self.json_path)
        ending = self.meta.get("file_ending")
        if ending is None:
            raise NcaError('missing key "file_ending" (e.g. ".nii.gz")', self.json_path)
        if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
            raise NcaError(f'"file_ending" must look like ".nii.gz", got {ending!r}', self.json_path)
        self.file_ending: str = ending
        num = self.meta.get("numTraining")
        if num is None:
            raise NcaError('missing key "numTraining"', self.json_path)
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise NcaError(f'"numTraining" must be a non-negative integer, got {num!r}', self.json_path)
        self.num_training: int = num
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
        """Discover the cases of a split.

        Args:
            split: ``train`` (``imagesTr``/``labelsTr``, labels required) or ``test``
                (``imagesTs``, labels from ``labelsTs`` where present).

        Returns:
            Cases sorted by name.

        Raises:
            NcaError: A folder is missing, a file name does not follow ``CASE_XXXX``, a channel or
                label file is missing, or ``numTraining`` disagrees with ``imagesTr``.
        """
        if split not in SPLITS:
            raise NcaError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        images_name, labels_name = _SPLIT_FOLDERS[split]
        images_dir, labels_dir = self.root / images_name, self.root / labels_name
        train = split == "train"
        if not images_dir.is_dir():
            raise NcaError(f"folder missing ({'training' if train else 'test'} images)", images_dir)
        if train and not labels_dir.is_dir():
            raise NcaError("folder missing (training labels)", labels_dir)
        fe, n_ch = self.file_ending, self.num_channels
        groups: dict[str, dict[int, Path]] = {}
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file() or not path.name.endswith(fe):
                continue
            match = _CHANNEL_RE.match(path.name[: -len(fe)])
            if match is None:
                raise NcaError(f"file name must be CASE_XXXX{fe} (4-digit channel index)", path)
            channel = int(match["channel"])
            if channel >= n_ch:
                raise NcaError(
                    f"channel {channel:04d}, but {self.json_path.name} declares {n_ch} channel(s)", path
                )
            groups.setdefault(match["case"], {})[channel] = path
        records: list[CaseRecord] = []
        for case in sorted(groups):
            files = groups[case]
            missing = [c for c in range(n_ch) if c not in files]
            # nnU-Net's natural-image convention: one RGB(A) file holds all channels.
            single_vector = missing and set(files) == {0} and _read_header(files[0])[1] == n_ch
            if missing and not single_vector:
                raise NcaError(
                    f"channel file missing for case {case!r} (dataset.json declares {n_ch} channel(s))",
                    images_dir / f"{case}_{missing[0]:04d}{fe}",
                )
            label: Path | None = labels_dir / f"{case}{fe}"
            if not label.is_file():
                if train:
                    raise NcaError(f"label file missing for case {case!r}", label)
                label = None
            records.append(CaseRecord(case, [files[c] for c in sorted(files)], label))
        if train and len(records) != self.num_training:
            raise NcaError(
                f'"numTraining" is {self.num_training} but {images_name}/ holds {len(records)} case(s)',
                self.json_path,
            )
        return records

    @property
    def dim(self) -> int:
        """Spatial dimension of the training images, 2 or 3 (singleton-z 3D files count as 2D)."""
        if self._dim is None:
            cases = self.cases("train")
            if not cases:
                raise NcaError("no training cases", self.root / "imagesTr")
            self._dim = _header_dim(cases[0].image_paths[0])
        return self._dim

    def load(self, record: CaseRecord, config: DataConfig | None = None) -> CaseData:
        """Load a case of this dataset, checking label values against ``dataset.json``.

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
        }


def load_cases(root: str | Path, split: str = "train") -> list[CaseRecord]:
    """Discover the cases of an nnU-Net raw dataset.

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
        "num_foreground", "dim" (2 or 3; singleton-z counts as 2), "numTraining", "file_ending"}``.
    """
    return NnUNetDataset(root).info()


def _squeeze_z(img: Image) -> tuple[np.ndarray, bool]:
    """Array with spatial axes first and components last; singleton z dropped."""
    array = img.array
    if img.ndim == 3 and img.spatial_shape[0] == 1:
        return array[0], True
    return array, False


def load_case(
    record: CaseRecord, config: DataConfig | None = None, num_classes: int | None = None
) -> CaseData:
    """Read a case: stack its channels, read its label, normalise.

    Vector images (e.g. an RGB PNG in one file) contribute one channel per component.

    Args:
        record: The case files.
        config: Normalisation settings; None keeps raw intensities (as float32).
        num_classes: If given, label values must lie in ``[0, num_classes)``.

    Returns:
        :class:`CaseData` with image ``(C, *spatial)`` float32 and label ``(*spatial)`` int64.

    Raises:
        NcaError: A file is unreadable, shapes disagree, or label values are invalid.
    """
    if not record.image_paths:
        raise NcaError(f"case {record.name!r} has no image files")
    channels: list[np.ndarray] = []
    images = [read_image(path) for path in record.image_paths]
    first = images[0]
    shape: tuple[int, ...] = ()
    squeezed = False
    for i, (path, img) in enumerate(zip(record.image_paths, images, strict=True)):
        if img.ndim not in (2, 3):
            raise NcaError(f"expected a 2D or 3D image, got {img.ndim}D", path)
        array, sq = _squeeze_z(img)
        spatial = tuple(array.shape[:-1] if img.is_vector else array.shape)
        if i == 0:
            shape, squeezed = spatial, sq
        elif spatial != shape:
            raise NcaError(
                f"shape {spatial} differs from channel 0 ({record.image_paths[0].name}: {shape})", path
            )
        if img.is_vector:
            channels.extend(np.moveaxis(array, -1, 0).astype(np.float32, copy=False))
        else:
            channels.append(array.astype(np.float32, copy=False))
    image = np.stack(channels, axis=0)
    if not np.all(np.isfinite(image)):
        raise NcaError("image contains NaN or infinite values", record.image_paths[0])
    label = None
    if record.label_path is not None:
        label = _read_label(record.label_path, shape, num_classes)
    if config is not None:
        image = normalize(image, config.normalization, config.ct_window, config.zscore_nonzero)
    return CaseData(
        name=record.name,
        image=image,
        label=label,
        spacing=first.spacing,
        origin=first.origin,
        direction=first.direction,
        squeezed_z=squeezed,
    )


def _read_label(path: Path, shape: tuple[int, ...], num_classes: int | None) -> np.ndarray:
    img = read_image(path)
    if img.is_vector:
        raise NcaError(f"label must be a scalar image, got {img.components} components per pixel", path)
    array, _ = _squeeze_z(img)
    if tuple(array.shape) != shape:
        raise NcaError(f"label shape {tuple(array.shape)} differs from image shape {shape}", path)
    floating = np.issubdtype(array.dtype, np.floating)
    if floating and (not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))):
        raise NcaError("label contains non-integer values", path)
    label = array.astype(np.int64)
    if label.size and label.min() < 0:
        raise NcaError(f"label contains negative value {int(label.min())}", path)
    if num_classes is not None and label.size and label.max() >= num_classes:
        raise NcaError(
            f"label value {int(label.max())} is not in dataset.json labels (0..{num_classes - 1})", path
        )
    return label


def split_cases(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split case names into training and validation, reproducibly.

    The result depends only on the set of names, ``val_fraction`` and ``seed`` (not on input order).
    With ``val_fraction > 0`` and at least 2 cases, each side gets at least one case.

    Args:
        names: Case names (duplicates are ignored).
        val_fraction: Fraction in ``[0, 1)`` held out for validation; 0 holds out nothing.
        seed: Random seed.

    Returns:
        ``(train_names, val_names)``, each sorted, disjoint, together all names.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise NcaError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(names))
    n = len(unique)
    if n < 2 or val_fraction == 0.0:
        return unique, []
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return train, val


# --------------------------------------------------------------------------------------------------
# Pure array functions: normalisation, resizing, patches, augmentation, one-hot
# --------------------------------------------------------------------------------------------------


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


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an image with (bi/tri)linear interpolation.

    Args:
        image: ``(C, *spatial)`` or batched ``(N, C, *spatial)``, with ``len(size)`` spatial axes.
        size: Target spatial size.

    Returns:
        ``(C, *size)`` (or ``(N, C, *size)``) float32.
    """
    size = tuple(int(s) for s in size)
    batched = image.ndim == len(size) + 2
    x = image if batched else image.unsqueeze(0)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x.float(), size=size, mode=_LINEAR_MODES[len(size)], align_corners=False)
    return x if batched else x[0]


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a label map with nearest-neighbour interpolation (values are preserved).

    Args:
        label: ``(*spatial)`` or batched ``(N, *spatial)``, with ``len(size)`` spatial axes.
        size: Target spatial size.

    Returns:
        ``(*size)`` (or ``(N, *size)``) int64.
    """
    size = tuple(int(s) for s in size)
    batched = label.ndim == len(size) + 1
    x = label if batched else label.unsqueeze(0)
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x.unsqueeze(1).float(), size=size, mode="nearest-exact")[:, 0]
    x = x.long()
    return x if batched else x[0]


def pad_to_size(
    image: torch.Tensor, label: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad image and label at the far end of each spatial axis to at least ``size``.

    Args:
        image: ``(C, *spatial)``.
        label: ``(*spatial)``.
        size: Minimum spatial size.

    Returns:
        ``(image, label)`` with every spatial axis ``>= size``; unchanged if already large enough.
    """
    pad: list[int] = []
    for have, want in zip(reversed(label.shape), reversed(tuple(size)), strict=True):
        pad += [0, max(int(want) - int(have), 0)]
    if not any(pad):
        return image, label
    return F.pad(image, pad), F.pad(label, pad)


def foreground_coordinates(
    label: torch.Tensor | np.ndarray, max_per_class: int = MAX_FOREGROUND_COORDS, seed: int = 0
) -> dict[int, np.ndarray]:
    """Voxel coordinates of each foreground class (subsampled), for foreground-biased patches.

    Args:
        label: ``(*spatial)`` integer label map.
        max_per_class: Keep at most this many coordinates per class.
        seed: Seed of the subsampling.

    Returns:
        ``{class value: (N, ndim) int64 coordinates}`` for each class > 0 present.
    """
    array = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    coords = np.argwhere(array > 0)
    if coords.size == 0:
        return {}
    values = array[tuple(coords.T)]
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for value in np.unique(values):
        cls = coords[values == value]
        if len(cls) > max_per_class:
            cls = cls[rng.choice(len(cls), max_per_class, replace=False)]
        out[int(value)] = cls
    return out


def random_patch_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    foreground: dict[int, np.ndarray] | None = None,
    foreground_prob: float = 0.0,
) -> tuple[int, ...]:
    """Pick the corner of a random patch lying inside ``shape``.

    With probability ``foreground_prob`` (and foreground present) the patch contains a random
    voxel of a randomly chosen foreground class, at a random position within the patch.

    Args:
        shape: Spatial shape, each axis ``>= patch_size``.
        patch_size: Patch size, same length.
        rng: Random generator.
        foreground: Output of :func:`foreground_coordinates`, or None.
        foreground_prob: Probability of a foreground-containing patch.

    Returns:
        The start index per axis, ``0 <= start <= shape - patch_size``.
    """
    high = [int(s) - int(p) for s, p in zip(shape, patch_size, strict=True)]
    if any(h < 0 for h in high):
        raise ValueError(f"patch {tuple(patch_size)} larger than shape {tuple(shape)}; pad first")
    if foreground and rng.random() < foreground_prob:
        classes = sorted(foreground)
        coords = foreground[classes[int(rng.integers(len(classes)))]]
        voxel = coords[int(rng.integers(len(coords)))]
        offset = [int(rng.integers(p)) for p in patch_size]
        return tuple(int(min(max(v - o, 0), h)) for v, o, h in zip(voxel, offset, high, strict=True))
    return tuple(int(rng.integers(h + 1)) for h in high)


def crop(x: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing ``len(size)`` axes of ``x`` (a view).

    Args:
        x: ``(..., *spatial)``.
        start: Start per spatial axis.
        size: Size per spatial axis.

    Returns:
        ``(..., *size)``.
    """
    index = (Ellipsis, *(slice(int(s), int(s) + int(n)) for s, n in zip(start, size, strict=True)))
    return x[index]


def _image_axis(axis: int, nd: int) -> int:
    """Spatial axis (negatives from the end) to the axis of a ``(C, *spatial)`` image."""
    if not -nd <= axis < nd:
        raise ValueError(f"spatial axis {axis} out of range for {nd} spatial dimensions")
    return axis % nd + 1


def flip(image: torch.Tensor, label: torch.Tensor, axes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and label along the same spatial axes.

    Args:
        image: ``(C, *spatial)``.
        label: ``(*spatial)``.
        axes: Spatial axes (negatives from the end).

    Returns:
        ``(image, label)`` flipped (copies), or the inputs if ``axes`` is empty.
    """
    if not axes:
        return image, label
    nd = label.ndim
    img_axes = [_image_axis(a, nd) for a in axes]
    return torch.flip(image, img_axes), torch.flip(label, [a - 1 for a in img_axes])


def rot90(
    image: torch.Tensor, label: torch.Tensor, k: int, plane: tuple[int, int] = (-2, -1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate image and label by ``k`` x 90° in a spatial plane (as ``torch.rot90``).

    Args:
        image: ``(C, *spatial)``.
        label: ``(*spatial)``.
        k: Number of quarter turns.
        plane: Two spatial axes (default: the last two, the in-plane ``(H, W)``).

    Returns:
        ``(image, label)`` rotated.
    """
    if k % 4 == 0:
        return image, label
    nd = label.ndim
    a, b = (_image_axis(p, nd) for p in plane)
    return torch.rot90(image, k, (a, b)), torch.rot90(label, k, (a - 1, b - 1))


def random_flip(
    image: torch.Tensor,
    label: torch.Tensor,
    axes: Sequence[int],
    rng: np.random.Generator,
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip along each of ``axes`` independently with probability ``p`` (same for image and label).

    Args:
        image: ``(C, *spatial)``.
        label: ``(*spatial)``.
        axes: Candidate spatial axes.
        rng: Random generator.
        p: Flip probability per axis.

    Returns:
        ``(image, label)``.
    """
    chosen = [a for a in axes if rng.random() < p]
    return flip(image, label, chosen)


def random_rot90(
    image: torch.Tensor,
    label: torch.Tensor,
    rng: np.random.Generator,
    plane: tuple[int, int] = (-2, -1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by a random multiple of 90° in ``plane`` (same for image and label).

    Only 0° or 180° when the plane is not square, so the shape never changes.

    Args:
        image: ``(C, *spatial)``.
        label: ``(*spatial)``.
        rng: Random generator.
        plane: Two spatial axes.

    Returns:
        ``(image, label)``.
    """
    square = label.shape[plane[0]] == label.shape[plane[1]]
    k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    return rot90(image, label, k, plane)


def one_hot_foreground(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One channel per foreground class, for multi-label segmentation targets.

    Args:
        label: ``(*spatial)`` int64 with values in ``[0, num_classes)``.
        num_classes: Number of classes including background (>= 2).

    Returns:
        ``(num_classes - 1, *spatial)`` float32; channel ``k`` is ``label == k + 1``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    classes = torch.arange(1, num_classes, device=label.device).view(-1, *([1] * label.ndim))
    return (label.unsqueeze(0) == classes).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# torch Datasets
# --------------------------------------------------------------------------------------------------


class _NcaDataset(Dataset):
    """Shared parts: config checks, seeded random stream, patching and augmentation."""

    spatial_dims: int = 0

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        config: DataConfig,
        train: bool,
        num_classes: int | None = None,
    ) -> None:
        self.cases = list(cases)
        self.config = config
        self.train = train
        self.num_classes = num_classes
        nd, kind = self.spatial_dims, type(self).__name__
        for name in ("target_size", "patch_size"):
            value = getattr(config, name)
            if value is not None and len(value) != nd:
                raise NcaError(f"{name} {value} has {len(value)} values; {kind} items have {nd} spatial axes")
        for axis in config.flip_axes:
            if not -nd <= axis < nd:
                raise NcaError(f"flip axis {axis} out of range for {nd}D items of {kind}")
        for case in self.cases:
            if case.label_path is None:
                raise NcaError(f"case {case.name!r} has no label; {kind} needs labels", case.image_paths[0])
        self.epoch = 0
        self._stream = 0
        self.rng = self._make_rng()
        self._fg: dict[Any, dict[int, np.ndarray]] = {}

    def _make_rng(self) -> np.random.Generator:
        return np.random.default_rng((self.config.seed, self.epoch, self._stream))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the random stream for ``epoch`` (reproducible patches and augmentation)."""
        self.epoch = int(epoch)
        self.rng = self._make_rng()

    def reseed(self, stream: int) -> None:
        """Use another random stream (one per DataLoader worker; see :func:`worker_init_fn`)."""
        self._stream = int(stream)
        self.rng = self._make_rng()

    def _load(self, index: int) -> CaseData:
        return load_case(self.cases[index], self.config, self.num_classes)

    def _train_transform(
        self, image: torch.Tensor, label: torch.Tensor, key: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.patch_size is not None:
            fg = None
            if cfg.foreground_prob > 0:
                fg = self._fg.get(key)
                if fg is None:
                    fg = foreground_coordinates(label, seed=cfg.seed)
                    if cfg.cache:
                        self._fg[key] = fg
            image, label = pad_to_size(image, label, cfg.patch_size)
            start = random_patch_start(label.shape, cfg.patch_size, self.rng, fg, cfg.foreground_prob)
            image, label = crop(image, start, cfg.patch_size), crop(label, start, cfg.patch_size)
        if cfg.flip_axes:
            image, label = random_flip(image, label, cfg.flip_axes, self.rng)
        if cfg.rot90:
            image, label = random_rot90(image, label, self.rng)
        return image, label

    def _finish(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Copies, so callers may modify items in place without touching the cache.
        return (
            image.to(torch.float32).clone(memory_format=torch.contiguous_format),
            label.to(torch.int64).clone(memory_format=torch.contiguous_format),
        )


class VolumeDataset(_NcaDataset):
    """3D items for M3D-NCA: whole (resized) volumes, or random patches in training.

    Items are ``(image (C, D, H, W) float32, label (D, H, W) int64)``. Without ``target_size`` or
    ``patch_size`` volumes keep their own sizes (use batch size 1).

    Args:
        cases: Cases with labels (3D).
        config: Normalisation, resizing, patching and augmentation settings.
        train: Random patches (if ``config.patch_size``) and augmentation; else whole volumes.
        num_classes: If given, label values are checked to lie in ``[0, num_classes)``.

    Raises:
        NcaError: A case is 2D or lacks a label, or the config does not fit 3D items.
    """

    spatial_dims = 3

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        config: DataConfig,
        train: bool,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(cases, config, train, num_classes)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if config.cache:
            self._cache = [self._prepare(i) for i in range(len(self.cases))]

    def _prepare(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._load(index)
        if data.dim != 3:
            raise NcaError(
                f"is {data.dim}D; VolumeDataset needs 3D volumes (use SliceDataset for 2D)",
                self.cases[index].image_paths[0],
            )
        assert data.label is not None  # labels required in __init__
        image, label = torch.from_numpy(data.image), torch.from_numpy(data.label)
        if self.config.target_size is not None:
            image = resize_image(image, self.config.target_size)
            label = resize_label(label, self.config.target_size)
        return image, label

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (C, D, H, W), label (D, H, W))``."""
        if not 0 <= index < len(self.cases):
            raise IndexError(index)
        image, label = self._cache[index] if self._cache is not None else self._prepare(index)
        if self.train:
            image, label = self._train_transform(image, label, index)
        return self._finish(image, label)


class SliceDataset(_NcaDataset):
    """2D items for Med-NCA: one per 2D case, or one per slice of each 3D case.

    Items are ``(image (C, H, W) float32, label (H, W) int64)``. 3D volumes are cut along
    ``config.slice_axis``; each slice (or 2D image) is resized to ``config.target_size`` if given.
    In training, only slices with foreground plus ``config.empty_slice_fraction`` of the empty
    ones are used (redrawn by :meth:`set_epoch`), and patches/augmentation apply.

    Args:
        cases: Cases with labels, 2D or 3D.
        config: Settings (``target_size``/``patch_size`` as ``(H, W)``).
        train: Training mode (slice selection, patches, augmentation).
        num_classes: If given, label values are checked to lie in ``[0, num_classes)``.

    Raises:
        NcaError: A case lacks a label, or the config does not fit 2D items.
    """

    spatial_dims = 2

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        config: DataConfig,
        train: bool,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(cases, config, train, num_classes)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if config.cache else None
        self._last: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kept: list[tuple[int, int]] = []  # 2D cases and slices with foreground: always used
        self._empty: list[tuple[int, int]] = []  # empty slices of 3D cases: subsampled in training
        for i in range(len(self.cases)):
            image, label, is_volume = self._prepare(i)
            if self._cache is not None:
                self._cache.append((image, label))
            has_fg = (label.reshape(label.shape[0], -1) > 0).any(dim=1).tolist()
            for s, fg in enumerate(has_fg):
                (self._kept if fg or not is_volume else self._empty).append((i, s))
        self.index: list[tuple[int, int]] = []
        self._select()

    def _prepare(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(images (N, C, H, W), labels (N, H, W), is_volume)`` of one case."""
        data = self._load(index)
        assert data.label is not None  # labels required in __init__
        if data.dim == 2:
            image, label = data.image[None], data.label[None]
        else:
            axis = self.config.slice_axis
            image = np.moveaxis(data.image, axis + 1, 0)
            label = np.moveaxis(data.label, axis, 0)
        image_t = torch.from_numpy(np.ascontiguousarray(image))
        label_t = torch.from_numpy(np.ascontiguousarray(label))
        if self.config.target_size is not None:
            image_t = resize_image(image_t, self.config.target_size)
            label_t = resize_label(label_t, self.config.target_size)
        return image_t, label_t, data.dim == 3

    def _select(self) -> None:
        frac = self.config.empty_slice_fraction
        if not self.train or frac >= 1.0 or not self._empty:
            self.index = sorted(self._kept + self._empty)
            return
        n = round(frac * len(self._empty))
        if not self._kept:
            n = max(n, 1)
        rng = np.random.default_rng((self.config.seed, self.epoch, 1_000_003))
        chosen = [self._empty[i] for i in rng.choice(len(self._empty), n, replace=False)]
        self.index = sorted(self._kept + chosen)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the random stream and redraw the empty slices used in training."""
        super().set_epoch(epoch)
        self._select()

    def _case(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None:
            return self._cache[index]
        if self._last is None or self._last[0] != index:
            image, label, _ = self._prepare(index)
            self._last = (index, (image, label))
        return self._last[1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (C, H, W), label (H, W))``."""
        case, s = self.index[index]
        images, labels = self._case(case)
        image, label = images[s], labels[s]
        if self.train:
            image, label = self._train_transform(image, label, (case, s))
        return self._finish(image, label)

    def item_source(self, index: int) -> tuple[str, int]:
        """``(case name, slice index)`` of an item (slice 0 for 2D cases)."""
        case, s = self.index[index]
        return self.cases[case].name, s


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: give each worker its own random stream."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, _NcaDataset):
        info.dataset.reseed(worker_id + 1)


__all__ = [
    "NORMALIZATIONS",
    "CaseData",
    "CaseRecord",
    "DataConfig",
    "NnUNetDataset",
    "SliceDataset",
    "VolumeDataset",
    "crop",
    "dataset_info",
    "flip",
    "foreground_coordinates",
    "load_case",
    "load_cases",
    "normalize",
    "one_hot_foreground",
    "pad_to_size",
    "parse_ct_window",
    "parse_size",
    "random_flip",
    "random_patch_start",
    "random_rot90",
    "resize_image",
    "resize_label",
    "rot90",
    "split_cases",
    "worker_init_fn",
]
