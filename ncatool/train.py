"""The one training loop, for every task.

A task (segmentation, growing, digits, ...) supplies a model, its training batches, a loss, a
validation score and sample pictures (:class:`Task`); this module does everything else in a fixed
order, as nanoGPT does: seed the epoch; for each batch forward, guard against non-finite values,
backward, clip, step; validate every N epochs; checkpoint atomically; log.

Guards:
    * NaN guard: a non-finite loss or gradient skips the step (logged). After ``nan_patience`` in a
      row the model and optimizer roll back to the last good checkpoint and the learning rate is
      halved. A non-finite model is never written.
    * OOM guard: on out-of-memory the batch is halved (at batch 1, the task's patch) and the epoch
      restarts; when nothing can shrink, training stops with a clear message.

Exact resume: every epoch reseeds Python, NumPy and torch from ``(seed, epoch)`` instead of carrying
RNG states along, so a run resumed from ``last.pt`` (model, optimizer, scheduler, counters) continues
exactly as an uninterrupted run, whatever happened in the killed process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ncatool.config import TrainConfig, config_to_dict
from ncatool.console import info, state, warn
from ncatool.data.io import atomic_path, write_text_atomic
from ncatool.errors import NcaError


class Task(Protocol):
    """What a task gives the training loop."""

    config: TrainConfig
    #: Name of the validation score the loop maximises (e.g. ``"dice"``, ``"psnr"``).
    score_name: str

    def build_model(self) -> nn.Module:
        """A fresh model for this task's config."""
        ...

    def batches(self, epoch: int, batch_size: int) -> Iterator[Any]:
        """Training batches for one epoch (randomness from the global, per-epoch-seeded RNGs)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and extra logged values for a batch."""
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, including ``score_name`` (higher is better)."""
        ...

    def save_samples(self, model: nn.Module, path: Path) -> None:
        """Write a picture of the model's current output to ``path``."""
        ...

    def reduce_memory(self) -> str | None:
        """Shrink a task-side memory knob (e.g. patch size) once; describe it, or None if impossible."""
        ...

    # Optional: ``extra_state() -> dict`` is stored in every checkpoint as ``task_state``, and
    # ``load_extra_state(dict)`` gets it back on resume. Its ``"resume"`` entry (e.g. a sample pool
    # that must survive a resume) is written to ``last.pt`` only, keeping ``best.pt`` small.


def select_device(name: str) -> torch.device:
    """Resolve ``auto`` to cuda, mps or cpu; check an explicit device exists.

    Raises:
        NcaError: The requested device is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise NcaError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NcaError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NcaError(f"device {name!r} requested but MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each epoch of a run."""
    return (seed * 1_000_003 + epoch * 7_919) % 2**63


