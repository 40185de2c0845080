"""Run a trained NCA on new images: masks that keep the input's geometry, with uncertainty.

Segmentation (``seg2d``, ``seg3d``) inference repeats the training preprocessing exactly:

1. read all channel files of a case and stack them (:func:`ncatool.data.datasets.load_case`);
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

Uncertainty (M3D-NCA): the per-voxel standard deviation over the ensemble (``torch.std``, i.e.
``N - 1`` in the denominator), summed over the foreground channels, is written as
``CASE_std.nii.gz``; the case's quality score is ``sum(std) / sum(mean probability)`` over all voxels
and foreground channels, computed at the resolution the model ran at. High scores flag likely
failures without ground truth.

Memory stays bounded: inputs are processed in chunks of slices, labels are thresholded in chunks,
and when one item's NCA state is too large for the memory budget (e.g. a 256³ volume with
``native=True``) :func:`lowmem_logits` replaces the model's forward: the same computation with two
alternating state buffers, each NCA step in slabs along the first spatial axis with a halo of the
perception radius (the same result as a whole step; only the random update masks are drawn per
slab). Measured peak RSS on CPU for a 256³ float32 NIfTI with the seg3d default model (16 channels,
hidden 64, 2 levels; memory does not grow with steps): 0.8 GB resized to 64³ (the default), 3.0 GB
at native size (3.1 GB with ensemble 2; 6.3 GB with the model's own forward).

Generation checkpoints (``grow``, ``digits``) have no input images: :func:`generate` grows samples
from the seed and writes PNGs.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncatool.data.datasets import DataConfig
from ncatool.data.io import is_image_file, split_extension, write_image
from ncatool.data.loading import CaseData, CaseRecord, load_case
from ncatool.data.transforms import resize_image
from ncatool.errors import NcaError
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig, probs_to_labels

#: Checkpoint tasks this module can run: segmentation (masks from images) and generation (PNGs).
SEG_TASKS: tuple[str, ...] = ("seg2d", "seg3d")
GEN_TASKS: tuple[str, ...] = ("grow", "digits")
#: Autocast choices at inference.
AMP_CHOICES: tuple[str, ...] = ("none", "bf16")
#: Default budget for one NCA step's temporaries (perception, MLP activations), in bytes.
STEP_BUDGET_BYTES = 512 * 2**20
#: Suffix of the uncertainty map written next to each mask.
STD_SUFFIX = "_std"
MASK_EXTENSION = ".nii.gz"

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# --------------------------------------------------------------------------------------------------
# Loading a trained model
# --------------------------------------------------------------------------------------------------


def tuple_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Config fields read back from JSON: lists become tuples (the dataclasses use tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


@dataclass
class SegPredictor:
    """A trained segmentation NCA with the preprocessing of its training run.

    Attributes:
        model: The model, in eval mode, on ``device``.
        task: ``seg2d`` or ``seg3d``.
        normalization: Intensity normalisation of the run (see :func:`ncatool.data.datasets.normalize`).
        zscore_nonzero: z-score statistics over nonzero voxels only.
        ct_window: CT window for ``ct`` normalisation.
        target_size: The run's resize target (array order), or None (trained at native size).
        slice_axis: ``seg2d`` on volumes: the axis slices were cut along.
        device: Where the model runs.
        amp: ``none`` or ``bf16`` autocast.
        step_budget: Bytes allowed for one NCA step's temporaries before steps run in slabs.
    """

    model: SegmentationNCA
    task: str
    normalization: str = "zscore"
    zscore_nonzero: bool = False
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    target_size: tuple[int, ...] | None = None
    slice_axis: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "none"
    step_budget: int = STEP_BUDGET_BYTES

    @property
    def cfg(self) -> SegModelConfig:
        """The model's shape."""
        return self.model.cfg

    @property
    def in_channels(self) -> int:
        """Image channels the model expects."""
        return self.cfg.in_channels

    @property
    def n_out(self) -> int:
        """Foreground labels the model predicts (labels ``1..n_out``)."""
        return self.cfg.n_out

    @classmethod
    def from_payload(
        cls, payload: dict[str, Any], path: Path, device: torch.device, amp: str = "none"
    ) -> SegPredictor:
        """Rebuild the model and preprocessing from a checkpoint payload.

        Raises:
            NcaError: The checkpoint lacks the model shape or its weights do not fit it.
        """
        state = payload.get("task_state") or {}
        if "model" not in state:
            raise NcaError("checkpoint has no model settings (task_state.model)", path)
        try:
            model_cfg = SegModelConfig(**tuple_fields(state["model"]))
            model = SegmentationNCA(model_cfg)
            model.load_state_dict(payload["model"])
        except (TypeError, ValueError, RuntimeError, KeyError) as err:
            raise NcaError(f"checkpoint does not describe a valid segmentation model ({err})", path) from err
        run = payload.get("config") or {}
        target = run.get("target_size")
        window = run.get("ct_window", (-1000.0, 400.0))
        if amp not in AMP_CHOICES:
            raise NcaError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
        model.eval().to(device)
        return cls(
            model=model,
            task=str(payload.get("task")),
            normalization=str(run.get("normalization", "zscore")),
            zscore_nonzero=bool(run.get("zscore_nonzero", False)),
            ct_window=(float(window[0]), float(window[1])),
            target_size=tuple(int(s) for s in target) if target else None,
            slice_axis=int(run.get("slice_axis", 0)),
            device=device,
            amp=amp,
        )

    # ------------------------------------------------------------------ one case
    def load(self, record: CaseRecord) -> CaseData:
        """Read and normalise a case as training did; check it fits the model.

        Raises:
            NcaError: Channel count or dimensionality does not match the checkpoint.
        """
        config = DataConfig(
            normalization=self.normalization, zscore_nonzero=self.zscore_nonzero, ct_window=self.ct_window
        )
        data = load_case(CaseRecord(record.name, record.image_paths, None), config)
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
            axis = self.slice_axis
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
        top = self.model.levels[-1]
        per_voxel = _step_bytes_per_voxel(top) + 3 * self.cfg.channels * 4
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
        with torch.no_grad(), self._autocast():
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
        return torch.sigmoid(lowmem_logits(self.model, x, self.step_budget).float())

    def _autocast(self) -> Any:
        if self.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


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


