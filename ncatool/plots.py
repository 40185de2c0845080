"""Pictures of model output (matplotlib, Agg backend; imported only where a picture is made)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncatool.data.io import atomic_path


def display_image(image: torch.Tensor) -> np.ndarray:
    """A 2D picture of an image tensor for display.

    Args:
        image: ``(C, H, W)``; 3 channels are shown as RGB, otherwise the first channel.

    Returns:
        ``(H, W)`` or ``(H, W, 3)`` float array scaled to [0, 1].
    """
    arr = image.detach().float().cpu().numpy()
    arr = np.moveaxis(arr[:3], 0, -1) if arr.shape[0] == 3 else arr[0]
    lo, hi = np.percentile(arr, [1, 99])
    return np.clip((arr - lo) / (hi - lo + 1e-8), 0.0, 1.0)


def best_slice(label: torch.Tensor) -> int:
    """Index along axis 0 of a ``(D, H, W)`` label with the most foreground (the middle if empty)."""
    counts = (label > 0).flatten(1).sum(1)
    return int(counts.argmax()) if counts.max() > 0 else label.shape[0] // 2


def to_2d(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reduce a 3D triple (``(C, D, H, W)``, ``(D, H, W)``, ``(D, H, W)``) to its most telling slice."""
    if label.dim() == 2:
        return image, label, pred
    z = best_slice(label)
    return image[:, z], label[z], pred[z]


def save_segmentation_panel(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, n_labels: int
) -> None:
    """Write image | ground truth | prediction, one row per case, as a PNG (atomically).

    Args:
        rows: ``(image (C, *S), label (*S), prediction (*S))`` per case, 2D or 3D.
        path: Destination PNG.
        n_labels: Number of foreground labels (fixes the colour scale).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        image, label, pred = to_2d(*row)
        panels = [
            (display_image(image), "image", None),
            (label.numpy(), "ground truth", n_labels),
            (pred.numpy(), "prediction", n_labels),
        ]
        for c, (arr, title, vmax) in enumerate(panels):
            ax = axes[r][c]
            if vmax is None:
                ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            else:
                ax.imshow(arr, cmap="viridis", vmin=0, vmax=max(vmax, 1), interpolation="nearest")
            ax.set_title(title if r == 0 else "", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
