"""Segmentation tasks: ``seg2d`` (Med-NCA two-level, high-res) and ``seg3d`` (M3D-NCA).

Both use :class:`ncatool.models.segmentation.SegmentationNCA` and differ only in defaults. ``seg2d``
trains on 2D images, or on 2D slices of 3D volumes; ``seg3d`` on whole volumes with the top level on
random patches. With ``intensity_bins = K`` the model also sees K soft bins of each channel's
normalised intensity as fixed inputs (:mod:`ncatool.tasks.segmentation.inputs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ncatool.config import TrainConfig
from ncatool.errors import NcaError
from ncatool.losses import SEG_LOSSES, make_seg_loss
from ncatool.models.segmentation import SegModelConfig, crop, probs_to_labels
from ncatool.tasks.segmentation.inputs import build_segmentation_model


@dataclass(frozen=True)
class SegConfig(TrainConfig):
    """A segmentation run: data, model and loss (plus the loop settings of :class:`TrainConfig`)."""

    # settings saved by an older ncatool under another name (see ncatool.config.rename_old_keys)
    RENAMED: ClassVar[dict[str, str]] = {"padding": "border"}

    data: str = ""  # nnU-Net raw dataset folder (DatasetNNN_Name)
    dim: int = 2
    channels: int = 16  # state channels: image + outputs + hidden
    hidden: int = 128
    levels: int = 2
    scale: int = 4  # resolution factor between levels
    steps: tuple[int, ...] = (64, 64)  # per level, coarsest first
    kernels: tuple[int, ...] = (7, 3)  # learned perception kernel per level
    filters: tuple[str, ...] = ("learned",)
    fire_rate: float = 0.5
    border: str = "reflect"  # how the perception sees beyond the grid: zeros | reflect | replicate | circular
    patch: tuple[int, ...] = (0, 32)  # training patch per level (0 = whole); level 0 always whole
    # every case resized to this (None = keep: a batch is then cropped to its smallest case)
    target_size: tuple[int, ...] | None = (64, 64)
    normalization: str = "zscore"  # zscore | ct | minmax | none
    zscore_nonzero: bool = False  # z-score statistics over nonzero voxels only (skull-stripped MRI)
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    val_fraction: float = 0.2
    augment: bool = True  # random flips on every axis and 90-degree in-plane rotations
    slice_axis: int = 0  # 2D tasks on 3D volumes: slice along this array axis
    loss: str = "dicefocal"  # dicefocal | dice | focal | bce
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    # K >= 2: K soft bins of each channel's normalised intensity as extra fixed inputs (0 = off)
    intensity_bins: int = 0
    # centres of the first and last bin; None: [0, 1] for ct/minmax, [-3, 3] for zscore
    intensity_range: tuple[float, float] | None = None


#: The span of the intensity bins when ``intensity_range`` is not set, by normalisation.
DEFAULT_BIN_RANGES = {"ct": (0.0, 1.0), "minmax": (0.0, 1.0), "zscore": (-3.0, 3.0)}


def bin_range(cfg: SegConfig) -> tuple[float, float]:
    """Centres of the first and last intensity bin of ``cfg`` (``intensity_range`` or the default).

    Raises:
        NcaError: No range is set and the normalisation has no default (``none``), or it is not
            ``LOW < HIGH``.
    """
    if cfg.intensity_range is None:
        if cfg.normalization not in DEFAULT_BIN_RANGES:
            raise NcaError(
                f"intensity_bins with normalization={cfg.normalization!r} needs intensity_range=LOW,HIGH "
                "(the intensities the bins span)"
            )
        return DEFAULT_BIN_RANGES[cfg.normalization]
    try:
        low, high = (float(v) for v in cfg.intensity_range)
    except (TypeError, ValueError) as err:
        raise NcaError(f"intensity_range must be two numbers LOW,HIGH, got {cfg.intensity_range!r}") from err
    if not low < high:
        raise NcaError(f"intensity_range must have LOW < HIGH, got {cfg.intensity_range!r}")
    return low, high


@dataclass(frozen=True)
class Seg2DConfig(SegConfig):
    """Med-NCA high-res defaults: 2 levels x 64 steps, 4x between levels, hidden 128."""

    task: str = "seg2d"
    batch_size: int = 8


@dataclass(frozen=True)
class Seg3DConfig(SegConfig):
    """M3D-NCA defaults: 2 levels x 10 steps, hidden 64, top level on 32^3 patches."""

    task: str = "seg3d"
    dim: int = 3
    hidden: int = 64
    scale: int = 2
    steps: tuple[int, ...] = (10, 10)
    kernels: tuple[int, ...] = (7, 3)
    patch: tuple[int, ...] = (0, 32)
    target_size: tuple[int, ...] | None = (64, 64, 64)
    batch_size: int = 2
    # every step recomputed in backward: 1/3 of the memory at the same speed on CPU (`ncatool bench
    # --only train3d`: 32^3 b2 0.196 s vs 0.203 s per iteration, peak 109 MB vs 279 MB)
    grad_checkpoint: int = 1


def check_seg_task_config(cfg: SegConfig) -> None:
    """Reject inconsistent settings with a clear message.

    Raises:
        NcaError: On a bad value.
    """
    if not cfg.data:
        raise NcaError(f"--data DATASET_DIR is required for task {cfg.task}")
    if cfg.loss not in SEG_LOSSES:
        raise NcaError(f"loss must be one of {SEG_LOSSES}, got {cfg.loss!r}")
    if cfg.target_size is not None and len(cfg.target_size) != cfg.dim:
        raise NcaError(f"target_size needs {cfg.dim} values for {cfg.task}, got {cfg.target_size}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NcaError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.intensity_bins < 0 or cfg.intensity_bins == 1:
        raise NcaError(f"intensity_bins must be 0 (off) or at least 2, got {cfg.intensity_bins}")
    if cfg.intensity_bins:
        bin_range(cfg)


def common_crop(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Crop ``(image (C, *S_i), label (*S_i))`` items of different sizes to their common smallest size.

    Cases keep their own sizes when ``target_size`` is None (tiles, slabs); a batch needs one size,
    so each item is cut to the per-axis minimum at a random position (drawn from torch's global
    generator, which the training loop seeds every epoch). Items of one size are returned as they are.
    """
    shapes = [tuple(label.shape) for _, label in items]
    if len(set(shapes)) <= 1:
        return items
    smallest = tuple(min(sizes) for sizes in zip(*shapes, strict=True))
    from ncatool.data.transforms import crop

    cropped = []
    for image, label in items:
        starts = [int(torch.randint(0, s - m + 1, ())) for s, m in zip(label.shape, smallest, strict=True)]
        cropped.append((crop(image, starts, smallest), crop(label, starts, smallest)))
    return cropped