def _step_bytes_per_voxel(nca: Any) -> int:
    """Rough float32 bytes per voxel of one NCA step's temporaries (padding, perception, MLP, update)."""
    return (2 * nca.perception.out_channels + 2 * nca.cfg.hidden + 4 * nca.cfg.channels) * 4


def _halo(nca: Any) -> int:
    """How far (voxels) a cell's next value depends on its neighbours in one step."""
    cfg = nca.cfg
    radius = nca.perception.learned_radius if "learned" in cfg.filters else 0
    if any(f != "learned" for f in cfg.filters):
        radius = max(radius, 1)
    return radius + (1 if cfg.alive_channel is not None else 0)


def _slab_step(nca: Any, x: torch.Tensor, out: torch.Tensor, budget: int) -> None:
    """One NCA step of ``x`` written into ``out``, in slabs along the first spatial axis.

    Each slab is stepped together with a halo of :func:`_halo` voxels on either side and only its
    interior is kept, so the result equals a whole step: the padding at the true borders is the
    same, only the random fire masks are drawn per slab.
    """
    depth = x.shape[2]
    plane = x.shape[0] * int(np.prod(x.shape[3:])) * _step_bytes_per_voxel(nca)
    slab = max(1, budget // max(plane, 1))
    if slab >= depth or nca.cfg.padding == "circular":
        out.copy_(nca.step(x))
        return
    halo = _halo(nca)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(0, z0 - halo), min(depth, z1 + halo)
        out[:, :, z0:z1] = nca.step(x[:, :, lo:hi])[:, :, z0 - lo : z1 - lo]


def lowmem_logits(
    model: SegmentationNCA, image: torch.Tensor, budget: int = STEP_BUDGET_BYTES
) -> torch.Tensor:
    """``model(image).logits`` for inference with about two copies of the top-level state in memory.

    The same computation as :meth:`SegmentationNCA.forward` without patches (every level on the
    whole image): an image pyramid, level 0 from zeros, each next level from the nearest-upsampled
    hidden channels. Unlike the training forward it keeps no reference to earlier states, steps into
    two alternating buffers and runs every step in slabs (:func:`_slab_step`), so a 256³ volume at
    native size fits in a few GB. Call under ``torch.no_grad()``.

    Args:
        model: The segmentation NCA.
        image: ``(B, in_channels, *S)``, normalised.
        budget: Bytes allowed for one slab's temporaries.

    Returns:
        Logits ``(B, n_out, *S)``.
    """
    import torch.nn.functional as F

    from ncatool.models.segmentation import image_pyramid

    cfg = model.cfg
    pyramid = image_pyramid(image, cfg.levels, cfg.scale)
    state = torch.empty(0)
    for level, nca in enumerate(model.levels):
        img = pyramid[level]
        pyramid[level] = torch.empty(0)  # the full-size image lives on in `state` only
        if level == 0:
            zeros = img.new_zeros((img.shape[0], cfg.channels - cfg.in_channels, *img.shape[2:]))
            state = torch.cat([img, zeros], dim=1)
            del zeros
        else:
            hidden = F.interpolate(state[:, cfg.in_channels :], size=img.shape[2:], mode="nearest")
            state = torch.cat([img, hidden], dim=1)
            del hidden
        del img
        spare = torch.empty_like(state)
        for _ in range(cfg.steps[level]):
            _slab_step(nca, state, spare, budget)
            state, spare = spare, state
        del spare
    return state[:, cfg.in_channels : cfg.in_channels + cfg.n_out]


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


# --------------------------------------------------------------------------------------------------
# Finding input cases
# --------------------------------------------------------------------------------------------------


def _group_files(files: Sequence[Path]) -> list[CaseRecord]:
    """Group image files into cases.

    ``CASE_0000.ext``, ``CASE_0001.ext``... form one multi-channel case ``CASE`` whenever a
    ``CASE_0000`` file exists; every other file is a one-file case named by its stem.
    """
    by_stem: dict[str, Path] = {}
    for path in files:
        stem, _ = split_extension(path)
        if stem in by_stem:
            raise NcaError(f"two input files for case {stem!r}: {by_stem[stem].name} and {path.name}", path)
        by_stem[stem] = path
    groups: dict[str, dict[int, Path]] = {}
    single: dict[str, Path] = {}
    for stem, path in by_stem.items():
        match = _CHANNEL_RE.match(stem)
        if match and f"{match['case']}_0000" in by_stem:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            single[stem] = path
    records = []
    for case, channels in groups.items():
        if case in single:
            raise NcaError(f"case {case!r} is both a single file and a _0000 channel group", single[case])
        missing = [c for c in range(max(channels) + 1) if c not in channels]
        if missing:
            first = channels[0]
            ext = split_extension(first)[1]
            raise NcaError(
                f"channel file missing for case {case!r}", first.with_name(f"{case}_{missing[0]:04d}{ext}")
            )
        records.append(CaseRecord(case, [channels[c] for c in sorted(channels)], None))
    records += [CaseRecord(stem, [path], None) for stem, path in single.items()]
    return sorted(records, key=lambda r: r.name)


def _same_case(path: Path, case: str) -> bool:
    match = _CHANNEL_RE.match(split_extension(path)[0])
    return match is not None and match["case"] == case


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def discover_cases(path: str | Path) -> tuple[list[CaseRecord], str]:
    """The cases of an input: one image file, a folder of images, or an nnU-Net dataset folder.

    Args:
        path: A file (``CASE_0000.nii.gz`` brings its sibling channel files along), a folder of image
            files (``CASE_XXXX`` channel files grouped per case), or an nnU-Net raw dataset folder
            (``imagesTs`` when it exists, else ``imagesTr``).

    Returns:
        ``(cases sorted by name, description of the source)``.

    Raises:
        NcaError: The path is missing, holds no images, or a case's files are incomplete.
    """
    from ncatool.data.loading import NnUNetDataset

    path = Path(path)
    if not path.exists():
        raise NcaError("input does not exist", path)
    if path.is_file():
        if not is_image_file(path):
            raise NcaError("not an image file ncatool can read", path)
        match = _CHANNEL_RE.match(split_extension(path)[0])
        if match is None:
            return [CaseRecord(split_extension(path)[0], [path], None)], str(path)
        siblings = [p for p in _image_files(path.parent) if _same_case(p, match["case"])]
        records = [r for r in _group_files(siblings) if path in r.image_paths]
        return records, str(path)
    if (path / "dataset.json").is_file():
        dataset = NnUNetDataset(path)
        split = "test" if (path / "imagesTs").is_dir() else "train"
        records = dataset.cases(split)
        if not records:
            raise NcaError("holds no cases", path / ("imagesTs" if split == "test" else "imagesTr"))
        return records, str(path / ("imagesTs" if split == "test" else "imagesTr"))
    files = _image_files(path)
    if not files:
        raise NcaError("folder holds no image files (.nii.gz, .nrrd, .mha, .png, ...)", path)
    return _group_files(files), str(path)


# --------------------------------------------------------------------------------------------------
# Generation tasks: grow samples from the seed and write PNGs
# --------------------------------------------------------------------------------------------------


def generation_model(payload: dict[str, Any], path: Path, device: torch.device) -> tuple[Any, Any]:
    """``(model, seed state (C, H, W))`` of a ``grow`` or ``digits`` checkpoint, without its data."""
    from ncatool.models.growing import ConditionalNCA, make_seed
    from ncatool.models.nca import NCA, NCAConfig

    task, run = payload.get("task"), payload.get("config") or {}
    shape = dict((payload.get("task_state") or {}).get("model") or {})
    if not shape:
        raise NcaError("checkpoint has no model settings (task_state.model)", path)
    embed_dim = shape.pop("embed_dim", None)
    try:
        nca_cfg = NCAConfig(**tuple_fields(shape))
        if task == "digits":
            model: Any = ConditionalNCA(nca_cfg, 10, int(embed_dim or nca_cfg.cond_channels))
            size = int(run.get("img_size", 16))
            seed = make_seed(nca_cfg.channels, size, size, first_live_channel=1)
        else:
            model = NCA(nca_cfg)
            target = payload["task_state"].get("target")
            size = (
                int(target.shape[-1])
                if target is not None
                else int(run["img_size"]) + 2 * int(run["padding"])
            )
            seed = make_seed(nca_cfg.channels, size, size)
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise NcaError(f"checkpoint does not describe a valid {task} model ({err})", path) from err
    return model.eval().to(device), seed.to(device)


def generate(
    payload: dict[str, Any],
    path: str | Path,
    output: str | Path,
    samples: int = 4,
    labels: Sequence[int] | None = None,
    steps: int | None = None,
    device: str = "auto",
    amp: str = "none",
    seed: int = 0,
) -> dict[str, Any]:
    """Grow samples with a ``grow`` or ``digits`` checkpoint and write them as PNGs.

    ``grow``: ``sample_NNN.png`` (RGB over white), ``samples`` of them. ``digits``: ``digit_K_NNN.png``
    (grayscale), ``samples`` per requested digit ``K`` (default all ten).

    Args:
        payload: The loaded checkpoint.
        path: Its file (for messages).
        output: Output folder.
        samples: Samples (per digit for ``digits``).
        labels: ``digits`` only: which digits.
        steps: NCA steps; default: the run's validation steps (``grow``) or ``steps`` (``digits``).
        device: Where to run.
        amp: ``none`` or ``bf16``.
        seed: Seed of the stochastic updates.

    Returns:
        ``{"checkpoint", "task", "output", "steps", "samples", "files": [...]}``.
    """
    from ncatool.data.io import Image
    from ncatool.train import select_device

    path, output = Path(path), Path(output)
    task, run = str(payload.get("task")), payload.get("config") or {}
    if samples < 1:
        raise NcaError(f"--samples must be >= 1, got {samples}")
    if amp not in AMP_CHOICES:
        raise NcaError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if task == "digits" and labels is not None:
        bad = [int(k) for k in labels if not 0 <= int(k) <= 9]
        if bad:
            raise NcaError(f"--labels must be digits 0-9 for a digits checkpoint, got {bad}")
    if task != "digits" and labels is not None:
        raise NcaError("--labels applies to digits checkpoints only")
    if steps is None:
        steps = (
            int(run.get("steps", 32)) if task == "digits" else int(run.get("val_steps") or run["steps"][1])
        )
    if steps < 1:
        raise NcaError(f"--steps must be >= 1, got {steps}")
    dev = select_device(device)
    model, start = generation_model(payload, path, dev)
    torch.manual_seed(seed)
    files: list[str] = []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        if task == "digits":
            digits = list(range(10)) if labels is None else [int(k) for k in labels]
            wanted = torch.tensor(digits, device=dev).repeat_interleave(samples)
            out = model(start.unsqueeze(0).repeat(len(wanted), 1, 1, 1), steps, wanted)[:, 0]
            pixels = (out.float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            for i, (k, img) in enumerate(zip(wanted.tolist(), pixels, strict=True)):
                name = output / f"digit_{k}_{i % samples:03d}.png"
                files.append(str(write_image(Image.from_array(img), name)))
        else:
            from ncatool.tasks.growing import rgba_to_rgb

            out = model(start.unsqueeze(0).repeat(samples, 1, 1, 1), steps)
            for i in range(samples):
                image = Image.from_array(rgba_to_rgb(out[i, :4]), is_vector=True)
                files.append(str(write_image(image, output / f"sample_{i:03d}.png")))
    return {
        "checkpoint": str(path),
        "task": task,
        "output": str(output),
        "steps": steps,
        "samples": samples,
        "files": files,
    }


# --------------------------------------------------------------------------------------------------
# The library entry points
# --------------------------------------------------------------------------------------------------


def load_predictor(checkpoint: str | Path, device: str = "auto", amp: str = "none") -> SegPredictor:
    """Load a checkpoint for inference, dispatching on its task.

    Raises:
        NcaError: Missing/corrupt checkpoint, or a task without inference support.
    """
    from ncatool.train import load_checkpoint_file

    path = Path(checkpoint)
    return predictor_from_payload(load_checkpoint_file(path, "cpu"), path, device, amp)


def predictor_from_payload(
    payload: dict[str, Any], path: str | Path, device: str = "auto", amp: str = "none"
) -> SegPredictor:
    """The predictor for a loaded checkpoint payload, dispatching on ``payload["task"]``.

    Raises:
        NcaError: A task without inference support, or an unusable device.
    """
    from ncatool.train import select_device

    task = payload.get("task")
    if task in SEG_TASKS:
        return SegPredictor.from_payload(payload, Path(path), select_device(device), amp)
    if task in GEN_TASKS:
        raise NcaError(f"{task} checkpoints generate images and segment nothing; use generate()", path)
    supported = ", ".join((*SEG_TASKS, *GEN_TASKS))
    raise NcaError(f"predict for task {task!r} is not supported yet (supported: {supported})", path)


def mask_path(output: Path, case: str) -> Path:
    """``output/CASE.nii.gz``."""
    return output / f"{case}{MASK_EXTENSION}"


def std_path(output: Path, case: str) -> Path:
    """``output/CASE_std.nii.gz``."""
    return output / f"{case}{STD_SUFFIX}{MASK_EXTENSION}"


def predict_records(
    predictor: SegPredictor,
    records: Sequence[CaseRecord],
    output: str | Path,
    ensemble: int = 1,
    native: bool = False,
    seed: int = 0,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment cases and write ``CASE.nii.gz`` (and ``CASE_std.nii.gz`` with ``ensemble > 1``).

    Args:
        predictor: From :func:`load_predictor`.
        records: The cases.
        output: Output folder (created).
        ensemble: Stochastic runs per case.
        native: Run at the input's size instead of the training size.
        seed: Seed of the stochastic updates (applied per case).
        on_case: Called with each case's result row as soon as it is written.

    Returns:
        One row per case: ``case``, ``inputs``, ``mask``, ``std``, ``shape``, ``quality``, ``seconds``.

    Raises:
        NcaError: A case does not fit the model, or an output would overwrite an input.
    """
    output = Path(output)
    inputs = {p.resolve() for r in records for p in r.image_paths}
    for r in records:
        for out in (mask_path(output, r.name), std_path(output, r.name)):
            if out.resolve() in inputs:
                raise NcaError("output would overwrite an input image; choose another --output", out)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in records:
        t0 = time.perf_counter()
        data = predictor.load(record)
        pred = predictor.predict_case(data, ensemble=ensemble, native=native, seed=seed)
        mask = write_image(data.to_image(pred.labels), mask_path(output, record.name))
        std_file = None
        if pred.std is not None:
            std_file = write_image(data.to_image(pred.std.astype(np.float32)), std_path(output, record.name))
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


def predict(
    checkpoint: str | Path,
    input_path: str | Path | None,
    output: str | Path,
    ensemble: int = 1,
    native: bool = False,
    device: str = "auto",
    amp: str = "none",
    seed: int = 0,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    samples: int = 4,
    labels: Sequence[int] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """``ncatool predict``: segment every case of ``input_path`` into ``output``, or, for a
    generation checkpoint (``grow``, ``digits``), grow samples into ``output`` (:func:`generate`).

    Returns:
        Segmentation: ``{"checkpoint", "task", "input", "output", "ensemble", "native",
        "target_size", "device", "amp", "seed", "cases": [rows of predict_records]}``; generation:
        what :func:`generate` returns.
    """
    from ncatool.train import load_checkpoint_file

    if ensemble < 1:
        raise NcaError(f"--ensemble must be >= 1, got {ensemble}")
    path = Path(checkpoint)
    payload = load_checkpoint_file(path, "cpu")
    task = payload.get("task")
    if task in GEN_TASKS:
        if input_path is not None:
            raise NcaError(f"--input is not used by {task} checkpoints (they grow from a seed)")
        return generate(payload, path, output, samples, labels, steps, device, amp, seed)
    if labels is not None or steps is not None:
        raise NcaError("--labels and --steps apply to generation checkpoints (grow, digits) only")
    predictor = predictor_from_payload(payload, path, device, amp)
    del payload
    if input_path is None:
        raise NcaError(f"--input FILE_OR_DIR is required for {predictor.task} checkpoints")
    records, source = discover_cases(input_path)
    if not records:
        raise NcaError("no input cases found", input_path)
    rows = predict_records(predictor, records, output, ensemble, native, seed, on_case)
    return {
        "checkpoint": str(checkpoint),
        "task": predictor.task,
        "input": source,
        "output": str(output),
        "ensemble": ensemble,
        "native": native,
        "target_size": None if native or predictor.target_size is None else list(predictor.target_size),
        "device": str(predictor.device),
        "amp": amp,
        "seed": seed,
        "cases": rows,
    }


__all__ = [
    "AMP_CHOICES",
    "GEN_TASKS",
    "SEG_TASKS",
    "CasePrediction",
    "SegPredictor",
    "discover_cases",
    "generate",
    "load_predictor",
    "lowmem_logits",
    "mask_path",
    "predict",
    "predict_records",
    "predictor_from_payload",
    "std_path",
]
