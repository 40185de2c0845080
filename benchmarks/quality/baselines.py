"""Baselines for the segmentation quality benchmark: intensity thresholds and a small U-Net.

Both baselines read an nnU-Net v2 raw dataset with one channel (``_0000``; 2D or 3D files), learn
from ``imagesTr``/``labelsTr`` only and write one label map per held-out case
``imagesTs/CASE_0000`` as ``OUTPUT/CASE.nii.gz`` with the input image's geometry, ready for
``ncatool eval --pred OUTPUT --gt DS/labelsTs --json``.

Usage::

    baselines.py threshold --data DS --output DIR --method otsu|best
    baselines.py unet --data DS --output DIR --seconds T --seed S [--base 8] [--depth 2]
        [--batch N] [--patch P [P ...]] [--threads 2] [--lr 0.01]
        [--normalization zscore|ct|minmax|none] [--zscore-nonzero] [--ct-window LO HI]

``threshold``
    With K foreground labels, K global thresholds ``t1 < ... < tK`` cut the intensity axis into
    K + 1 intervals, one per label; the labels are ordered by their mean training intensity (for the
    usual case, background darkest, that is label 0, 1, ..., K). ``best`` picks the thresholds that
    maximise the mean foreground Dice pooled over all training voxels; ``otsu`` maximises Otsu's
    between-class variance of the pooled training histogram (all voxels for one foreground label,
    nonzero voxels for several: zero is the outside of skull-stripped images). Both are solved
    exactly on the intensity histogram (every integer value for integer images with a range up to
    2048, else 1024 equal bins) by dynamic programming over the interval boundaries. Writes
    ``thresholds.json``.

``unet``
    A small 2D or 3D U-Net (from the images' dimensionality; files one slice thick count as 2D)
    trained for a wall-clock budget that includes reading the data, then applied to the whole
    padded test images. Intensities are normalised with ncatool's own ``normalize`` (default: z-score
    over the whole image, as the NCA runs do; pass the NCA run's options for a like-for-like
    comparison). Writes ``unet.json``.

Errors in the input (missing folders or files, unreadable images, bad options) print one line
naming the path and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncatool.data.io import write_image
from ncatool.data.loading import NORMALIZATIONS, CaseData, NnUNetDataset, normalize
from ncatool.data.nnunet.dataset_json import write_json
from ncatool.data.nnunet.layout import FILE_ENDING
from ncatool.errors import USER_ERROR_EXIT_CODE, NcaError

#: Integer images with at most this many distinct possible values get one histogram bin per value.
MAX_INTEGER_BINS = 2048
#: Number of equal-width histogram bins for float images (and integers with a wider range).
FLOAT_BINS = 1024
#: Voxels per batch the automatic ``--batch`` aims at.
VOXELS_PER_BATCH = 2**17
MAX_AUTO_BATCH = 32


# --------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Case:
    """One case of the dataset, read by ncatool's own loader.

    Attributes:
        name: The case identifier (``CASE`` of ``CASE_0000.nii.gz``).
        array: Raw intensities ``(Y, X)`` or ``(Z, Y, X)`` float32 (a singleton z axis is dropped).
        label: Integer labels of the same shape, or None (test labels are not read).
        data: The loaded case, for its geometry (:meth:`CaseData.to_image`).
    """

    name: str
    array: np.ndarray
    label: np.ndarray | None
    data: CaseData


@dataclass
class Dataset:
    """A loaded nnU-Net raw dataset.

    Attributes:
        folder: The dataset folder.
        label_names: Names of the label values ``0, 1, ..., K`` (index = value).
        train: The ``imagesTr``/``labelsTr`` cases, with labels.
        test: The ``imagesTs`` cases (labels are not read).
    """

    folder: Path
    label_names: list[str]
    train: list[Case]
    test: list[Case]

    @property
    def num_classes(self) -> int:
        """Number of labels including background (K + 1)."""
        return len(self.label_names)

    @property
    def dim(self) -> int:
        """Spatial dimensionality of the cases (2 or 3)."""
        return self.train[0].array.ndim


def load_dataset(folder: Path) -> Dataset:
    """Read the training cases (images and labels) and the test images of a raw dataset.

    Args:
        folder: The nnU-Net raw dataset folder.

    Returns:
        The :class:`Dataset`.

    Raises:
        NcaError: What :class:`ncatool.data.loading.NnUNetDataset` refuses (missing folder,
            ``dataset.json``, ``imagesTr``/``imagesTs`` or labels, bad label values), more than one
            channel, labels that are not ``0 .. K``, or 2D and 3D cases mixed.
    """
    dataset = NnUNetDataset(folder)
    values = sorted(dataset.labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise NcaError(
            f"labels must be 0 (background), 1, ..., K with K >= 1; got {values}", dataset.json_path
        )
    if dataset.num_channels != 1:
        raise NcaError(
            f"{dataset.num_channels} channels; the baselines support exactly one (_0000)", dataset.json_path
        )
    names = {v: k for k, v in dataset.labels.items()}

    def load(split: str, with_labels: bool) -> list[Case]:
        cases = []
        for record in dataset.cases(split):
            data = dataset.load(replace(record, label_path=record.label_path if with_labels else None))
            cases.append(Case(name=data.name, array=data.image[0], label=data.label, data=data))
        return cases

    train, test = load("train", with_labels=True), load("test", with_labels=False)
    if len({c.array.ndim for c in train + test}) > 1:
        raise NcaError("mixes 2D and 3D images; use one kind", folder)
    return Dataset(folder=folder, label_names=[names[v] for v in values], train=train, test=test)


def prepare_output(output: Path, dataset: Dataset) -> None:
    """Create the output folder; warn about label maps in it that are not test cases.

    Raises:
        NcaError: ``output`` exists and is not a folder.
    """
    if output.exists() and not output.is_dir():
        raise NcaError("--output exists and is not a folder", output)
    output.mkdir(parents=True, exist_ok=True)
    expected = {f"{c.name}{FILE_ENDING}" for c in dataset.test}
    stale = sorted(p.name for p in output.glob(f"*{FILE_ENDING}") if p.name not in expected)
    if stale:
        print(
            f"warning: {output} also holds {len(stale)} other label maps (e.g. {stale[0]}); "
            "ncatool eval will see them",
            file=sys.stderr,
        )


def write_prediction(case: Case, labels: np.ndarray, output: Path) -> Path:
    """Write a label map with the case image's geometry as ``output/CASE.nii.gz``.

    Args:
        case: The test case.
        labels: Integer labels, the shape of ``case.array``.
        output: The output folder.

    Returns:
        The written file.
    """
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return write_image(case.data.to_image(labels.astype(dtype)), output / f"{case.name}{FILE_ENDING}")


# --------------------------------------------------------------------------------------------------
# Thresholds


@dataclass
class Binning:
    """Equal-width intensity bins; bin ``j`` holds ``lo + j * width <= x < lo + (j + 1) * width``.

    Attributes:
        lo: Lower edge of bin 0.
        width: Bin width.
        count: Number of bins.
    """

    lo: float
    width: float
    count: int

    @classmethod
    def for_images(cls, arrays: Sequence[np.ndarray]) -> Binning:
        """One bin per integer value for integer-valued images with a small range, else equal bins."""
        lo = min(float(a.min()) for a in arrays)
        hi = max(float(a.max()) for a in arrays)
        integer = all(np.array_equal(a, np.round(a)) for a in arrays)
        if integer and hi - lo + 1 <= MAX_INTEGER_BINS:
            return cls(lo=lo - 0.5, width=1.0, count=int(hi - lo) + 1)
        return cls(lo=lo, width=(hi - lo) / FLOAT_BINS if hi > lo else 1.0, count=FLOAT_BINS)

    def index(self, array: np.ndarray) -> np.ndarray:
        """Bin indices (``int64``, same shape), clipped to ``0 .. count - 1``."""
        return np.clip(np.floor((array - self.lo) / self.width), 0, self.count - 1).astype(np.int64)

    def edge(self, j: int) -> float:
        """The intensity at the lower edge of bin ``j``: ``x >= edge(j)`` exactly when bin >= j."""
        return self.lo + j * self.width


def label_histograms(
    cases: Sequence[Case], binning: Binning, num_classes: int, nonzero: bool = False
) -> np.ndarray:
    """Pooled per-label intensity histograms of the training cases.

    Args:
        cases: Cases with labels.
        binning: The bins.
        num_classes: K + 1.
        nonzero: Count only voxels whose intensity is not 0.

    Returns:
        ``(K + 1, bins)`` counts (``float64``): row ``v`` is the histogram of the voxels labelled ``v``.
    """
    counts = np.zeros(num_classes * binning.count, dtype=np.float64)
    for case in cases:
        assert case.label is not None
        keep = case.array != 0 if nonzero else np.ones(case.label.shape, dtype=bool)
        flat = case.label[keep] * binning.count + binning.index(case.array[keep])
        counts += np.bincount(flat, minlength=counts.size)
    return counts.reshape(num_classes, binning.count)


def _interval_sums(hist: np.ndarray) -> np.ndarray:
    """``out[a, b] = hist[a:b].sum()`` for every pair of bin boundaries.

    Args:
        hist: ``(bins,)``.

    Returns:
        ``(bins + 1, bins + 1)``, negative-free only where ``b >= a``.
    """
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    return cum[None, :] - cum[:, None]


def dice_scores(hist: np.ndarray, label: int) -> np.ndarray:
    """Pooled Dice of ``label`` if bins ``[a, b)`` are predicted as it.

    Args:
        hist: ``(K + 1, bins)`` per-label histograms.
        label: The label value.

    Returns:
        ``(bins + 1, bins + 1)`` Dice for each interval ``[a, b)`` (1 where the label is absent and
        nothing is predicted).
    """
    true_pos = _interval_sums(hist[label])
    predicted = _interval_sums(hist.sum(axis=0))
    denom = predicted + hist[label].sum()
    return np.divide(2.0 * true_pos, denom, out=np.ones_like(denom), where=denom > 0)


def otsu_scores(hist: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Otsu's between-class term ``S**2 / W`` of each interval of a histogram.

    Maximising the sum of ``S_k**2 / W_k`` over the classes (``W`` the voxel count and ``S`` the
    intensity sum of class k) maximises the between-class variance.

    Args:
        hist: ``(bins,)`` counts.
        centres: ``(bins,)`` bin centre intensities.

    Returns:
        ``(bins + 1, bins + 1)`` scores of the intervals ``[a, b)``.
    """
    weight = _interval_sums(hist)
    total = _interval_sums(hist * centres)
    return np.divide(total**2, weight, out=np.zeros_like(weight), where=weight > 0)


