"""Evaluate segmentations against ground truth: per case and label, nnU-Net-style summary.

Two entry points:

* :func:`evaluate_folders` — predictions from anywhere (``ncatool predict``, nnU-Net, ...) against a
  folder of reference masks (or an nnU-Net dataset folder: its ``labelsTr``/``labelsTs``). Files are
  matched by case name (the file name without its extension, and without the ISIC challenge's
  ``_segmentation`` suffix, so ``CASE_segmentation.png`` pairs with ``CASE.nii.gz`` or another
  ``CASE_segmentation.png``); every prediction needs a reference of the same shape. ``CASE_std``
  uncertainty maps next to ``CASE`` are skipped; reference cases without a prediction are reported,
  not evaluated.
* :func:`evaluate_checkpoint` — the checkpoint's task scores its model (segmentation: predict the
  cases of a dataset split, ``val`` = the held-out cases stored in the checkpoint, then evaluate them
  here; generation: the task's own validation).

Outputs (see :mod:`ncatool.metrics` for the metrics):

* ``summary.json`` in nnU-Net's layout: ``metric_per_case`` (list of ``{"metrics": {"1": {...}},
  "prediction_file", "reference_file"}``), ``mean`` (``{"1": {...}}``, NaN left out),
  ``foreground_mean`` (mean of the label means), plus ``nan_excluded`` (how many cases were left out
  per label and metric) and ``notes``. Undefined values (NaN) are written as ``null`` so the file is
  strict JSON.
* ``metrics.csv``: one row per case and label.
* a table on stderr.

HD95 is in millimetres (the reference's spacing); volumes in mm³ (mm² for 2D images).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ncatool.console import warn
from ncatool.data.io import (
    PLANAR_EXTENSIONS,
    Image,
    is_image_file,
    read_image,
    split_extension,
    write_text_atomic,
)
from ncatool.data.nnunet.pairs import ISIC_LABEL_SUFFIX
from ncatool.errors import NcaError
from ncatool.metrics import COUNT_KEYS, MetricAggregator, empty_label_metrics, label_metrics

#: Splits of ``ncatool eval --checkpoint``.
EVAL_SPLITS: tuple[str, ...] = ("val", "train", "test", "all")
#: Metrics shown in the terminal table.
TABLE_KEYS: tuple[str, ...] = ("Dice", "IoU", "precision", "recall", "HD95", "volume_diff")
#: Relative spacing difference between prediction and reference that triggers a warning.
SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class EvalPair:
    """A prediction file and its reference."""

    case: str
    prediction: Path
    reference: Path


# --------------------------------------------------------------------------------------------------
# Matching files
# --------------------------------------------------------------------------------------------------


def case_of_mask(stem: str) -> str:
    """The case a mask file stem names: ``ISIC_0000000_segmentation`` (the ISIC challenge's mask
    name) → ``ISIC_0000000``; any other stem is its case."""
    return stem[: -len(ISIC_LABEL_SUFFIX)] if stem.endswith(ISIC_LABEL_SUFFIX) else stem


def _masks_by_case(folder: Path, what: str) -> dict[str, Path]:
    if not folder.exists():
        raise NcaError(f"{what} folder does not exist", folder)
    if not folder.is_dir():
        raise NcaError(f"{what} must be a folder", folder)
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not is_image_file(path):
            continue
        case = case_of_mask(split_extension(path)[0])
        if case in out:
            raise NcaError(f"two {what} files for case {case!r}: {out[case].name} and {path.name}", path)
        out[case] = path
    return out


def _reference_files(gt: Path) -> tuple[dict[str, Path], dict[int, str]]:
    """Reference masks by case, and label names when ``gt`` is (a labels folder of) an nnU-Net dataset."""
    if (gt / "dataset.json").is_file():
        dataset_dir: Path | None = gt
        refs: dict[str, Path] = {}
        for sub in ("labelsTr", "labelsTs"):
            if (gt / sub).is_dir():
                refs.update(_masks_by_case(gt / sub, "ground-truth"))
    else:
        in_dataset = gt.name in ("labelsTr", "labelsTs") and (gt.parent / "dataset.json").is_file()
        dataset_dir = gt.parent if in_dataset else None
        refs = _masks_by_case(gt, "ground-truth")
    if dataset_dir is None:
        return refs, {}
    from ncatool.data.loading import NnUNetDataset

    return refs, {v: k for k, v in NnUNetDataset(dataset_dir).foreground_labels.items()}


def match_folders(pred: str | Path, gt: str | Path) -> tuple[list[EvalPair], list[str], dict[int, str]]:
    """Pair prediction files with reference files by case name.

    Args:
        pred: Folder of predicted label maps.
        gt: Folder of reference label maps, or an nnU-Net dataset folder (``labelsTr``/``labelsTs``).

    Returns:
        ``(pairs sorted by case, reference cases without a prediction, label names if known)``.

    Raises:
        NcaError: A folder is missing, holds no predictions, or a prediction has no reference.
    """
    pred, gt = Path(pred), Path(gt)
    preds = _masks_by_case(pred, "prediction")
    # uncertainty maps written by `ncatool predict --ensemble` sit next to their masks
    preds = {
        c: p
        for c, p in preds.items()
        if not (c.endswith("_std") and case_of_mask(c[: -len("_std")]) in preds)
    }
    if not preds:
        raise NcaError("no prediction files (.nii.gz, .nrrd, .mha, .png, ...) in folder", pred)
    refs, names = _reference_files(gt)
    pairs = []
    for case, path in sorted(preds.items()):
        if case not in refs:
            ext = split_extension(path)[1]
            raise NcaError(f"prediction {path} has no ground-truth partner (expected {gt / (case + ext)})")
        pairs.append(EvalPair(case, path, refs[case]))
    unmatched = sorted(set(refs) - set(preds))
    return pairs, unmatched, names


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------


def _label_map(image: Image, path: Path) -> np.ndarray:
    array = image.array
    if image.is_vector:
        colour = array[..., : min(3, array.shape[-1])]
        if not np.all(colour == colour[..., :1]):
            raise NcaError(f"is a colour image with {image.components} components, not a label map", path)
        array = array[..., 0]
    if array.dtype.kind == "f" and (
        not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))
    ):
        raise NcaError("holds non-integer values; expected a label map (0 = background)", path)
    if array.size and array.min() < 0:
        raise NcaError(f"holds negative value {array.min()}; expected a label map", path)
    array = array.astype(np.int64, copy=False)
    if split_extension(path)[1] in PLANAR_EXTENSIONS and array.size:
        values = np.unique(array)
        if 255 in values and set(values.tolist()) <= {0, 255}:
            array = (array == 255).astype(np.int64)  # 0/255 PNG masks are binary
    return array


def _squeeze(array: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Drop a singleton z axis (a 2D image stored as a one-slice volume); spacing in array order."""
    sp = tuple(reversed(spacing))
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0], sp[1:]
    return array, sp


