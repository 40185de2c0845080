"""Segmentation checkpoints at work: masks that keep the input's geometry, uncertainty, scores, frames.

Inference repeats the training preprocessing exactly (the settings come from the run's config, with
the task's own defaults for anything an older run did not save):

1. read all channel files of a case and stack them (:func:`ncatool.data.loading.load_case`);
2. normalise the whole case with the run's ``normalization`` / ``zscore_nonzero`` / ``ct_window``;
3. ``seg2d`` on a volume: cut it into 2D slices along the run's ``slice_axis`` (as training did);
4. resize each item (image or slice) to the run's ``target_size`` with (bi/tri)linear interpolation,
   as training did — unless ``native=True``, which runs the NCA at the input's own size (an NCA has
   no fixed input size, but it was trained at one scale, so native size helps only when the inputs
   have about the training resolution);
5. run the model ``ensemble`` times (the stochastic cell updates make every run different) under
   ``torch.no_grad`` and optional bf16 autocast; keep the running mean and variance of the sigmoid
   probabilities (Welford), never the intermediate NCA states;
6. resize mean probability and standard deviation back to the input size (linear interpolation),
   threshold the mean at 0.5 (:func:`ncatool.models.segmentation.probs_to_labels`) and write the
   label map with the input's spacing, origin and direction (a 2D input, or a one-slice volume,
   gives a mask of the same layout).

Mask files follow the input's kind (``format="auto"``): a volume gives ``CASE.nii.gz``; a
PNG/JPG/BMP/TIFF image gives a PNG of the image's size, ``CASE.png`` with the label values, or, for
a binary model trained on a dataset that ``ncatool prepare --layout isic`` made (the checkpoint's
``task_state["source_layout"]``), ``CASE_segmentation.png`` with 0/255 as the ISIC challenge writes
its masks. ``format="nifti"`` or ``"png"`` forces one kind (PNG needs 2D inputs).

Uncertainty (M3D-NCA): the per-voxel standard deviation over the ensemble (``torch.std``, i.e.
``N - 1`` in the denominator), summed over the foreground channels, is written as
``CASE_std.nii.gz``; the case's quality score is ``sum(std) / sum(mean probability)`` over all voxels
and foreground channels, computed at the resolution the model ran at. High scores flag likely
failures without ground truth.

Memory stays bounded: inputs are processed in chunks of slices, labels are thresholded in chunks,
and when one item's NCA state is too large for the memory budget (e.g. a 256³ volume with
``native=True``) the model runs in its low-memory mode: two alternating state buffers, each NCA step
in slabs along the first spatial axis. Measured peak RSS on CPU for a 256³ float32 NIfTI with the
seg3d default model (16 channels, hidden 64, 2 levels; memory does not grow with steps): 0.8 GB
resized to 64³ (the default), 3.0 GB at native size (3.1 GB with ensemble 2; 6.3 GB with the
model's own forward).

Scores (``ncatool eval --checkpoint``) predict a split of the dataset into masks and score them with
:mod:`ncatool.evaluate`, the same code as ``ncatool eval --pred --gt``; the training run's summary
reports its best checkpoint's validation Dice through this same path.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ncatool.data.datasets import DataConfig
from ncatool.data.io import PLANAR_EXTENSIONS, split_extension, write_image
from ncatool.data.loading import CaseData, CaseRecord, load_case
from ncatool.data.nnunet.pairs import ISIC_LABEL_SUFFIX
from ncatool.data.transforms import resize_image
from ncatool.distributed import world
from ncatool.errors import NcaError
from ncatool.evaluate import EVAL_SPLITS
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig, probs_to_labels
from ncatool.runtime import AnimateRequest, Checkpoint, EvalRequest, PredictRequest, autocast, load_weights
from ncatool.tasks.segmentation.inputs import build_segmentation_model
from ncatool.tasks.segmentation.task import SegConfig, bin_range

if TYPE_CHECKING:
    from ncatool.tasks.segmentation.animation import SegSource

#: Default budget for one NCA step's temporaries (perception, MLP activations), in bytes.
STEP_BUDGET_BYTES = 512 * 2**20
STD_SUFFIX = "_std"
MASK_EXTENSION = ".nii.gz"
#: ``ncatool predict --format``: the kind of mask files.
MASK_FORMATS: tuple[str, ...] = ("auto", "nifti", "png")
#: Model settings an older ncatool saved under another name (task_state["model"]).
_RENAMED_MODEL_KEYS = {"padding": "border"}


def model_config(shape: dict[str, Any], path: Path) -> SegModelConfig:
    """The model shape a checkpoint stored (``task_state["model"]``), old names renamed.

    Raises:
        NcaError: Missing or not a valid shape.
    """
    if not shape:
        raise NcaError("checkpoint has no model settings (task_state.model)", path)
    known = set(SegModelConfig.__dataclass_fields__)
    values = {}
    for key, value in shape.items():
        key = key if key in known else _RENAMED_MODEL_KEYS.get(key, key)
        values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return SegModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise NcaError(f"checkpoint does not describe a valid segmentation model ({err})", path) from err


@dataclass
class CasePrediction:
    """The result for one case, at the input's size.

    Attributes:
        name: Case name.
        labels: ``(*S)`` label map (0 = background, k = label k).
        probabilities: ``(n_out, *S)`` mean foreground probabilities.
        std: ``(*S)`` ensemble standard deviation summed over foreground channels (ensemble > 1).
        quality: ``sum(std) / sum(mean)`` (ensemble > 1); higher means less reliable.
    """

    name: str
    labels: np.ndarray
    probabilities: np.ndarray
    std: np.ndarray | None
    quality: float | None


class SegmentationRunner:
    """A trained segmentation NCA with the preprocessing of its training run.

    Args:
        model: The model (moved to ``device``, eval mode).
        config: The run's config (normalisation, target size, slicing).
        device: Where the model runs.
        amp: ``none`` or ``bf16`` autocast.
        step_budget: Bytes allowed for one NCA step's temporaries before steps run in slabs.
        path: The checkpoint file (for messages and summaries).
    """

    def __init__(
        self,
        model: SegmentationNCA,
        config: SegConfig,
        device: torch.device,
        amp: str = "none",
        step_budget: int = STEP_BUDGET_BYTES,
        path: Path | None = None,
    ) -> None:
        self.model = model.eval().to(device)
        self.config = config
        self.task = config.task
        self.device = device
        self.amp = amp
        self.step_budget = step_budget
        self.path = path or Path("<model>")
        self.split: dict[str, list[str]] = {}
        #: The layout the training dataset was prepared from (``"isic"``: ISIC-style PNG masks).
        self.source_layout: str | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: torch.device, amp: str = "none"
    ) -> SegmentationRunner:
        """Rebuild the model from the shape the checkpoint stored and load its weights.

        Raises:
            NcaError: The checkpoint lacks the model shape or its weights do not fit it.
        """
        config: SegConfig = checkpoint.config  # type: ignore[assignment]
        shape = model_config(dict(checkpoint.task_state.get("model") or {}), checkpoint.path)
        bins = config.intensity_bins
        try:
            model = build_segmentation_model(shape, bins, bin_range(config) if bins else (0.0, 1.0))
        except ValueError as err:
            raise NcaError(
                f"checkpoint does not describe a valid segmentation model ({err})", checkpoint.path
            ) from err
        load_weights(model, checkpoint)
        runner = cls(model, checkpoint.config, device, amp, path=checkpoint.path)  # type: ignore[arg-type]
        runner.split = dict(checkpoint.task_state.get("split") or {})
        runner.source_layout = checkpoint.task_state.get("source_layout")
        return runner

    @property
    def cfg(self) -> SegModelConfig:
        """The model's shape."""
        return self.model.cfg

    @property
    def in_channels(self) -> int:
        """Image channels the model expects (its intensity bins, if any, it computes itself)."""
        return int(getattr(self.model, "image_channels", self.cfg.in_channels))

    @property
    def n_out(self) -> int:
        """Foreground labels the model predicts (labels ``1..n_out``)."""
        return self.cfg.n_out

    @property
    def target_size(self) -> tuple[int, ...] | None:
        """The run's resize target (array order), or None (trained at native size)."""
        return self.config.target_size

    # ------------------------------------------------------------------ one case
    def data_config(self) -> DataConfig:
        """The normalisation of the training run."""
        cfg = self.config
        return DataConfig(
            normalization=cfg.normalization, zscore_nonzero=cfg.zscore_nonzero, ct_window=cfg.ct_window
        )

    def load(self, record: CaseRecord) -> CaseData:
        """Read and normalise a case as training did; check it fits the model.

        Raises:
            NcaError: Channel count or dimensionality does not match the checkpoint.
        """
        data = load_case(CaseRecord(record.name, record.image_paths, None), self.data_config())
        if data.num_channels != self.in_channels:
            files = ", ".join(p.name for p in record.image_paths)
            raise NcaError(
                f"case {record.name!r} has {data.num_channels} channel(s) ({files}) but the checkpoint's "
                f"model expects {self.in_channels}",
                record.image_paths[0],
            )
        if self.cfg.dim == 3 and data.dim != 3:
            raise NcaError(f"is a 2D image but {self.task} models segment 3D volumes", record.image_paths[0])
        return data

    def predict_case(
        self, data: CaseData, ensemble: int = 1, native: bool = False, seed: int | None = 0
    ) -> CasePrediction:
        """Segment one loaded case.

        Args:
            data: From :meth:`load` (normalised).
            ensemble: Number of stochastic runs averaged (>= 1).
            native: Run at the input's own size instead of the training ``target_size``.
            seed: Seed of the stochastic updates (per case, so results do not depend on case order);
                None leaves the random state alone.

        Returns:
            Label map, mean probabilities, std map and quality score at the input's size.
        """
        if ensemble < 1:
            raise NcaError(f"--ensemble must be >= 1, got {ensemble}")
        if seed is not None:
            torch.manual_seed(seed)
        image = data.image
        if data.dim == 2 or self.cfg.dim == 3:
            items = image[None]  # (1, C, *S)
            axis = None
        else:  # seg2d on a volume: slices along slice_axis, as SliceDataset cuts them
            axis = self.config.slice_axis
            items = np.moveaxis(image, axis + 1, 0)  # (N, C, H, W), a view
        size = None if native else self.target_size
        mean, std, std_sum, mean_sum = self._run_items(items, size, ensemble)
        if axis is not None:
            mean = np.moveaxis(mean, 0, axis + 1)  # (n_out, *S)
            std = np.moveaxis(std, 0, axis + 1) if std is not None else None
        else:
            mean, std = mean[0], std[0] if std is not None else None
        labels = _labels(mean, np.uint8 if self.n_out < 256 else np.uint16)
        quality = None
        if ensemble > 1:
            quality = std_sum / mean_sum if mean_sum > 0 else (0.0 if std_sum == 0 else math.inf)
        return CasePrediction(
            name=data.name,
            labels=labels,
            probabilities=mean,
            std=std.sum(axis=0, dtype=np.float32) if std is not None else None,
            quality=quality,
        )

    def _item_bytes(self, spatial: Sequence[int]) -> int:
        """Rough bytes of one item of ``spatial`` size in the model's own forward: the top level's
        step temporaries plus the three full-size states it keeps alive."""
        from ncatool.models.slabs import step_bytes_per_cell

        top = self.model.levels[-1]
        per_voxel = step_bytes_per_cell(top) + 3 * self.cfg.channels * 4
        return int(np.prod(spatial)) * per_voxel

    def _run_items(
        self, items: np.ndarray, size: tuple[int, ...] | None, ensemble: int
    ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        """Mean and std probabilities ``(N, n_out, *S)`` of items ``(N, C, *S)``, in chunks."""
        n, spatial = items.shape[0], tuple(items.shape[2:])
        run_size = size or spatial
        per_batch = max(1, self.step_budget // max(self._item_bytes(run_size), 1))
        mean_out = np.empty((n, self.n_out, *spatial), dtype=np.float32)
        std_out = np.empty_like(mean_out) if ensemble > 1 else None
        std_sum = mean_sum = 0.0
        with torch.no_grad(), autocast(self.device, self.amp):
            for start in range(0, n, per_batch):
                stop = min(start + per_batch, n)
                x = torch.from_numpy(np.ascontiguousarray(items[start:stop])).to(self.device)
                if size is not None:
                    x = resize_image(x, size)
                mean, var = _welford(lambda x=x: self._probs(x), ensemble)
                del x
                mean_sum += float(mean.sum(dtype=torch.float64))
                std = var.sqrt() if var is not None else None
                if std is not None:
                    std_sum += float(std.sum(dtype=torch.float64))
                if size is not None:
                    mean = resize_image(mean, spatial)
                    std = resize_image(std, spatial) if std is not None else None
                mean_out[start:stop] = mean.clamp_(0.0, 1.0).cpu().numpy()
                if std_out is not None and std is not None:
                    std_out[start:stop] = std.clamp_(min=0.0).cpu().numpy()
        return mean_out, std_out, std_sum, mean_sum

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities of a batch; states too large for the budget take the low-memory path."""
        if x.shape[0] * self._item_bytes(x.shape[2:]) <= self.step_budget:
            return torch.sigmoid(self.model(x).logits.float())
        return torch.sigmoid(self.model(x, step_budget=self.step_budget).logits.float())

    # ------------------------------------------------------------------ many cases
    def predict_records(
        self,
        records: Sequence[CaseRecord],
        output: str | Path,
        ensemble: int = 1,
        native: bool = False,
        seed: int = 0,
        on_case: Callable[[dict[str, Any]], None] | None = None,
        format: str = "auto",
    ) -> list[dict[str, Any]]:
        """Segment cases and write their masks (and ``_std`` maps with ``ensemble > 1``).

        Args:
            records: The cases.
            output: The output folder.
            ensemble, native, seed: As for :meth:`predict_case`.
            on_case: Called with each case's row as soon as it is written.
            format: ``auto``, ``nifti`` or ``png`` (see :meth:`mask_format` and :meth:`mask_path`).

        Returns:
            One row per case: ``case``, ``inputs``, ``mask``, ``std``, ``shape``, ``quality``, ``seconds``.

        Raises:
            NcaError: A case does not fit the model, PNG for a volume, or an output would overwrite an
                input.
        """
        if format not in MASK_FORMATS:
            raise NcaError(f"--format must be one of {', '.join(MASK_FORMATS)}, got {format!r}")
        output = Path(output)
        inputs = {p.resolve() for r in records for p in r.image_paths}
        kinds = {r.name: self.mask_format(r, format) for r in records}
        for r in records:
            mask = self.mask_path(output, r.name, kinds[r.name])
            for out in (mask, std_path(mask)):
                if out.resolve() in inputs:
                    raise NcaError("output would overwrite an input image; choose another --output", out)
        output.mkdir(parents=True, exist_ok=True)
        rows = []
        for record in records:
            t0 = time.perf_counter()
            data = self.load(record)
            kind = kinds[record.name]
            if kind == "png" and data.dim != 2:
                raise NcaError(
                    f"--format png needs 2D images; case {record.name!r} is a volume (use nifti)",
                    record.image_paths[0],
                )
            pred = self.predict_case(data, ensemble=ensemble, native=native, seed=seed)
            path = self.mask_path(output, record.name, kind)
            mask = write_image(data.to_image(self.mask_values(pred.labels, kind)), path)
            std_file = None
            if pred.std is not None:
                std_file = write_image(data.to_image(pred.std.astype(np.float32)), std_path(path))
            row = {
                "case": record.name,
                "inputs": [str(p) for p in record.image_paths],
                "mask": str(mask),
                "std": str(std_file) if std_file else None,
                "shape": list(data.spatial_shape),
                "quality": pred.quality,
                "foreground_voxels": int(np.count_nonzero(pred.labels)),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            del data, pred
            rows.append(row)
            if on_case is not None:
                on_case(row)
        return rows

    def mask_format(self, record: CaseRecord, format: str = "auto") -> str:
        """``nifti`` or ``png`` for a case: ``auto`` follows the input's kind (PNG/JPG/BMP/TIFF → png)."""
        if format != "auto":
            return format
        planar = all(split_extension(p)[1] in PLANAR_EXTENSIONS for p in record.image_paths)
        return "png" if planar else "nifti"

    @property
    def isic_masks(self) -> bool:
        """Whether PNG masks follow the ISIC challenge: a binary model trained on an ISIC layout."""
        return self.source_layout == "isic" and self.n_out == 1

    def mask_path(self, output: Path, case: str, kind: str = "nifti") -> Path:
        """``output/CASE.nii.gz``, ``output/CASE.png``, or ISIC's ``output/CASE_segmentation.png``."""
        if kind == "png":
            # ISIC challenge masks: CASE_segmentation.png with 0/255 (what prepare --layout isic reads)
            return output / f"{case}{ISIC_LABEL_SUFFIX if self.isic_masks else ''}.png"
        return mask_path(output, case)

    def mask_values(self, labels: np.ndarray, kind: str) -> np.ndarray:
        """The label map as written: label values, or 0/255 for ISIC PNG masks."""
        if kind == "png" and self.isic_masks:
            return np.where(labels > 0, 255, 0).astype(np.uint8)
        return labels

    def predict(self, request: PredictRequest) -> dict[str, Any]:
        """``ncatool predict``: segment every case of ``request.input`` into ``request.output``."""
        from ncatool.predict import discover_cases

        request.refuse(self.task, "samples", "labels", "steps", "context", "context_size", "adapt_steps")
        if request.ensemble < 1:
            raise NcaError(f"--ensemble must be >= 1, got {request.ensemble}")
        if request.input is None:
            raise NcaError(f"--input FILE_OR_DIR is required for {self.task} checkpoints")
        records, source = discover_cases(request.input)
        if not records:
            raise NcaError("no input cases found", request.input)
        rows = self.predict_records(
            records,
            request.output,
            request.ensemble,
            request.native,
            request.seed,
            request.on_case,
            request.format,
        )
        return {
            "checkpoint": str(self.path),
            "task": self.task,
            "input": source,
            "output": str(request.output),
            "ensemble": request.ensemble,
            "native": request.native,
            "target_size": None if request.native or self.target_size is None else list(self.target_size),
            "device": str(self.device),
            "amp": self.amp,
            "seed": request.seed,
            "format": request.format,
            "cases": rows,
        }

    # ------------------------------------------------------------------ scores
    def split_records(self, dataset: Any, split: str) -> list[CaseRecord]:
        """The cases of ``split``: ``val``/``train`` as the training run drew them, ``test`` from
        imagesTs/labelsTs, ``all`` of imagesTr.

        Raises:
            NcaError: Unknown split, a split the checkpoint did not store, or cases missing from the dataset.
        """
        if split not in EVAL_SPLITS:
            raise NcaError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
        if split == "test":
            records = dataset.cases("test")
            unlabelled = [r for r in records if r.label_path is None]
            if unlabelled:
                raise NcaError(
                    f"test case {unlabelled[0].name!r} has no label in labelsTs; cannot evaluate",
                    dataset.root / "labelsTs",
                )
            return records
        records = dataset.cases("train")
        if split == "all":
            return records
        names = self.split.get(split)
        if names is None:
            raise NcaError(f"checkpoint stores no {split!r} split; use --split all or test", self.path)
        if not names:
            raise NcaError(
                f"checkpoint's {split!r} split is empty (trained with val_fraction=0?); use --split train or all",
                self.path,
            )
        by_name = {r.name: r for r in records}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise NcaError(
                f"{split} case {missing[0]!r} of the checkpoint is not in this dataset's imagesTr "
                f"({len(missing)} missing); is --data the dataset the model was trained on?",
                dataset.root,
            )
        return [by_name[n] for n in names]

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """``ncatool eval --checkpoint CKPT --data DATASET``: predict a split, then score it.

        Predictions go to ``output/predictions`` (kept) or a temporary folder (removed).

        Returns:
            The summary of :func:`ncatool.evaluate.evaluate_pairs`, plus ``checkpoint``, ``data``,
            ``split``, ``ensemble``, ``native`` and ``predictions``.
        """
        from ncatool.console import info
        from ncatool.data.loading import NnUNetDataset
        from ncatool.evaluate import EvalPair, evaluate_pairs, write_outputs

        request.refuse(self.task, "context_size", "adapt_steps")
        data = (
            request.data
            if request.data is not None
            else (Path(self.config.data) if self.config.data else None)
        )
        if data is None:
            raise NcaError(f"--data DATASET_DIR is required to evaluate a {self.task} checkpoint")
        dataset = NnUNetDataset(data)
        if dataset.num_channels != self.in_channels:
            raise NcaError(
                f"dataset has {dataset.num_channels} channel(s) but the checkpoint's model expects "
                f"{self.in_channels}",
                dataset.json_path,
            )
        if dataset.num_foreground != self.n_out:
            raise NcaError(
                f"dataset has {dataset.num_foreground} foreground label(s) but the checkpoint's model "
                f"predicts {self.n_out}",
                dataset.json_path,
            )
        labels = request.labels
        if labels is not None and max(labels) > self.n_out:
            raise NcaError(f"--labels {max(labels)} is not a label of this model (1..{self.n_out})")
        records = self.split_records(dataset, request.split)
        names = {v: k for k, v in dataset.foreground_labels.items()}
        keep = request.output is not None
        w = world()
        if keep:
            pred_dir = Path(request.output) / "predictions"  # type: ignore[operator]
        else:  # one temporary folder for all ranks: rank 0's
            pred_dir = Path(w.broadcast(tempfile.mkdtemp(prefix="ncatool-eval-") if w.is_main else ""))
        try:
            where = pred_dir if keep else "a temporary folder"
            info(f"predicting {len(records)} {request.split} case(s) into {where}")
            rows = self.predict_records(
                records, pred_dir, request.ensemble, request.native, request.seed, format="nifti"
            )
            extra = {r["case"]: {"quality": r["quality"]} for r in rows if r["quality"] is not None}
            pairs = [EvalPair(r.name, mask_path(pred_dir, r.name), r.label_path) for r in records]
            w.barrier()  # every mask is written
            wanted = labels or list(range(1, self.n_out + 1))
            summary = evaluate_pairs(pairs, wanted, names, extra) if w.is_main else {}
            summary = w.broadcast(summary)
        finally:
            if not keep and w.is_main:  # the broadcast above waited for every rank
                shutil.rmtree(pred_dir, ignore_errors=True)
        summary.update(
            checkpoint=str(self.path),
            data=str(data),
            split=request.split,
            ensemble=request.ensemble,
            native=request.native,
            predictions=str(pred_dir) if keep else None,
        )
        if request.output is not None and w.is_main:
            write_outputs(summary, request.output)
        return summary

    def animation(self, request: AnimateRequest) -> SegSource:
        """Every NCA step of one case with its predicted mask (see :mod:`.animation`)."""
        from ncatool.tasks.segmentation.animation import load_seg_source

        return load_seg_source(self, request)


def mask_path(output: Path, case: str) -> Path:
    """``output/CASE.nii.gz``."""
    return output / f"{case}{MASK_EXTENSION}"


def std_path(mask: Path) -> Path:
    """The ensemble's standard deviation next to its mask: ``CASE_std.nii.gz`` for ``CASE.nii.gz``;
    ``CASE_std.tif`` (float32) for a PNG mask ``CASE.png``."""
    stem, ext = split_extension(mask)
    return mask.with_name(f"{stem}{STD_SUFFIX}{'.tif' if ext == '.png' else ext}")


def _labels(probs: np.ndarray, dtype: type, chunk_voxels: int = 2**22) -> np.ndarray:
    """:func:`probs_to_labels` of ``(n_out, *S)`` probabilities, in chunks along the first axis
    (its int64 temporaries would need 30 bytes per voxel at once)."""
    spatial = probs.shape[1:]
    out = np.empty(spatial, dtype=dtype)
    rows = max(1, chunk_voxels // max(int(np.prod(spatial[1:])), 1))
    for start in range(0, spatial[0], rows):
        part = torch.from_numpy(probs[:, start : start + rows])[None]
        out[start : start + rows] = probs_to_labels(part)[0].numpy()
    return out


def _welford(run: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and unbiased variance of ``n`` calls of ``run`` (None for n = 1), in float32."""
    mean = run()
    if n == 1:
        return mean, None
    m2 = torch.zeros_like(mean)
    for k in range(2, n + 1):
        value = run()
        delta = value - mean
        mean += delta / k
        m2 += delta * (value - mean)
    return mean, m2 / (n - 1)