def best_partition(scores: Sequence[np.ndarray]) -> list[int]:
    """Cut ``bins`` into ``len(scores)`` non-empty consecutive intervals maximising the summed score.

    Exact dynamic programming over the boundaries, ``O(segments * bins**2)``.

    Args:
        scores: ``scores[k][a, b]``, each ``(bins + 1, bins + 1)``: the score of giving bins
            ``[a, b)`` to segment ``k`` (segments in intensity order).

    Returns:
        The inner boundaries ``t_1 < ... < t_{segments - 1}`` (bin indices).
    """
    n = scores[0].shape[0] - 1
    if n < len(scores):
        raise NcaError(f"the training images have too few distinct intensities for {len(scores)} classes")
    after = np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None]  # b > a
    value = np.where(after[:, n], scores[-1][:, n], -np.inf)
    choices = []
    for seg in scores[-2::-1]:
        total = np.where(after, seg + value[None, :], -np.inf)
        choices.append(np.argmax(total, axis=1))
        value = total.max(axis=1)
    bounds, start = [], 0
    for choice in reversed(choices):
        start = int(choice[start])
        bounds.append(start)
    return bounds


def centre_plateaus(bounds: list[int], scores: Sequence[np.ndarray]) -> list[int]:
    """Move each boundary to the middle of the run of positions with the same total score.

    Empty bins between two classes make many boundaries equally good; the middle of the gap
    generalises best. Each boundary is moved with the others fixed.

    Args:
        bounds: Inner boundaries from :func:`best_partition`.
        scores: The same score matrices.

    Returns:
        The adjusted boundaries.
    """
    n = scores[0].shape[0] - 1
    bounds = list(bounds)
    for i, current in enumerate(bounds):
        left = bounds[i - 1] if i > 0 else 0
        right = bounds[i + 1] if i + 1 < len(bounds) else n
        candidates = np.arange(left + 1, right)
        total = scores[i][left, candidates] + scores[i + 1][candidates, right]
        best = total[current - left - 1]
        same = np.abs(total - best) <= 1e-12 * max(1.0, abs(best))
        lo = hi = current - left - 1
        while lo > 0 and same[lo - 1]:
            lo -= 1
        while hi + 1 < len(same) and same[hi + 1]:
            hi += 1
        bounds[i] = int(candidates[(lo + hi) // 2])
    return bounds


def intensity_order(cases: Sequence[Case], num_classes: int) -> list[int]:
    """Label values sorted by their mean training intensity (darkest first; absent labels last)."""
    sums = np.zeros(num_classes)
    counts = np.zeros(num_classes)
    for case in cases:
        assert case.label is not None
        flat = case.label.ravel()
        sums += np.bincount(flat, weights=case.array.ravel().astype(np.float64), minlength=num_classes)
        counts += np.bincount(flat, minlength=num_classes)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    return [int(v) for v in np.argsort(means, kind="stable")]


@dataclass
class ThresholdModel:
    """Global thresholds and the label of each interval.

    Attributes:
        thresholds: ``t_1 < ... < t_K`` (intensities); a voxel gets interval ``#{k: x >= t_k}``.
        order: ``order[i]`` is the label of interval ``i``.
    """

    thresholds: list[float]
    order: list[int]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Labels (``int64``) of an image array of any shape."""
        interval = np.searchsorted(np.asarray(self.thresholds), array, side="right")
        return np.asarray(self.order)[interval]


def fit_thresholds(dataset: Dataset, method: str) -> tuple[ThresholdModel, dict[str, Any]]:
    """Choose the K thresholds on the training cases.

    Args:
        dataset: The dataset.
        method: ``"best"`` (maximise the mean foreground Dice) or ``"otsu"``.

    Returns:
        The model and a JSON-able summary (thresholds, label order, training Dice per label, ...).
    """
    k = dataset.num_classes
    binning = Binning.for_images([c.array for c in dataset.train])
    order = intensity_order(dataset.train, k)
    hist = label_histograms(dataset.train, binning, k)
    nonzero = method == "otsu" and k > 2
    if method == "best":
        scores = [
            dice_scores(hist, v) / (k - 1) if v != 0 else np.zeros((binning.count + 1,) * 2) for v in order
        ]
    else:
        pooled = label_histograms(dataset.train, binning, k, nonzero=nonzero).sum(axis=0)
        centres = binning.lo + (np.arange(binning.count) + 0.5) * binning.width
        scores = [otsu_scores(pooled, centres)] * k
    bounds = centre_plateaus(best_partition(scores), scores)
    model = ThresholdModel(thresholds=[binning.edge(j) for j in bounds], order=order)
    edges = [0, *bounds, binning.count]
    train_dice = {
        dataset.label_names[v]: float(dice_scores(hist, v)[edges[i], edges[i + 1]])
        for i, v in enumerate(order)
        if v != 0
    }
    summary = {
        "method": method,
        "thresholds": model.thresholds,
        "interval_labels": order,
        "label_names": dataset.label_names,
        "train_dice": train_dice,
        "train_mean_dice": float(np.mean(list(train_dice.values()))),
        "histogram": {"bins": binning.count, "lo": binning.lo, "width": binning.width},
        "otsu_nonzero_only": nonzero,
        "train_cases": len(dataset.train),
    }
    return model, summary


def run_threshold(args: argparse.Namespace) -> int:
    """The ``threshold`` subcommand: fit on imagesTr, write imagesTs predictions + thresholds.json."""
    dataset = load_dataset(args.data)
    prepare_output(args.output, dataset)
    model, summary = fit_thresholds(dataset, args.method)
    for case in dataset.test:
        write_prediction(case, model.apply(case.array), args.output)
    write_json(summary, args.output / "thresholds.json")
    shown = ", ".join(f"{t:g}" for t in model.thresholds)
    dice = ", ".join(f"{name} {d:.4f}" for name, d in summary["train_dice"].items())
    print(
        f"threshold {args.method}: thresholds [{shown}] (interval labels {model.order}); "
        f"training Dice {dice}; wrote {len(dataset.test)} predictions to {args.output}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# U-Net


def conv_block(dim: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """Two (3x3[x3] conv, InstanceNorm, ReLU) layers; keeps the spatial size."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers += [
            conv(c_in, out_channels, 3, padding=1, bias=False),
            norm(out_channels, affine=True),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """A plain U-Net: ``depth`` max-pool downsamplings, transposed-conv upsampling, skip concatenation.

    Level ``i`` has ``base * 2**i`` channels (``i = 0 .. depth``, the last is the bottleneck).

    Args:
        dim: 2 or 3 spatial dimensions.
        in_channels: Input channels.
        num_classes: Output channels (one logit per label, background included).
        base: Channels of the first level.
        depth: Number of downsamplings; inputs must be divisible by ``2**depth``.
    """

    def __init__(self, dim: int, in_channels: int, num_classes: int, base: int = 8, depth: int = 2) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        up = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        self.pool = nn.MaxPool2d(2) if dim == 2 else nn.MaxPool3d(2)
        self.encoders = nn.ModuleList(
            conv_block(dim, c_in, c_out)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.ups = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decoders = nn.ModuleList(
            conv_block(dim, 2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.head = (nn.Conv2d if dim == 2 else nn.Conv3d)(base, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            x: ``(N, in_channels, *S)`` with every axis of ``S`` divisible by ``2**depth``.

        Returns:
            ``(N, num_classes, *S)``.
        """
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def normalize_image(array: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """Intensities as ncatool's NCA sees them: :func:`ncatool.data.loading.normalize` of one channel.

    Args:
        array: ``(*S)`` image.
        args: ``normalization`` (default ``zscore``: ``(x - mean) / std`` over the whole image),
            ``zscore_nonzero`` and ``ct_window``.

    Returns:
        ``(*S)`` float32.
    """
    return normalize(array[None], args.normalization, tuple(args.ct_window), args.zscore_nonzero)[0]


def pad_to(
    array: np.ndarray, shape: Sequence[int], label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad at the end of every axis up to ``shape`` by repeating the last slice (larger axes stay).

    Args:
        array: ``(*S)`` image.
        shape: Minimum size per axis.
        label: Optional ``(*S)`` labels, padded the same way.

    Returns:
        The padded image and labels.
    """
    widths = [(0, max(0, t - s)) for s, t in zip(array.shape, shape, strict=True)]
    padded = np.pad(array, widths, mode="edge")
    return padded, None if label is None else np.pad(label, widths, mode="edge")


def choose_patch(
    shapes: Sequence[tuple[int, ...]], multiple: int, given: Sequence[int] | None
) -> tuple[int, ...]:
    """The training patch size.

    Args:
        shapes: Spatial shapes of the training images.
        multiple: ``2**depth``.
        given: ``--patch`` (one value for every axis, or one per axis), or None for the largest
            multiple of ``multiple`` that fits every training image (at least ``multiple``).

    Returns:
        The patch shape.

    Raises:
        NcaError: Wrong number of values, or values not positive multiples of ``multiple``.
    """
    dim = len(shapes[0])
    if given is None:
        smallest = np.min(np.asarray(shapes), axis=0)
        return tuple(max(multiple, int(s) // multiple * multiple) for s in smallest)
    if len(given) == 1:
        given = list(given) * dim
    if len(given) != dim:
        raise NcaError(f"--patch needs 1 or {dim} values for {dim}D images, got {len(given)}")
    if any(p <= 0 or p % multiple for p in given):
        raise NcaError(
            f"--patch values must be positive multiples of 2**depth = {multiple}, got {list(given)}"
        )
    return tuple(given)


def sample_batch(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    patch: tuple[int, ...],
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops with random flips, in-plane rot90 (square planes) and brightness/contrast jitter.

    Args:
        rng: The generator.
        images: Normalised images, each ``(*S)``.
        labels: Their labels, ``(*S)`` integers.
        patch: Crop shape ``P`` (images smaller than it are edge-padded).
        batch: Number of crops ``N``.

    Returns:
        ``x`` ``(N, 1, *P)`` float32 and ``y`` ``(N, *P)`` int64.
    """
    xs, ys = [], []
    for _ in range(batch):
        i = int(rng.integers(len(images)))
        image, label = pad_to(images[i], patch, labels[i])
        assert label is not None
        start = [int(rng.integers(s - p + 1)) for s, p in zip(image.shape, patch, strict=True)]
        window = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
        image, label = image[window], label[window]
        for axis in range(image.ndim):
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
        if patch[-1] == patch[-2]:
            turns = int(rng.integers(4))
            image, label = np.rot90(image, turns, axes=(-2, -1)), np.rot90(label, turns, axes=(-2, -1))
        image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        xs.append(np.ascontiguousarray(image, dtype=np.float32))
        ys.append(np.ascontiguousarray(label))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys).astype(np.int64))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus ``1 -`` the mean soft Dice of the foreground classes (pooled over the batch).

    Args:
        logits: ``(N, C, *P)``.
        target: ``(N, *P)`` int64 in ``0 .. C - 1``.

    Returns:
        The scalar loss.
    """
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    axes = [0, *range(2, logits.ndim)]
    intersection = (probs * onehot).sum(axes)
    dice = (2 * intersection + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
    return F.cross_entropy(logits, target) + 1 - dice[1:].mean()


@dataclass
class TrainResult:
    """What :func:`train_unet` did."""

    iterations: int
    seconds: float
    final_loss: float
    batch: int
    patch: tuple[int, ...]


def train_unet(
    model: UNet,
    dataset: Dataset,
    args: argparse.Namespace,
    dim: int,
    start: float,
    log: Callable[[str], None],
) -> TrainResult:
    """Train until ``args.seconds`` have passed since ``start`` (checked before every iteration).

    Adam with a polynomial learning-rate decay over the time budget (``lr * (1 - t/T)**0.9``), the
    loss of :func:`segmentation_loss`; at least one iteration is done.

    Args:
        model: The network.
        dataset: Its training cases are used.
        args: ``seconds``, ``lr``, ``batch``, ``patch``, ``depth``.
        dim: Network dimensionality.
        start: ``time.perf_counter()`` at the start of the budget (before the data was read).
        log: Progress printer.

    Returns:
        The :class:`TrainResult`; ``final_loss`` is the mean over the last 10% of iterations.
    """
    rng = np.random.default_rng(args.seed)
    images = [normalize_image(c.array, args) for c in dataset.train]
    labels = [c.label for c in dataset.train if c.label is not None]
    patch = choose_patch([a.shape for a in images], 2**args.depth, args.patch)
    batch = args.batch or max(1, min(MAX_AUTO_BATCH, round(VOXELS_PER_BATCH / math.prod(patch))))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses: list[float] = []
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds and losses:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(0.0, 1.0 - elapsed / args.seconds) ** 0.9
        x, y = sample_batch(rng, images, labels, patch, batch)
        loss = segmentation_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) % 100 == 0:
            log(f"  iteration {len(losses)}: loss {np.mean(losses[-100:]):.4f} at {elapsed:.0f} s")
    tail = losses[-max(1, len(losses) // 10) :]
    return TrainResult(
        iterations=len(losses),
        seconds=time.perf_counter() - start,
        final_loss=float(np.mean(tail)),
        batch=batch,
        patch=patch,
    )


@torch.inference_mode()
def predict_unet(model: UNet, case: Case, dim: int, args: argparse.Namespace) -> np.ndarray:
    """Labels of a whole test image.

    Args:
        model: The trained network.
        case: The test case; its image is normalised, edge-padded at the end to a multiple of
            ``2**depth``, segmented in one pass and cropped back.
        dim: Network dimensionality.
        args: ``depth`` and the normalisation options.

    Returns:
        ``int64`` labels of the shape of ``case.array``.
    """
    model.eval()
    image = normalize_image(case.array, args)
    multiple = 2**args.depth
    padded, _ = pad_to(image, [-(-s // multiple) * multiple for s in image.shape])
    logits = model(torch.from_numpy(np.ascontiguousarray(padded))[None, None])
    labels = logits[0].argmax(dim=0).numpy()[tuple(slice(0, s) for s in image.shape)]
    return labels


def run_unet(args: argparse.Namespace) -> int:
    """The ``unet`` subcommand: train for ``--seconds``, predict imagesTs, write unet.json."""
    start = time.perf_counter()
    _check_unet_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    prepare_output(args.output, dataset)
    dim = dataset.dim
    model = UNet(dim, 1, dataset.num_classes, base=args.base, depth=args.depth)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"unet: {dim}D, base {args.base}, depth {args.depth}, {params:,} parameters, {args.seconds:g} s budget"
    )
    result = train_unet(model, dataset, args, dim, start, print)
    for case in dataset.test:
        write_prediction(case, predict_unet(model, case, dim, args), args.output)
    summary = {
        "params": params,
        "seconds": round(result.seconds, 3),
        "iterations": result.iterations,
        "seed": args.seed,
        "final_loss": result.final_loss,
        "dim": dim,
        "base": args.base,
        "depth": args.depth,
        "batch": result.batch,
        "patch": list(result.patch),
        "lr": args.lr,
        "threads": args.threads,
        "normalization": args.normalization,
        "zscore_nonzero": args.zscore_nonzero,
        "budget_seconds": args.seconds,
        "train_cases": len(dataset.train),
    }
    write_json(summary, args.output / "unet.json")
    print(
        f"unet: {result.iterations} iterations (batch {result.batch}, patch "
        f"{'x'.join(map(str, result.patch))}) in {result.seconds:.1f} s, final loss {result.final_loss:.4f}; "
        f"wrote {len(dataset.test)} predictions to {args.output}"
    )
    return 0


def _check_unet_args(args: argparse.Namespace) -> None:
    if not args.seconds > 0:
        raise NcaError(f"--seconds must be positive, got {args.seconds}")
    if args.base < 1 or args.threads < 1 or (args.batch is not None and args.batch < 1):
        raise NcaError("--base, --threads and --batch must be at least 1")
    if not args.lr > 0:
        raise NcaError(f"--lr must be positive, got {args.lr}")


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``threshold`` and ``unet`` subcommands."""
    parser = argparse.ArgumentParser(
        description="Baselines for the segmentation quality benchmark (predictions for imagesTs)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    thr = sub.add_parser("threshold", help="global intensity thresholds fitted on imagesTr")
    thr.add_argument("--data", type=Path, required=True, help="nnU-Net v2 raw dataset folder")
    thr.add_argument("--output", type=Path, required=True, help="folder for CASE.nii.gz predictions")
    thr.add_argument(
        "--method", choices=("otsu", "best"), required=True, help="Otsu / best training Dice thresholds"
    )
    thr.set_defaults(func=run_threshold)

    unet = sub.add_parser("unet", help="a small U-Net trained for a fixed wall-clock time")
    unet.add_argument("--data", type=Path, required=True, help="nnU-Net v2 raw dataset folder")
    unet.add_argument("--output", type=Path, required=True, help="folder for CASE.nii.gz predictions")
    unet.add_argument("--seconds", type=float, required=True, help="budget incl. reading the data")
    unet.add_argument("--seed", type=int, required=True)
    unet.add_argument("--base", type=int, default=8, help="channels of the first level (default 8)")
    unet.add_argument("--depth", type=int, choices=(1, 2, 3, 4), default=2, help="downsamplings (default 2)")
    unet.add_argument("--batch", type=int, default=None, help=f"default: about {VOXELS_PER_BATCH} voxels")
    unet.add_argument(
        "--patch",
        type=int,
        nargs="+",
        default=None,
        help="crop size (default: largest that fits every image)",
    )
    unet.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    unet.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    unet.add_argument(
        "--normalization", choices=NORMALIZATIONS, default="zscore", help="as ncatool train (default zscore)"
    )
    unet.add_argument("--zscore-nonzero", action="store_true", help="z-score statistics over nonzero voxels")
    unet.add_argument("--ct-window", type=float, nargs=2, default=(-1000.0, 400.0), metavar=("LO", "HI"))
    unet.set_defaults(func=run_unet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; user errors print one line to stderr and return exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NcaError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