def evaluate_pair(
    pair: EvalPair, labels: Sequence[int] | None = None, hd95: bool = True
) -> tuple[dict[int, dict[str, float]], int]:
    """Metrics of one prediction against its reference.

    Args:
        pair: The two files.
        labels: Label values to evaluate; None = every nonzero value in either file.
        hd95: Compute HD95.

    Returns:
        ``({label: metrics}, number of voxels)``.

    Raises:
        NcaError: A file is unreadable or not a label map, or the shapes differ (naming both files).
    """
    pred_img, ref_img = read_image(pair.prediction), read_image(pair.reference)
    pred, pred_sp = _squeeze(_label_map(pred_img, pair.prediction), pred_img.spacing)
    ref, spacing = _squeeze(_label_map(ref_img, pair.reference), ref_img.spacing)
    if pred.shape != ref.shape:
        raise NcaError(
            f"shape mismatch for case {pair.case!r}: prediction {pair.prediction} has shape "
            f"{tuple(pred.shape)}, ground truth {pair.reference} has shape {tuple(ref.shape)}"
        )
    if len(pred_sp) == len(spacing) and not np.allclose(pred_sp, spacing, rtol=SPACING_RTOL, atol=0):
        warn(
            f"{pair.prediction}: spacing {tuple(reversed(pred_sp))} differs from the ground truth's "
            f"{tuple(reversed(spacing))}; using the ground truth's"
        )
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    return label_metrics(pred, ref, labels, spacing, hd95=hd95), int(ref.size)


# --------------------------------------------------------------------------------------------------
# Many cases
# --------------------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