class SegmentationTask:
    """Trains a :class:`SegmentationNCA` on an nnU-Net raw dataset.

    Args:
        cfg: The run config.
        device: Training device.
    """

    #: Validation Dice of items at the training resolution (see :meth:`validate`).
    score_name = "dice_train_res"

    def __init__(self, cfg: SegConfig, device: torch.device) -> None:
        from ncatool.data import datasets as ds
        from ncatool.data.loading import dataset_info, load_cases
        from ncatool.data.splits import split_cases

        check_seg_task_config(cfg)
        self.config = cfg
        self.device = device
        root = Path(cfg.data)
        info = dataset_info(root)
        self.in_channels = int(info["num_channels"])
        self.n_out = int(info["num_foreground"])
        if self.n_out < 1:
            raise NcaError("dataset.json defines no foreground label", root / "dataset.json")
        if cfg.dim == 3 and int(info["dim"]) != 3:
            raise NcaError("seg3d needs 3D volumes; this dataset holds 2D images (use seg2d)", root)
        cases = load_cases(root, split="train")
        names = [c.name for c in cases]
        train_names, val_names = split_cases(names, cfg.val_fraction, cfg.seed)
        by_name = {c.name: c for c in cases}
        data_cfg = ds.DataConfig(
            normalization=cfg.normalization,
            zscore_nonzero=cfg.zscore_nonzero,
            ct_window=cfg.ct_window,
            target_size=cfg.target_size,
            flip_axes=tuple(range(cfg.dim)) if cfg.augment else (),
            rot90=cfg.augment,
            seed=cfg.seed,
            slice_axis=cfg.slice_axis,
        )
        kind = ds.VolumeDataset if cfg.dim == 3 else ds.SliceDataset
        n_classes = self.n_out + 1
        self.train_set = kind([by_name[n] for n in train_names], data_cfg, train=True, num_classes=n_classes)
        self.val_set = kind([by_name[n] for n in val_names], data_cfg, train=False, num_classes=n_classes)
        if len(self.train_set) == 0:
            raise NcaError("no training items (is the dataset empty?)", root)
        self.patch = cfg.patch
        self.loss_fn = make_seg_loss(cfg.loss, cfg.dice_weight, cfg.focal_weight)
        self.split = {"train": list(train_names), "val": list(val_names)}
        self.source_layout: str | None = info.get("source_layout")

    def model_config(self) -> SegModelConfig:
        """The model shape for this dataset."""
        cfg = self.config
        return SegModelConfig(
            dim=cfg.dim,
            in_channels=self.in_channels * (1 + cfg.intensity_bins),
            n_out=self.n_out,
            channels=cfg.channels,
            hidden=cfg.hidden,
            levels=cfg.levels,
            scale=cfg.scale,
            steps=cfg.steps,
            kernels=cfg.kernels,
            filters=cfg.filters,
            fire_rate=cfg.fire_rate,
            padding=cfg.border,
            patch=cfg.patch,
        )

    def build_model(self) -> nn.Module:
        """A fresh :class:`SegmentationNCA` (with intensity bins if the run asks for them)."""
        cfg = self.config
        bins = cfg.intensity_bins
        try:
            return build_segmentation_model(self.model_config(), bins, bin_range(cfg) if bins else (0.0, 1.0))
        except ValueError as err:
            extra = f" (with {bins} intensity bins per image channel)" if bins else ""
            raise NcaError(f"invalid model settings{extra}: {err}") from err

    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches ``(image (B, C, *S), target (B, K, *S))``."""
        from ncatool.data.transforms import one_hot_foreground

        self.train_set.set_epoch(epoch)
        n = len(self.train_set)
        iters = self.config.iters_per_epoch
        order = torch.randint(0, n, (iters * batch_size,)) if iters > 0 else torch.randperm(n)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].tolist()
            items = common_crop([self.train_set[i] for i in idx])
            image = torch.stack([it[0] for it in items]).to(self.device)
            label = torch.stack([it[1] for it in items])
            target = torch.stack([one_hot_foreground(lab, self.n_out + 1) for lab in label]).to(self.device)
            yield image, target

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a batch; the target is cropped to the window the model ran on."""
        image, target = batch
        out = model(image, patch=self.patch, checkpoint_every=self.config.grad_checkpoint)
        tgt = crop(target, out.window)
        loss = self.loss_fn(out.logits, tgt)
        return loss, {}

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Mean Dice per foreground label over validation items at the training resolution.

        Items are what training sees (resized to ``target_size``; slices for ``seg2d`` on volumes),
        hence the name ``dice_train_res``; the Dice rule is :func:`ncatool.metrics.dice` (NaN when
        reference and prediction are both empty, left out of the means), as ``ncatool eval`` uses.
        The run's summary adds ``best_val_dice``: best.pt scored exactly as ``ncatool eval --split val``
        scores it (:meth:`final_scores`).
        """
        from ncatool.metrics import dice, nanmean

        items = self.val_set if len(self.val_set) else self.train_set
        per_label: list[list[float]] = [[] for _ in range(self.n_out)]
        for i in range(len(items)):
            image, label = items[i]
            probs = model.predict_proba(image[None].to(self.device))  # type: ignore[operator]
            pred = probs_to_labels(probs)[0].cpu().numpy()
            ref = label.numpy()
            for k in range(self.n_out):
                per_label[k].append(dice(pred == k + 1, ref == k + 1))
        means = [nanmean(v) for v in per_label]
        out = {self.score_name: nanmean(means)}
        if self.n_out > 1:
            out.update({f"{self.score_name}_{k + 1}": m for k, m in enumerate(means)})
        return out

    def final_scores(self, best: Path) -> dict[str, float]:
        """``best_val_dice``: the validation split's foreground-mean Dice of ``best``, computed by the
        code of ``ncatool eval --checkpoint best --split val`` (native resolution, whole cases)."""
        from ncatool.runtime import EvalRequest, load

        if not self.split.get("val"):
            return {}
        summary = load(best, str(self.device)).evaluate(EvalRequest(data=Path(self.config.data), split="val"))
        return {"best_val_dice": float(summary["foreground_mean"]["Dice"])}

    def save_samples(self, model: nn.Module, path: Path) -> None:
        """Image, ground truth and prediction side by side for a few validation items."""
        from ncatool.plots import save_segmentation_panel

        items = self.val_set if len(self.val_set) else self.train_set
        rows = []
        for i in range(min(self.config.samples, len(items))):
            image, label = items[i]
            probs = model.predict_proba(image[None].to(self.device))  # type: ignore[operator]
            rows.append((image.cpu(), label, probs_to_labels(probs)[0].cpu()))
        save_segmentation_panel(rows, path)

    def reduce_memory(self) -> str | None:
        """Halve the training patches of levels above 0 (not below 8 voxels)."""
        smaller = tuple(p if i == 0 or p == 0 else max(8, p // 2) for i, p in enumerate(self.patch))
        if smaller == self.patch or all(p == 0 for p in self.patch[1:]):
            return None
        self.patch = smaller
        return f"training patch reduced to {smaller}"

    def extra_state(self) -> dict[str, Any]:
        """What predict/eval need besides weights: the model shape, the data split and the layout the
        dataset was prepared from (``"isic"``: predict writes ISIC-style PNG masks)."""
        state: dict[str, Any] = {"model": self.model_config().__dict__, "split": self.split}
        if self.source_layout:
            state["source_layout"] = self.source_layout
        return state
