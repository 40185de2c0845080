"""torch Datasets for NCA training: 3D volumes or patches (M3D-NCA), 2D images or slices (Med-NCA).

Items are ``(image, label)``: ``((C, D, H, W), (D, H, W))`` for :class:`VolumeDataset` and
``((C, H, W), (H, W))`` for :class:`SliceDataset`; image float32, label int64. Cases are loaded with
:func:`ncatool.data.loading.load_case` (the integrity rules of ``verify`` apply to each) and cut,
resized and augmented with :mod:`ncatool.data.transforms`.

Randomness (patches, augmentation, empty-slice selection) comes from a NumPy generator seeded with
``(config.seed, epoch)``; call ``set_epoch`` every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ncatool.data.loading import NORMALIZATIONS, CaseData, CaseRecord, load_case
from ncatool.data.transforms import (
    crop,
    foreground_coordinates,
    pad_to_size,
    random_flip,
    random_patch_start,
    random_rot90,
    resize_image,
    resize_label,
)
from ncatool.errors import NcaError


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
        val_fraction: The run's validation share, checked here; the datasets do not use it (the
            split is drawn by :func:`ncatool.data.splits.split_cases` before they are built).
        seed: Seed for patches, augmentation and slice selection.
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
        self.rng = self._make_rng()
        self._fg: dict[Any, dict[int, np.ndarray]] = {}

    def _make_rng(self) -> np.random.Generator:
        # The trailing 0 keeps the numbers drawn by earlier versions (same seed, same patches).
        return np.random.default_rng((self.config.seed, self.epoch, 0))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the random stream for ``epoch`` (reproducible patches and augmentation)."""
        self.epoch = int(epoch)
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