def parse_context_sizes(text: str | None) -> tuple[int, ...] | None:
    """Parse ``--context-size 1,2,4,8`` into positive integers (None when not given).

    Raises:
        NcaError: Not a comma list of positive integers.
    """
    if text is None or not text.strip():
        return None
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as err:
        raise NcaError(f"--context-size must be positive integers such as 1,2,4,8; got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise NcaError(f"--context-size must be positive integers such as 1,2,4,8; got {text!r}")
    return values


def parse_labels(text: str | None) -> list[int] | None:
    """Parse ``--labels 1,2`` into positive integers (None when not given).

    Raises:
        NcaError: Not a comma list of positive integers.
    """
    if text is None or not text.strip():
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise NcaError(f"--labels must be positive integers such as 1,2; got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise NcaError(f"--labels must be positive integers such as 1,2 (0 is background); got {text!r}")
    return sorted(set(values))


def evaluate_pairs(
    pairs: Sequence[EvalPair],
    labels: Sequence[int] | None = None,
    label_names: dict[int, str] | None = None,
    case_extra: dict[str, dict[str, Any]] | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """Evaluate prediction/reference pairs into an nnU-Net-style summary.

    Args:
        pairs: The files to compare.
        labels: Labels to evaluate; None = every nonzero label found in any file.
        label_names: Optional names for the table and summary.
        case_extra: Extra values per case for ``metric_per_case`` (e.g. the quality score).
        hd95: Compute HD95.

    Returns:
        The summary (NaN kept as float NaN; :func:`summary_to_json` makes it strict JSON).
    """
    if not pairs:
        raise NcaError("nothing to evaluate: no prediction/ground-truth pairs")
    results: list[tuple[EvalPair, dict[int, dict[str, float]], int]] = []
    for pair in pairs:
        per_label, voxels = evaluate_pair(pair, labels, hd95=hd95)
        results.append((pair, per_label, voxels))
    wanted = list(labels) if labels is not None else sorted({k for _, m, _ in results for k in m})
    agg = MetricAggregator()
    per_case = []
    for pair, per_label, voxels in results:
        # a label absent from both files of a case: empty vs empty (Dice NaN), computed without arrays
        full = {k: per_label.get(k) or empty_label_metrics(voxels) for k in wanted}
        agg.add(pair.case, full)
        entry: dict[str, Any] = {
            "case": pair.case,
            "metrics": {str(k): v for k, v in full.items()},
            "prediction_file": str(pair.prediction),
            "reference_file": str(pair.reference),
        }
        entry.update((case_extra or {}).get(pair.case, {}))
        per_case.append(entry)
    means = agg.mean() if wanted else {}
    nan_counts = agg.nan_counts() if wanted else {}
    notes = []
    for k in wanted:
        n_both_empty = sum(1 for _, m, _ in results if k not in m or math.isnan(m[k]["Dice"]))
        if n_both_empty:
            notes.append(
                f"label {k}: Dice undefined (reference and prediction empty) in {n_both_empty} of "
                f"{len(results)} case(s); left out of the mean"
            )
        n_hd = nan_counts.get(k, {}).get("HD95", 0) - n_both_empty
        if hd95 and n_hd > 0:
            notes.append(
                f"label {k}: HD95 undefined (one mask empty) in {n_hd} case(s); left out of the mean"
            )
    if not wanted:
        notes.append("no foreground label in any prediction or reference")
    return {
        "metric_per_case": per_case,
        "mean": {str(k): v for k, v in means.items()},
        "foreground_mean": agg.foreground_mean() if wanted else {},
        "labels": {str(k): (label_names or {}).get(k, str(k)) for k in wanted},
        "num_cases": len(results),
        "nan_excluded": {str(k): v for k, v in nan_counts.items()},
        "notes": notes,
        "units": {"HD95": "mm", "volume": "mm^3 (mm^2 for 2D images)"},
    }


def summary_to_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with NaN/inf as ``null`` (strict JSON)."""
    return _json_value(summary)


def metrics_csv(summary: dict[str, Any]) -> str:
    """``metrics.csv`` text: one row per case and label (NaN written as ``NaN``)."""
    keys: list[str] = []
    for entry in summary["metric_per_case"]:
        for metrics in entry["metrics"].values():
            keys += [k for k in metrics if k not in keys]
    extra = [k for k in ("quality",) if any(k in e for e in summary["metric_per_case"])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "label", "label_name", *keys, *extra])
    names = summary.get("labels", {})
    for entry in summary["metric_per_case"]:
        for label, metrics in entry["metrics"].items():
            row = [entry["case"], label, names.get(label, label)]
            row += [_csv_value(metrics.get(k), k) for k in keys]
            row += [_csv_value(entry.get(k), k) for k in extra]
            writer.writerow(row)
    return buf.getvalue()


def _csv_value(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if key in COUNT_KEYS:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_outputs(summary: dict[str, Any], output: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``metrics.csv`` into ``output`` (atomically)."""
    import json

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    js = write_text_atomic(json.dumps(summary_to_json(summary), indent=2) + "\n", output / "summary.json")
    cs = write_text_atomic(metrics_csv(summary), output / "metrics.csv")
    return js, cs


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def print_summary(summary: dict[str, Any], per_case: bool = False) -> None:
    """A rich table of the per-label means (and with ``per_case`` every case) on stderr."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from ncatool.console import err, state

    if state.quiet:
        return
    headers = {"precision": "prec", "volume_diff": "ΔVol"}
    if per_case:
        table = Table(title="per case", title_justify="left", box=box.SIMPLE)
        for col in ("case", "label", *TABLE_KEYS):
            table.add_column(headers.get(col, col), justify="left" if col in ("case", "label") else "right")
        for entry in summary["metric_per_case"]:
            for label, metrics in entry["metrics"].items():
                table.add_row(escape(entry["case"]), label, *(_fmt(metrics.get(k)) for k in TABLE_KEYS))
        err.print(table)
    n = summary["num_cases"]
    table = Table(
        title=f"mean over {n} case(s); undefined values left out, n = cases with a defined Dice",
        title_justify="left",
        box=box.SIMPLE,
    )
    for col in ("label", *TABLE_KEYS, "n"):
        table.add_column(headers.get(col, col), justify="left" if col == "label" else "right")
    for label, metrics in summary["mean"].items():
        used = n - summary["nan_excluded"].get(label, {}).get("Dice", 0)
        name = summary["labels"].get(label, label)
        title = label if name == label else f"{label} {name}"
        table.add_row(escape(title), *(_fmt(metrics.get(k)) for k in TABLE_KEYS), f"{used}/{n}")
    if summary["mean"]:
        fg = summary["foreground_mean"]
        table.add_row("foreground", *(_fmt(fg.get(k)) for k in TABLE_KEYS), "", style="bold")
    err.print(table)
    for note in summary["notes"]:
        err.print(f"note: {escape(note)}")
    err.print("HD95 in mm, ΔVol = predicted - reference volume in mm³ (mm² for 2D)")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def evaluate_folders(
    pred: str | Path, gt: str | Path, labels: Sequence[int] | None = None, output: str | Path | None = None
) -> dict[str, Any]:
    """``ncatool eval --pred DIR --gt DIR``.

    Args:
        pred: Predictions folder.
        gt: Reference masks folder, or an nnU-Net dataset folder.
        labels: Labels to evaluate (default: all found).
        output: Where to write ``summary.json`` and ``metrics.csv`` (None = nowhere).

    Returns:
        The summary (see :func:`evaluate_pairs`), plus ``pred``, ``gt`` and ``unmatched_references``.
    """
    pairs, unmatched, names = match_folders(pred, gt)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        warn(f"{len(unmatched)} ground-truth case(s) have no prediction and are not evaluated: {shown}")
    summary = evaluate_pairs(pairs, labels, names)
    summary.update(pred=str(pred), gt=str(gt), unmatched_references=unmatched)
    if output is not None:
        write_outputs(summary, output)
    return summary


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None,
    split: str = "val",
    labels: Sequence[int] | None = None,
    output: str | Path | None = None,
    ensemble: int = 1,
    native: bool = False,
    device: str = "auto",
    amp: str = "none",
    seed: int = 0,
    context_size: Sequence[int] | None = None,
    adapt_steps: int = 0,
) -> dict[str, Any]:
    """``ncatool eval --checkpoint CKPT [--data DATASET]``: the checkpoint's task scores its model.

    Segmentation runners predict a split and score it with :func:`evaluate_pairs` (the same numbers
    as ``--pred/--gt``); generation runners run their task's own validation.

    Returns:
        The runner's summary (see :meth:`ncatool.runtime.Runner.evaluate`).
    """
    from ncatool.runtime import EvalRequest, load

    request = EvalRequest(
        data=Path(data) if data is not None else None,
        split=split,
        labels=labels,
        output=Path(output) if output is not None else None,
        ensemble=ensemble,
        native=native,
        seed=seed,
        context_size=tuple(context_size) if context_size else None,
        adapt_steps=adapt_steps,
    )
    return load(checkpoint, device, amp).evaluate(request)


def evaluate(
    pred: str | Path | None = None,
    gt: str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    data: str | Path | None = None,
    split: str = "val",
    labels: Sequence[int] | None = None,
    output: str | Path | None = None,
    ensemble: int = 1,
    native: bool = False,
    device: str = "auto",
    amp: str = "none",
    seed: int = 0,
    context_size: Sequence[int] | None = None,
    adapt_steps: int = 0,
) -> dict[str, Any]:
    """``ncatool eval``: score predictions against references, or a checkpoint on a dataset split.

    Two forms: ``evaluate(pred=DIR, gt=DIR)`` (:func:`evaluate_folders`; ``gt`` may be an nnU-Net
    dataset folder), or ``evaluate(checkpoint=CKPT, data=DATASET, split="val")``
    (:func:`evaluate_checkpoint`; ``data`` defaults to the run's own).

    Args:
        pred: Folder of predicted masks (``CASE.nii.gz``, ``CASE.png``, ISIC's ``CASE_segmentation.png``).
        gt: Folder of reference masks, or an nnU-Net dataset folder.
        checkpoint: A run's checkpoint to predict with, then score.
        data: With ``checkpoint``: the dataset (grow/digits: replaces the run's data path).
        split: With ``checkpoint``: ``val``, ``train``, ``test`` or ``all``.
        labels: Labels to score (default: all).
        output: Write ``summary.json`` and ``metrics.csv`` here (with ``checkpoint`` also the predictions).
        ensemble, native, device, amp, seed: With ``checkpoint``: as for :func:`ncatool.predict.predict`.
        context_size: With an in-context ``checkpoint``: the context sizes to score.
        adapt_steps: With an in-context ``checkpoint``: fine-tune on each context draw first.

    Returns:
        The summary: nnU-Net's layout (``metric_per_case``, ``mean``, ``foreground_mean``) for
        segmentation, ``{"metrics": ...}`` for grow/digits checkpoints.

    Raises:
        NcaError: Both forms or neither, half of one form, or any problem of the inputs.
    """
    folder_form = pred is not None or gt is not None
    ckpt_form = checkpoint is not None or data is not None
    if folder_form and ckpt_form:
        raise NcaError("use either --pred/--gt or --checkpoint/--data, not both")
    if folder_form and (pred is None or gt is None):
        raise NcaError("--pred and --gt go together: both folders are needed")
    if ckpt_form and checkpoint is None:
        raise NcaError("--data needs --checkpoint: the model to predict the dataset with")
    if pred is not None and gt is not None:
        return evaluate_folders(pred, gt, labels, output)
    if checkpoint is not None:
        return evaluate_checkpoint(
            checkpoint,
            data,
            split,
            labels,
            output,
            ensemble,
            native,
            device,
            amp,
            seed,
            context_size,
            adapt_steps,
        )
    raise NcaError("nothing to evaluate: give --pred DIR --gt DIR, or --checkpoint CKPT --data DATASET")


def write_scores(summary: dict[str, Any], output: str | Path) -> None:
    """``summary.json`` and ``metrics.csv`` (``metric,value`` rows) of a ``{"metrics": {...}}`` summary."""
    import json

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(summary_to_json(summary), indent=2) + "\n", out / "summary.json")
    rows = "".join(f"{k},{_csv_value(v, k)}\n" for k, v in summary["metrics"].items())
    write_text_atomic("metric,value\n" + rows, out / "metrics.csv")


def print_generation_summary(summary: dict[str, Any]) -> None:
    """The metrics of :func:`evaluate_generation` as a table on stderr."""
    from rich import box
    from rich.table import Table

    from ncatool.console import err, state

    if state.quiet:
        return
    table = Table(title=f"{summary['task']}: {summary['checkpoint']}", title_justify="left", box=box.SIMPLE)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():
        table.add_row(key, _fmt(value))
    err.print(table)


__all__ = [
    "EVAL_SPLITS",
    "EvalPair",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_folders",
    "evaluate_pair",
    "evaluate_pairs",
    "match_folders",
    "metrics_csv",
    "parse_labels",
    "print_generation_summary",
    "print_summary",
    "summary_to_json",
    "write_outputs",
    "write_scores",
]
