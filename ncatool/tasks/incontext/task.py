"""``incontext``: train one NCA to segment structures from k examples, on many tasks at once.

Tasks are every foreground label of every ``--data`` dataset plus random unions of 1–5 labels of one
dataset (:mod:`.episodes`); ``holdout_labels`` keeps labels out of training entirely. Training runs
in two stages, as Neuroverse3D does: stage 1 with ``context_size`` (3) pairs per episode; stage 2
(``--set stage=2 --init STAGE1/checkpoints/best.pt``) draws k from 1..``k_max`` for half of the
batches (else ``context_size``) at 0.2 × the learning rate unless ``lr`` is set. The context is
encoded ``context_chunk`` pairs at a time, only the last chunk with gradients, so memory does not
grow with k (:meth:`ncatool.models.incontext.InContextNCA.context_stats`). Task augmentation
(``augment``): a random contrast for half of the episodes, and for ``boundary_tasks`` of them the
structure's boundary as the task (:func:`.episodes.episode_tensors`).

Loss: Dice+Focal on the NCA's logits plus ``aux_weight`` × BCE on the naive Bayes prior (it trains
the encoder directly; the NCA starts from that prior). Validation: Dice of fixed episodes whose
queries are held-out cases of the training tasks (``dice``, the score), of the prior alone
(``dice_prior``) and, when labels are held out, of the held-out tasks (``dice_holdout``, logged only:
it never chooses the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncatool.config import TrainConfig
from ncatool.errors import NcaError
from ncatool.losses import SEG_LOSSES, make_seg_loss
from ncatool.models.incontext import PRIORS, InContextModelConfig, InContextNCA
from ncatool.tasks.incontext.episodes import (
    Episode,
    EpisodeSampler,
    LoadedDataset,
    Task,
    episode_tensors,
    load_dataset,
    parse_holdout,
    resolve_dim,
)

#: ``target_size`` when none is given, per dimension.
DEFAULT_SIZE = {2: (64, 64), 3: (32, 32, 32)}
#: Batches of an epoch when ``iters_per_epoch`` is 0.
DEFAULT_ITERS = 50

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class InContextConfig(TrainConfig):
    """An in-context segmentation run (plus the loop settings of :class:`TrainConfig`)."""

    task: str = "incontext"
    data: tuple[str, ...] = ()  # nnU-Net raw dataset folders (--data repeated); every label is a task
    stage: int = 1  # 1: k = context_size; 2: k from 1..k_max for half the batches, lr 0.2x unless set
    stage2_lr_factor: float = 0.2  # stage 2 learning rate = lr default x this (when lr is not set)
    context_size: int = 3  # k, context pairs per episode (stage 1; stage 2 the other half)
    k_max: int = 8  # stage 2: largest k drawn
    variable_k: float = 0.5  # stage 2: share of batches whose k is drawn from 1..k_max
    context_chunk: int = 4  # pairs encoded at once; only the last chunk keeps gradients (0: all)
    union_prob: float = 0.5  # share of episodes whose task is a union of labels of one dataset
    max_union: int = 5  # largest union of labels
    holdout_labels: tuple[str, ...] = ()  # never trained on: label NAME or VALUE, or DATASET:LABEL
    dim: int = 0  # 2 or 3; 0 = the datasets' own
    target_size: tuple[int, ...] = ()  # every image resized to this; () = 64x64 in 2D, 32x32x32 in 3D
    normalization: str = "zscore"  # zscore | ct | minmax | none
    zscore_nonzero: bool = False  # z-score statistics over nonzero voxels only
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    val_fraction: float = 0.2  # cases per dataset kept for validation queries
    val_episodes: int = 48  # fixed validation episodes (spread over the tasks)
    augment: bool = True  # flips per image; a random contrast (or negation) per episode
    boundary_tasks: float = 0.25  # share of episodes whose task is the structure's boundary (augment)
    clusters: int = 16  # K soft feature clusters: bins of the context histograms
    encoder_hidden: int = 32  # width of the per-cell encoder on the fixed multi-scale filters
    scales: tuple[int, ...] = (1, 2, 4)  # downscaling factors of the fixed filters
    priors: tuple[str, ...] = PRIORS  # dense prior channels: bayes | likelihood | mean_mask
    features: bool = False  # also give the NCA the query's K cluster channels
    code_dim: int = 16  # task code fed to every cell's rule each step (0: none)
    channels: int = 16  # NCA state: image + priors (+ clusters) + output + hidden
    hidden: int = 64  # width of the rule's MLP
    levels: int = 2  # coarse then fine, as Med-NCA
    scale: int = 2  # resolution factor between levels
    steps: tuple[int, ...] = (16, 16)  # per level, coarsest first
    kernels: tuple[int, ...] = (3, 3)  # learned perception kernel per level
    filters: tuple[str, ...] = ("learned",)
    fire_rate: float = 0.5
    border: str = "reflect"  # zeros | reflect | replicate | circular
    loss: str = "dicefocal"  # dicefocal | dice | focal | bce
    aux_weight: float = 0.5  # weight of the BCE on the naive Bayes prior
    batch_size: int = 8
    plateau_patience: int = 20  # validation episodes are few: their Dice is noisy
    lr: float = 2e-3  # Adam; stage 2 runs at stage2_lr_factor x this unless lr is set
    epochs: int = 30
    iters_per_epoch: int = DEFAULT_ITERS

    @classmethod
    def translate_keys(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Stage 2 fine-tunes: without an explicit ``lr`` it runs at ``stage2_lr_factor`` × the default."""
        if str(values.get("stage", cls.stage)).strip() == "2" and "lr" not in values:
            try:
                factor = float(values.get("stage2_lr_factor", cls.stage2_lr_factor))
            except (TypeError, ValueError):
                return values  # reported by the type check
            return {**values, "lr": cls.lr * factor}
        return values


