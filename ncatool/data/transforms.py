"""Array transforms for NCA training items: resizing, patches, flips, rotations, one-hot targets,
intensity bins.

Pure functions on torch tensors (randomness comes in as a NumPy generator), used by the torch
datasets (:mod:`ncatool.data.datasets`), by the tasks and by inference. Layouts: an image is
``(C, *spatial)``, a label ``(*spatial)`` with integer values; spatial axes are in array order
(``(D, H, W)`` or ``(H, W)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: At most this many foreground coordinates per class are kept for foreground-biased patches.
MAX_FOREGROUND_COORDS = 10_000

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


def intensity_bins(image: torch.Tensor, count: int, low: float, high: float) -> torch.Tensor:
    """The image followed by ``count`` soft intensity bins of each of its channels.

    Bin ``j`` of a channel is the hat function ``max(0, 1 - |x - c_j| / h)`` around the centre
    ``c_j = low + j * h``, ``h = (high - low) / (count - 1)``, with ``x`` clamped to ``[low, high]``:
    every voxel's bins sum to 1 (at most two are non-zero) and a linear read-out of them is any
    piecewise-linear function of the intensity with knots at the centres. A per-cell MLP that sees
    them can place a sharp intensity threshold anywhere with one weight per bin, which it learns
    slowly from the raw intensity alone (tissue classes on MRI are mostly intensity bands).

    Args:
        image: ``(B, C, *spatial)`` normalised image.
        count: Bins per channel (>= 2).
        low: Centre of the first bin (intensities below count as ``low``).
        high: Centre of the last bin (intensities above count as ``high``).

    Returns:
        ``(B, C * (1 + count), *spatial)`` in ``image``'s dtype: the ``C`` image channels, then
        ``count`` bins of channel 0, ``count`` bins of channel 1, ...
    """
    if count < 2:
        raise ValueError(f"count must be >= 2, got {count}")
    if not low < high:
        raise ValueError(f"need low < high, got {low}, {high}")
    batch, channels, spatial = image.shape[0], image.shape[1], image.shape[2:]
    step = (high - low) / (count - 1)
    position = (image.clamp(low, high) - low) / step  # (B, C, *S), in units of bins
    centres = torch.arange(count, device=image.device, dtype=image.dtype).view(
        1, 1, count, *([1] * len(spatial))
    )
    bins = (1.0 - (position.unsqueeze(2) - centres).abs()).clamp_(min=0.0)  # (B, C, K, *S)
    return torch.cat([image, bins.reshape(batch, channels * count, *spatial)], dim=1)
