"""Segmentation metrics, MONAI style: plain functions on arrays plus a small aggregator.

Per case and per label (a binary mask ``label == k`` for prediction and reference):

============== ====================================================== ==============================
key            definition                                             undefined (NaN) when
============== ====================================================== ==============================
Dice           2 TP / (2 TP + FP + FN)                                reference and prediction empty
IoU            TP / (TP + FP + FN)                                    reference and prediction empty
accuracy       (TP + TN) / all voxels                                 never
precision      TP / (TP + FP)                                         prediction empty
recall         TP / (TP + FN)                                         reference empty
HD95           95 % Hausdorff distance between the surfaces, in mm    either mask empty
volume_pred    prediction volume in mm³ (mm² for 2D)                  never
volume_ref     reference volume in mm³ (mm² for 2D)                   never
volume_diff    volume_pred - volume_ref                               never
TP FP FN TN    confusion counts; n_pred = TP + FP, n_ref = TP + FN    never
============== ====================================================== ==============================

Empty reference and empty prediction give Dice NaN (nnU-Net and MONAI do the same): there is
nothing to segment, so the case says nothing about overlap. NaN values are left out of the means
(:class:`MetricAggregator` counts them so reports can say how many). A non-empty prediction against
an empty reference gives Dice 0.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: surface voxels are the mask
minus its erosion (face connectivity, the image border counts as outside); for each surface voxel
of one mask the Euclidean distance (``scipy.ndimage.distance_transform_edt`` with the voxel spacing)
to the nearest surface voxel of the other; the 95th percentile of each direction; the larger of
the two. Spacing is given in array order (``(z, y, x)`` for a SimpleITK ``(Z, Y, X)`` array).
Axes of length 1 (a 2D image stored as a one-slice volume) are dropped first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Metric keys in report order; the first eight are nnU-Net's names.
METRIC_KEYS: tuple[str, ...] = (
    "Dice",
    "IoU",
    "FP",
    "TP",
    "FN",
    "TN",
    "n_pred",
    "n_ref",
    "accuracy",
    "precision",
    "recall",
    "HD95",
    "volume_pred",
    "volume_ref",
    "volume_diff",
)
#: Keys that are counts (integers).
COUNT_KEYS: tuple[str, ...] = ("FP", "TP", "FN", "TN", "n_pred", "n_ref")


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim:
        raise ValueError(f"spacing {out} has {len(out)} values for a {ndim}D mask")
    if any(not math.isfinite(s) or s <= 0 for s in out):
        raise ValueError(f"spacing must be positive, got {out}")
    return out


def _drop_singleton_axes(
    masks: Sequence[np.ndarray], spacing: tuple[float, ...]
) -> tuple[list[np.ndarray], tuple[float, ...]]:
    keep = [i for i, n in enumerate(masks[0].shape) if n != 1]
    if len(keep) == masks[0].ndim:
        return list(masks), spacing
    if not keep:  # a single voxel
        keep = [0]
    shape = tuple(masks[0].shape[i] for i in keep)
    return [m.reshape(shape) for m in masks], tuple(spacing[i] for i in keep)


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """Confusion counts of two binary masks of the same shape.

    Args:
        pred: Predicted mask (anything cast to bool).
        ref: Reference mask, same shape.

    Returns:
        ``(TP, FP, FN, TN)``.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    tn = int(pred.size) - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks; NaN when both are empty."""
    tp, fp, fn, _ = confusion(pred, ref)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks; NaN when both are empty."""
    tp, fp, fn, _ = confusion(pred, ref)
    return _ratio(tp, tp + fp + fn)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its face-connected erosion (the border counts as outside)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Both masks must be non-empty. Work is confined to the bounding box of both masks (plus one voxel
    where the image allows), which gives the same distances as the whole image.

    Args:
        pred: Predicted binary mask.
        ref: Reference binary mask, same shape.
        spacing: Voxel size per array axis (default 1).

    Returns:
        ``(pred → ref distances, ref → pred distances)``, 1D float64 arrays.
    """
    from scipy import ndimage

    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing(spacing, pred.ndim)
    (pred, ref), sp = _drop_singleton_axes([pred, ref], sp)
    coords = np.argwhere(pred | ref)
    lo = np.maximum(coords.min(axis=0) - 1, 0)
    hi = np.minimum(coords.max(axis=0) + 2, pred.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    # The box keeps one background voxel around both masks, except where a mask touches the image
    # border; there the box border is the image border, so the erosion sees the same neighbourhood.
    s_pred, s_ref = surface(pred[box]), surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~s_ref, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    return np.asarray(to_ref[s_pred], dtype=np.float64), np.asarray(to_pred[s_ref], dtype=np.float64)


def hausdorff_distance(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None, percentile: float = 95.0
) -> float:
    """Percentile Hausdorff distance between the surfaces of two binary masks, in spacing units.

    Args:
        pred: Predicted binary mask.
        ref: Reference binary mask, same shape.
        spacing: Voxel size per array axis, e.g. mm (default 1).
        percentile: 95 for HD95, 100 for the classic Hausdorff distance.

    Returns:
        ``max(percentile of pred → ref, percentile of ref → pred)``; NaN if either mask is empty.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        if pred.shape != ref.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
        return float("nan")
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def binary_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None, hd95: bool = True
) -> dict[str, float]:
    """Every metric of :data:`METRIC_KEYS` for one binary prediction against its reference.

    Args:
        pred: Predicted binary mask.
        ref: Reference binary mask, same shape.
        spacing: Voxel size per array axis in mm (default 1).
        hd95: Compute HD95 (the only costly metric); NaN otherwise.

    Returns:
        ``{key: value}``; counts as ints, the rest as floats (NaN where undefined).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    sp = _spacing(spacing, pred.ndim)
    tp, fp, fn, tn = confusion(pred, ref)
    voxel = float(np.prod(sp))
    n_pred, n_ref = tp + fp, tp + fn
    return {
        "Dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "IoU": _ratio(tp, tp + fp + fn),
        "FP": fp,
        "TP": tp,
        "FN": fn,
        "TN": tn,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_ref),
        "HD95": hausdorff_distance(pred, ref, sp) if hd95 else float("nan"),
        "volume_pred": n_pred * voxel,
        "volume_ref": n_ref * voxel,
        "volume_diff": (n_pred - n_ref) * voxel,
    }


def empty_label_metrics(num_voxels: int) -> dict[str, float]:
    """Metrics of a label absent from both prediction and reference (what :func:`binary_metrics`
    returns for two empty masks of ``num_voxels`` voxels, without touching the arrays)."""
    nan = float("nan")
    return {
        "Dice": nan,
        "IoU": nan,
        "FP": 0,
        "TP": 0,
        "FN": 0,
        "TN": int(num_voxels),
        "n_pred": 0,
        "n_ref": 0,
        "accuracy": 1.0 if num_voxels else nan,
        "precision": nan,
        "recall": nan,
        "HD95": nan,
        "volume_pred": 0.0,
        "volume_ref": 0.0,
        "volume_diff": 0.0,
    }


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Iterable[int],
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[int, dict[str, float]]:
    """Per-label metrics of two integer label maps.

    Args:
        pred: Predicted label map.
        ref: Reference label map, same shape.
        labels: Label values to evaluate (each as the binary mask ``map == value``).
        spacing: Voxel size per array axis in mm.
        hd95: Compute HD95.

    Returns:
        ``{label: {metric: value}}``.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out: dict[int, dict[str, float]] = {}
    for value in labels:
        p, r = pred == value, ref == value
        if not p.any() and not r.any():
            out[int(value)] = empty_label_metrics(pred.size)
        else:
            out[int(value)] = binary_metrics(p, r, spacing, hd95=hd95)
    return out