def check_incontext_config(cfg: InContextConfig) -> None:
    """Reject inconsistent settings.

    Raises:
        NcaError: On a bad value.
    """
    if not cfg.data:
        raise NcaError(f"--data DATASET_DIR is required for task {cfg.task} (repeat it for several datasets)")
    if cfg.stage not in (1, 2):
        raise NcaError(f"stage must be 1 or 2, got {cfg.stage}")
    if cfg.context_size < 1 or cfg.k_max < 1 or cfg.context_chunk < 0 or cfg.max_union < 1:
        raise NcaError("context_size, k_max and max_union must be >= 1, context_chunk >= 0")
    for name in ("variable_k", "union_prob", "boundary_tasks"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise NcaError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.dim not in (0, 2, 3):
        raise NcaError(f"dim must be 2, 3 or 0 (the datasets'), got {cfg.dim}")
    if cfg.loss not in SEG_LOSSES:
        raise NcaError(f"loss must be one of {SEG_LOSSES}, got {cfg.loss!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NcaError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    unknown = [p for p in cfg.priors if p not in PRIORS]
    if unknown:
        raise NcaError(f"priors must come from {', '.join(PRIORS)}, got {unknown}")


def draw_k(cfg: InContextConfig, rng: np.random.Generator) -> int:
    """The context size of a training batch (see the module docstring)."""
    if cfg.stage == 2 and rng.random() < cfg.variable_k:
        return int(rng.integers(1, cfg.k_max + 1))
    return cfg.context_size


def model_config(cfg: InContextConfig, dim: int, in_channels: int) -> InContextModelConfig:
    """The model shape of a run."""
    return InContextModelConfig(
        dim=dim,
        in_channels=in_channels,
        clusters=cfg.clusters,
        encoder_hidden=cfg.encoder_hidden,
        scales=cfg.scales,
        priors=cfg.priors,
        features=cfg.features,
        code_dim=cfg.code_dim,
        channels=cfg.channels,
        hidden=cfg.hidden,
        levels=cfg.levels,
        scale=cfg.scale,
        steps=cfg.steps,
        kernels=cfg.kernels,
        filters=cfg.filters,
        fire_rate=cfg.fire_rate,
        padding=cfg.border,
    )


def working_size(cfg: InContextConfig, dim: int) -> tuple[int, ...]:
    """``target_size``, or the default of ``dim``.

    Raises:
        NcaError: A size of another dimension.
    """
    size = tuple(cfg.target_size) or DEFAULT_SIZE[dim]
    if len(size) != dim or any(s < 4 for s in size):
        raise NcaError(f"target_size needs {dim} values >= 4 for {dim}D data, got {cfg.target_size}")
    return size


def data_config(cfg: Any) -> Any:
    """The normalisation of a run (:class:`ncatool.data.datasets.DataConfig`)."""
    from ncatool.data.datasets import DataConfig

    return DataConfig(
        normalization=cfg.normalization, zscore_nonzero=cfg.zscore_nonzero, ct_window=cfg.ct_window
    )


def episode_loss(
    seg_loss: Any, logits: torch.Tensor, bayes: torch.Tensor, masks: torch.Tensor, aux_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-context loss of a batch (training and :mod:`.adapt`): ``seg_loss`` on the NCA's logits
    plus ``aux_weight`` × BCE on the Bayes prior, all ``(B, 1, *S)``; returns ``(loss, bce)``."""
    aux = F.binary_cross_entropy_with_logits(bayes.float(), masks)
    return seg_loss(logits.float(), masks) + aux_weight * aux, aux


def episode_dice(logits: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """Dice of each episode's thresholded logits ``(B, 1, *S)`` against its mask (NaN rule of
    :func:`ncatool.metrics.dice`)."""
    from ncatool.metrics import dice

    pred = (logits > 0).cpu().numpy()
    ref = masks.cpu().numpy() > 0.5
    return [dice(p, r) for p, r in zip(pred, ref, strict=True)]


class InContextTask:
    """Trains an :class:`InContextNCA` on episodes of the ``--data`` datasets.

    Args:
        cfg: The run config.
        device: Training device.
    """

    score_name = "dice"

    def __init__(self, cfg: InContextConfig, device: torch.device) -> None:
        from ncatool.data.splits import split_cases

        check_incontext_config(cfg)
        self.config = cfg
        self.device = device
        roots = [Path(p) for p in cfg.data]
        self.dim = resolve_dim(roots, cfg.dim)
        self.size = working_size(cfg, self.dim)
        data = data_config(cfg)
        first = load_dataset(roots[0], data, self.size)
        self.in_channels = int(first.images.shape[1])
        self.datasets: list[LoadedDataset] = [first] + [
            load_dataset(r, data, self.size, self.in_channels) for r in roots[1:]
        ]
        self.holdout = parse_holdout(cfg.holdout_labels, self.datasets)
        self.split: list[dict[str, list[str]]] = []
        train_idx, val_idx = [], []
        for i, ds in enumerate(self.datasets):
            kept, held = split_cases(ds.case_names, cfg.val_fraction, cfg.seed + i)
            self.split.append({"train": kept, "val": held})
            pos = {n: j for j, n in enumerate(ds.case_names)}
            train_idx.append([pos[n] for n in kept])
            val_idx.append([pos[n] for n in held])
        self.sampler = EpisodeSampler(self.datasets, train_idx, self.holdout, cfg.union_prob, cfg.max_union)
        self.val_episodes = self._validation_episodes(train_idx, val_idx, held_out=False)
        self.holdout_episodes = self._validation_episodes(train_idx, val_idx, held_out=True)
        self.chunk = cfg.context_chunk
        self.loss_fn = make_seg_loss(cfg.loss)

    # ------------------------------------------------------------------ episodes
    def _validation_episodes(
        self, train_idx: list[list[int]], val_idx: list[list[int]], held_out: bool
    ) -> list[Episode]:
        """Fixed episodes: training tasks with held-out queries, or (``held_out``) the held-out labels
        with queries from every case; contexts from the training cases, ``context_size`` pairs."""
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, 104729))
        tasks = [
            Task(i, (v,))
            for i, ds in enumerate(self.datasets)
            for v in ds.label_values
            if ((i, v) in self.holdout) == held_out
        ]
        if not tasks:
            return []
        per_task = max(1, math.ceil(cfg.val_episodes / len(tasks)))
        episodes = []
        for task in tasks:
            ds = self.datasets[task.dataset]
            present = ds.present(task.labels)
            queries = val_idx[task.dataset] if val_idx[task.dataset] and not held_out else range(len(present))
            queries = [q for q in queries if present[q]]
            pool = [c for c in train_idx[task.dataset] if present[c]]
            for q in queries[:per_task]:
                others = [c for c in pool if c != q]
                if others:
                    ctx = rng.choice(others, size=cfg.context_size, replace=len(others) < cfg.context_size)
                    episodes.append(Episode(task, q, [int(c) for c in ctx]))
        return episodes

    def build_model(self) -> nn.Module:
        """A fresh :class:`InContextNCA`."""
        try:
            return InContextNCA(model_config(self.config, self.dim, self.in_channels))
        except ValueError as err:
            raise NcaError(f"invalid model settings: {err}") from err

    def batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        """Episodes of one k per batch: ``query, query mask, context, context masks`` (see
        :func:`.episodes.episode_tensors`)."""
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, epoch, 11))
        iters = cfg.iters_per_epoch or DEFAULT_ITERS
        for _ in range(iters):
            k = draw_k(cfg, rng)
            episodes = [self.sampler.draw(rng, k) for _ in range(batch_size)]
            tensors = episode_tensors(
                self.datasets, episodes, rng if cfg.augment else None, cfg.boundary_tasks
            )
            yield tuple(t.to(self.device) for t in tensors)  # type: ignore[misc]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Dice+Focal on the NCA's logits plus ``aux_weight`` × BCE on the Bayes prior."""
        query, qmask, context, cmasks = batch
        logits, bayes = model(
            query, context, cmasks, chunk=self.chunk, checkpoint_every=self.config.grad_checkpoint
        )
        loss, aux = episode_loss(self.loss_fn, logits, bayes, qmask, self.config.aux_weight)
        return loss, {"aux": float(aux.detach()), "k": float(context.shape[1])}

    # ------------------------------------------------------------------ validation
    def _run(self, model: nn.Module, episodes: list[Episode]) -> tuple[list[float], list[float], list[Any]]:
        """Dice of the NCA and of the prior per episode, and the predictions (CPU)."""
        from ncatool.tasks.growing import isolated_rng

        dices, priors, preds = [], [], []
        with isolated_rng(self.device):
            torch.manual_seed(self.config.seed)
            for start in range(0, len(episodes), 16):
                part = episodes[start : start + 16]
                query, qmask, context, cmasks = (
                    t.to(self.device) for t in episode_tensors(self.datasets, part)
                )
                stats = model.context_stats(context, cmasks, self.chunk)  # type: ignore[operator]
                logits, bayes = model.segment(query, stats)  # type: ignore[operator]
                dices += episode_dice(logits, qmask)
                priors += episode_dice(bayes, qmask)
                preds += list((logits > 0).cpu())
        return dices, priors, preds

    @staticmethod
    def _task_mean(episodes: list[Episode], values: list[float]) -> float:
        """Mean over tasks of the mean over each task's episodes (NaN left out)."""
        from ncatool.metrics import nanmean

        by_task: dict[Task, list[float]] = {}
        for ep, v in zip(episodes, values, strict=True):
            by_task.setdefault(ep.task, []).append(v)
        return nanmean(nanmean(v) for v in by_task.values())

    def validate(self, model: nn.Module) -> dict[str, float]:
        """``dice`` (the score), ``dice_prior`` and, with held-out labels, ``dice_holdout``."""
        episodes = self.val_episodes
        dices, priors, _ = self._run(model, episodes)
        out = {"dice": self._task_mean(episodes, dices), "dice_prior": self._task_mean(episodes, priors)}
        if self.holdout_episodes:
            held, held_prior, _ = self._run(model, self.holdout_episodes)
            out["dice_holdout"] = self._task_mean(self.holdout_episodes, held)
            out["dice_holdout_prior"] = self._task_mean(self.holdout_episodes, held_prior)
        return out

    def save_samples(self, model: nn.Module, path: Path) -> None:
        """One row per validation episode: two context pairs, then query | reference | prediction."""
        from ncatool.tasks.incontext.pictures import save_episode_panel

        episodes = self.val_episodes[: self.config.samples]
        if not episodes:
            return
        _, _, preds = self._run(model, episodes)
        save_episode_panel(self.datasets, episodes, preds, path)

    def reduce_memory(self) -> str | None:
        """Halve the context chunk (not below one pair)."""
        if self.chunk == 1:
            return None
        self.chunk = max(1, (self.chunk or self.config.context_size) // 2)
        return f"context chunk reduced to {self.chunk} pair(s)"

    def extra_state(self) -> dict[str, Any]:
        """The model shape, the datasets and their splits, and the held-out labels."""
        return {
            "model": model_config(self.config, self.dim, self.in_channels).__dict__,
            "target_size": list(self.size),
            "datasets": [
                {
                    "root": str(ds.root),
                    "name": ds.name,
                    "labels": {str(v): n for v, n in ds.label_names.items()},
                    "split": split,
                }
                for ds, split in zip(self.datasets, self.split, strict=True)
            ],
            "holdout": [f"{self.datasets[d].root.name}:{v}" for d, v in sorted(self.holdout)],
        }