def is_oom(err: BaseException) -> bool:
    """True for a CUDA/MPS out-of-memory error or a failed CPU allocation."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg
    )


def all_finite(model: nn.Module) -> bool:
    """True if every parameter and buffer of ``model`` is finite."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def autocast_context(device: torch.device, amp: str) -> Any:
    """``torch.autocast`` for ``amp`` in (bf16, fp16), or a no-op context for ``none``."""
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise NcaError(f"amp must be none, bf16 or fp16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class RunState:
    """Counters saved in every checkpoint (what exact resume needs besides the weights)."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_validations: int = 0
    batch_size: int = 8
    nan_skips: int = 0
    rollbacks: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs a :class:`Task` into a run folder.

    Args:
        task: The task.
        run_dir: Output folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``samples/``).
        device: Where to train.
    """

    def __init__(self, task: Task, run_dir: Path, device: torch.device) -> None:
        self.task = task
        self.cfg = task.config
        self.run_dir = Path(run_dir)
        self.device = device
        seed_everything(self.cfg.seed)  # the initial weights depend on the seed alone
        self.model = task.build_model().to(device)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=self.cfg.plateau_factor, patience=self.cfg.plateau_patience
        )
        self.state = RunState(batch_size=self.cfg.batch_size)
        self._initial = self._snapshot()
        self._nan_streak = 0

    # ----------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        kw = {"lr": self.cfg.lr, "betas": self.cfg.betas, "weight_decay": self.cfg.weight_decay}
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, **kw)
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, **kw)
        raise NcaError(f"optimizer must be adam or adamw, got {self.cfg.optimizer!r}")

    @property
    def ckpt_dir(self) -> Path:
        """``run_dir/checkpoints``."""
        return self.run_dir / "checkpoints"

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    # ----------------------------------------------------------- checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to resume or to rebuild the model."""
        return {
            "format": "ncatool-checkpoint-1",
            "task": self.cfg.task,
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "run_state": self.state.__dict__,
            "task_state": self.task.extra_state() if hasattr(self.task, "extra_state") else {},
        }

    def _payload_for(self, name: str) -> dict[str, Any]:
        """The payload of checkpoint ``name``; the task's ``resume`` state only goes into ``last``."""
        payload = self.checkpoint_payload()
        if name != "last":
            payload["task_state"] = {k: v for k, v in payload["task_state"].items() if k != "resume"}
        return payload

    def save_checkpoint(self, name: str) -> Path | None:
        """Write ``checkpoints/<name>.pt`` atomically; refuse a non-finite model.

        Returns:
            The path, or None when the model was not finite (nothing written).
        """
        if not all_finite(self.model):
            warn(f"model has non-finite weights; {name}.pt not written")
            return None
        path = self.ckpt_dir / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self._payload_for(name), tmp)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler and counters from ``path``."""
        payload = load_checkpoint_file(path, self.device)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = RunState(**payload["run_state"])
        if hasattr(self.task, "load_extra_state"):
            self.task.load_extra_state(payload.get("task_state", {}))

    def resume(self) -> None:
        """Continue the run in ``run_dir`` from ``checkpoints/last.pt``.

        ``metrics.jsonl`` is rewritten from the checkpoint's history, dropping lines of an epoch the
        killed process logged but did not checkpoint.
        """
        self.load_checkpoint(self.ckpt_dir / "last.pt")
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        write_text_atomic(lines, self.run_dir / "metrics.jsonl")

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` (or early stopping); return the final summary."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(config_to_dict(cfg), indent=2) + "\n", self.run_dir / "config.json")
        progress = _Progress(enabled=not state.quiet)
        started = time.perf_counter()
        with progress:
            epoch_bar = progress.add("epochs", total=cfg.epochs, completed=self.state.epoch)
            while self.state.epoch < cfg.epochs:
                epoch = self.state.epoch
                t0 = time.perf_counter()
                train_logs = self._train_epoch(epoch, progress)
                record: dict[str, Any] = {"epoch": epoch + 1, **train_logs}
                if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                    record.update(self._validate_and_keep_best(epoch))
                record.update(
                    lr=self.optimizer.param_groups[0]["lr"],
                    batch_size=self.state.batch_size,
                    seconds=round(time.perf_counter() - t0, 3),
                )
                self.state.epoch = epoch + 1
                self.state.history.append(record)
                self.save_checkpoint("last")
                self._append_metrics(record)
                progress.advance(epoch_bar, record)
                if cfg.time_limit and time.perf_counter() - started >= 60.0 * cfg.time_limit:
                    info(f"time limit of {cfg.time_limit:g} min reached after {epoch + 1} epochs")
                    break
                if cfg.early_stop and self.state.bad_validations >= cfg.early_stop:
                    info(
                        f"early stopping after {epoch + 1} epochs (no improvement in {cfg.early_stop} validations)"
                    )
                    break
        self._plot_curves()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run."""
        last = self.state.history[-1] if self.state.history else {}
        return {
            "run_dir": str(self.run_dir),
            "task": self.cfg.task,
            "epochs": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            f"best_{self.task.score_name}": self.state.best_score,
            "last": last,
            "nan_skips": self.state.nan_skips,
            "rollbacks": self.state.rollbacks,
            "batch_size": self.state.batch_size,
            "params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }

    def _train_epoch(self, epoch: int, progress: _Progress) -> dict[str, float]:
        """One epoch; restarts with a smaller batch after an out-of-memory error."""
        while True:
            seed_everything(epoch_seed(self.cfg.seed, epoch))
            try:
                return self._run_batches(epoch, progress)
            except Exception as err:
                if not is_oom(err):
                    raise
                self._shrink_after_oom(err)

    def _shrink_after_oom(self, err: BaseException) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.state.batch_size > 1:
            self.state.batch_size //= 2
            warn(
                f"out of memory ({type(err).__name__}); batch size halved to {self.state.batch_size}, retrying"
            )
            return
        what = self.task.reduce_memory()
        if what is None:
            raise NcaError(
                "out of memory even at batch size 1 and the smallest patch; use a smaller "
                "target_size/patch, fewer channels, grad_checkpoint, or another device"
            ) from err
        warn(f"out of memory at batch size 1; {what}, retrying")

    def _run_batches(self, epoch: int, progress: _Progress) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = progress.add(f"epoch {epoch + 1}", total=None)
        for batch in self.task.batches(epoch, self.state.batch_size):
            logs = self._step(batch)
            if logs is None:
                continue
            n += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.advance(bar, {**logs, "lr": self.optimizer.param_groups[0]["lr"]})
        progress.remove(bar)
        out = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        out["steps"] = n
        return out

    def _step(self, batch: Any) -> dict[str, float] | None:
        """One optimisation step; None if it was skipped by the NaN guard."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.cfg.amp):
            loss, logs = self.task.loss(self.model, batch)
        if not torch.isfinite(loss):
            self._non_finite("loss")
            return None
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(gnorm):
            self._non_finite("gradient")
            return None
        self.optimizer.step()
        self._nan_streak = 0
        return {"loss": float(loss.detach()), **logs}

    def _non_finite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nan_skips += 1
        self._nan_streak += 1
        warn(f"non-finite {what}; step skipped ({self._nan_streak} in a row)")
        if self._nan_streak >= self.cfg.nan_patience:
            self._roll_back()

    def _roll_back(self) -> None:
        """Reload the last good weights and halve the learning rate."""
        last = self.ckpt_dir / "last.pt"
        if last.exists():
            payload = load_checkpoint_file(last, self.device)
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            source = str(last)
        else:
            self.model.load_state_dict(self._initial["model"])
            self.optimizer.load_state_dict(self._initial["optimizer"])
            source = "the initial weights"
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5
        self.state.rollbacks += 1
        self._nan_streak = 0
        warn(f"rolled back to {source}; learning rate halved to {self.optimizer.param_groups[0]['lr']:.3g}")

    def _validate_and_keep_best(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), autocast_context(self.device, self.cfg.amp):
            metrics = self.task.validate(self.model)
            if self.cfg.samples > 0:
                self.task.save_samples(self.model, self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png")
        score = float(metrics[self.task.score_name])
        if math.isfinite(score):
            self.scheduler.step(score)
        if math.isfinite(score) and score > self.state.best_score:
            self.state.best_score = score
            self.state.best_epoch = epoch + 1
            self.state.bad_validations = 0
            self.save_checkpoint("best")
        else:
            self.state.bad_validations += 1
        return {f"val_{k}": v for k, v in metrics.items()}

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _plot_curves(self) -> None:
        """``loss_curve.png``: training loss and validation score per epoch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.state.history
        if not hist:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(
            [h["epoch"] for h in hist], [h.get("train_loss", float("nan")) for h in hist], label="train loss"
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        key = f"val_{self.task.score_name}"
        val = [(h["epoch"], h[key]) for h in hist if key in h]
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val, strict=True), color="tab:orange", marker="o", label=key)
            ax2.set_ylabel(key)
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        fig.tight_layout()
        with atomic_path(self.run_dir / "loss_curve.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)


def load_checkpoint_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load an ncatool checkpoint.

    Raises:
        NcaError: Missing or not an ncatool checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise NcaError("checkpoint does not exist", path)
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch raises many types for corrupt files
        raise NcaError(f"cannot read checkpoint ({type(err).__name__})", path) from err
    if not isinstance(payload, dict) or payload.get("format") != "ncatool-checkpoint-1":
        raise NcaError("not an ncatool checkpoint", path)
    return payload


class _Progress:
    """Rich progress bars on stderr (epochs and batches), or nothing with ``--quiet``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and os.environ.get("NCATOOL_NO_PROGRESS") is None
        self._p: Any = None
        self._t0: dict[int, float] = {}
        self._done: dict[int, int] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from ncatool.console import err

            self._p = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=err,
                transient=False,
            )
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add(self, description: str, total: int | None, completed: int = 0) -> int:
        if self._p is None:
            return 0
        task_id = int(self._p.add_task(description, total=total, completed=completed, stats=""))
        self._t0[task_id] = time.perf_counter()
        self._done[task_id] = 0
        return task_id

    def advance(self, task_id: int, stats: dict[str, Any]) -> None:
        if self._p is None:
            return
        self._done[task_id] += 1
        rate = self._done[task_id] / max(time.perf_counter() - self._t0[task_id], 1e-9)
        shown = {k: v for k, v in stats.items() if isinstance(v, float | int) and k not in ("epoch", "steps")}
        text = " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6])
        self._p.update(task_id, advance=1, stats=f"{text} it/s={rate:.2f}")

    def remove(self, task_id: int) -> None:
        if self._p is not None:
            self._p.remove_task(task_id)