def nanmean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class MetricAggregator:
    """Collects per-case, per-label metrics and reduces them (NaN left out of means).

    Example:
        >>> agg = MetricAggregator()
        >>> agg.add("case_1", {1: {"Dice": 0.8}})
        >>> agg.mean()[1]["Dice"]
        0.8
    """

    cases: list[str] = field(default_factory=list)
    values: list[dict[int, dict[str, float]]] = field(default_factory=list)

    def add(self, case: str, per_label: dict[int, dict[str, float]]) -> None:
        """Record the metrics of one case."""
        self.cases.append(case)
        self.values.append(per_label)

    @property
    def labels(self) -> list[int]:
        """Every label seen, sorted."""
        return sorted({k for v in self.values for k in v})

    def _column(self, label: int, key: str) -> list[float]:
        return [float(v[label][key]) for v in self.values if label in v and key in v[label]]

    def mean(self) -> dict[int, dict[str, float]]:
        """``{label: {metric: mean over cases}}``; NaN values are left out."""
        keys = self.keys()
        return {lab: {k: nanmean(self._column(lab, k)) for k in keys} for lab in self.labels}

    def nan_counts(self) -> dict[int, dict[str, int]]:
        """``{label: {metric: number of cases where it was NaN}}`` (only metrics with any)."""
        out: dict[int, dict[str, int]] = {}
        for lab in self.labels:
            counts = {k: sum(math.isnan(v) for v in self._column(lab, k)) for k in self.keys()}
            out[lab] = {k: n for k, n in counts.items() if n}
        return out

    def keys(self) -> list[str]:
        """Metric keys, in :data:`METRIC_KEYS` order first."""
        seen = {k for v in self.values for m in v.values() for k in m}
        return [k for k in METRIC_KEYS if k in seen] + sorted(seen - set(METRIC_KEYS))

    def foreground_mean(self) -> dict[str, float]:
        """Mean over labels of the per-label means (nnU-Net's ``foreground_mean``), NaN left out."""
        means = self.mean()
        return {k: nanmean(m[k] for m in means.values()) for k in self.keys()}


__all__ = [
    "COUNT_KEYS",
    "METRIC_KEYS",
    "MetricAggregator",
    "binary_metrics",
    "confusion",
    "dice",
    "empty_label_metrics",
    "hausdorff_distance",
    "iou",
    "label_metrics",
    "nanmean",
    "surface",
    "surface_distances",
]
