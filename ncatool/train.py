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

import contextlib
import copy
import json
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ncatool.config import TrainConfig, config_to_dict
from ncatool.console import ProgressBars, info, warn
from ncatool.data.io import atomic_path, write_text_atomic
from ncatool.distributed import world
from ncatool.errors import NcaError
from ncatool.loggers import make_logger
from ncatool.runtime import autocast, checkpoint_payload, read_checkpoint, write_checkpoint


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

    # Optional: ``final_scores(best_checkpoint_path) -> dict`` adds scores of best.pt to the run's
    # summary (e.g. computed exactly as ``ncatool eval`` computes them).
    # Optional: ``extra_state() -> dict`` is stored in every checkpoint as ``task_state``, and
    # ``load_extra_state(dict)`` gets it back on resume. Its ``"resume"`` entry (e.g. a sample pool
    # that must survive a resume) is written to ``last.pt`` only, keeping ``best.pt`` small.


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
        self.world = world()
        seed_everything(self.cfg.seed)  # the initial weights depend on the seed alone
        self.model = task.build_model().to(device)
        # what the task's loss runs: under torchrun the model wrapped in DDP (gradients averaged over
        # ranks during backward); checkpoints, validation and samples use the plain model
        self.net: nn.Module = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.state = RunState(batch_size=self.cfg.batch_size)
        self._initial = self._snapshot()
        self._nan_streak = 0
        self._stop = StopSignals()  # replaced by the active one in fit()
        self.logger = make_logger(self.cfg.logger if self.world.is_main else "none", self.run_dir)

    # ----------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        kw = {"lr": self.cfg.lr, "betas": self.cfg.betas, "weight_decay": self.cfg.weight_decay}
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, **kw)
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, **kw)
        raise NcaError(f"optimizer must be adam or adamw, got {self.cfg.optimizer!r}")

    def _make_scheduler(self) -> Any:
        """``plateau`` steps once per validation on its score; ``step`` once per optimiser step."""
        cfg = self.cfg
        if cfg.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
        if cfg.lr_schedule == "step":
            if any(m < 1 for m in cfg.lr_milestones) or not 0.0 < cfg.lr_gamma <= 1.0:
                raise NcaError(
                    f"lr_milestones must be >= 1 and lr_gamma in (0, 1], got {cfg.lr_milestones} and {cfg.lr_gamma}"
                )
            return torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, milestones=sorted(cfg.lr_milestones), gamma=cfg.lr_gamma
            )
        raise NcaError(f"lr_schedule must be plateau or step, got {cfg.lr_schedule!r}")

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
        return checkpoint_payload(
            self.cfg,
            self.model,
            self.task.extra_state() if hasattr(self.task, "extra_state") else {},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            run_state=self.state.__dict__,
        )

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
        if not self.world.is_main:
            return None
        return write_checkpoint(self._payload_for(name), self.ckpt_dir / f"{name}.pt")

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler and counters from ``path``."""
        payload = read_checkpoint(path, self.device)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = RunState(**payload["run_state"])
        if hasattr(self.task, "load_extra_state"):
            self.task.load_extra_state(payload.get("task_state", {}))

    def init_weights(self, path: Path) -> None:
        """Start from the weights of checkpoint ``path`` (of the same task and model shape) with this
        run's fresh optimizer, scheduler and counters (``ncatool train --init``); a NaN rollback
        before the first checkpoint returns to these weights.

        Raises:
            NcaError: Unreadable checkpoint, another task, or weights that do not fit the model.
        """
        payload = read_checkpoint(path, self.device)
        if payload.get("task") != self.cfg.task:
            raise NcaError(f"--init checkpoint is a {payload.get('task')} run, not {self.cfg.task}", path)
        try:
            self.model.load_state_dict(payload.get("model") or {})
        except (RuntimeError, KeyError) as err:
            raise NcaError(f"--init weights do not fit this run's model ({err})", path) from err
        self._initial = self._snapshot()
        info(f"weights initialised from {path}")

    def resume(self) -> None:
        """Continue the run in ``run_dir`` from ``checkpoints/last.pt``.

        ``metrics.jsonl`` is rewritten from the checkpoint's history, dropping lines of an epoch the
        killed process logged but did not checkpoint.
        """
        self.load_checkpoint(self.ckpt_dir / "last.pt")
        if self.world.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
            write_text_atomic(lines, self.run_dir / "metrics.jsonl")

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` (or early stopping); return the final summary.

        SIGTERM / SIGINT (cluster preemption, Ctrl-C) stop the run at the next batch: the epoch in
        progress is abandoned (it would be replayed identically on resume, since every epoch is
        seeded), ``last.pt`` stays the last completed epoch, and :class:`Stopped` says how to resume.
        A second signal stops at once.

        Raises:
            Stopped: A stop signal arrived.
        """
        with StopSignals() as stop:
            self._stop = stop
            try:
                return self._fit()
            except Stopped as stopped:
                raise Stopped(
                    stopped.signum,
                    f"stopped by {signal.Signals(stopped.signum).name} during epoch {self.state.epoch + 1}; "
                    f"checkpoints/last.pt holds epoch {self.state.epoch}. Resume with: "
                    f"ncatool train --resume {self.run_dir}",
                ) from None

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        main = self.world.is_main
        self.world.shard_size(self.state.batch_size)  # refuse a global batch the ranks cannot share
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(json.dumps(config_to_dict(cfg), indent=2) + "\n", self.run_dir / "config.json")
        progress = ProgressBars(enabled=main)
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
                if main:
                    self._append_metrics(record)
                    self.logger.log_metrics(record)
                progress.advance(epoch_bar, record)
                out_of_time = cfg.time_limit and time.perf_counter() - started >= 60.0 * cfg.time_limit
                if self.world.broadcast(bool(out_of_time)):  # rank 0's clock decides for all
                    info(f"time limit of {cfg.time_limit:g} min reached after {epoch + 1} epochs")
                    break
                if cfg.early_stop and self.state.bad_validations >= cfg.early_stop:
                    info(
                        f"early stopping after {epoch + 1} epochs (no improvement in {cfg.early_stop} validations)"
                    )
                    break
        if main:
            self._plot_curves()
        summary = self.summary()
        self.world.barrier()  # best.pt is written (by rank 0) before anyone reads it
        best = self.ckpt_dir / "best.pt"
        if hasattr(self.task, "final_scores") and best.is_file():
            summary.update(self.task.final_scores(best))
        return summary

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

    def _train_epoch(self, epoch: int, progress: ProgressBars) -> dict[str, float]:
        """One epoch; restarts with a smaller batch after an out-of-memory error."""
        while True:
            seed_everything(epoch_seed(self.cfg.seed, epoch))
            try:
                return self._run_batches(epoch, progress)
            except Exception as err:
                if not is_oom(err):
                    raise
                if self.world.distributed:  # the other ranks wait inside a collective: no way back
                    raise NcaError(
                        f"out of memory on rank {self.world.rank}; a distributed run does not shrink its "
                        "batch: resume with a smaller batch_size, target_size/patch or grad_checkpoint"
                    ) from err
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

    def _run_batches(self, epoch: int, progress: ProgressBars) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = progress.add(f"epoch {epoch + 1}", total=None)
        for batch in self.task.batches(epoch, self.state.batch_size):
            if self.world.any(self._stop.signum is not None):  # every rank stops at the same batch
                raise Stopped(self._stop.signum or signal.SIGTERM)
            logs = self._step(batch)
            if logs is None:
                continue
            n += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.advance(bar, {**logs, "lr": self.optimizer.param_groups[0]["lr"]})
        progress.remove(bar)
        self._stop.check()
        out = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        if self.world.distributed:  # each rank saw its share: the run's numbers are the ranks' mean
            shares = self.world.gather(out)
            out = {k: sum(share[k] for share in shares) / len(shares) for k in out}
        out["steps"] = n
        return out

    def _step(self, batch: Any) -> dict[str, float] | None:
        """One optimisation step; None if it was skipped by the NaN guard.

        Under torchrun each rank runs its share of the global batch (fire masks drawn for the whole
        batch and sliced, so the step is the single-process step); DDP averages the gradients.
        """
        from ncatool.models.shard import batch_shard

        self.optimizer.zero_grad(set_to_none=True)
        size = batch_size_of(batch)
        offset = self.world.rank * size // self.world.size
        with batch_shard(offset, size):
            batch = self.world.shard(batch, size)
            with autocast(self.device, self.cfg.amp):
                loss, logs = self.task.loss(self.net, batch)
            if self.world.any(not bool(torch.isfinite(loss))):  # skipped on every rank, or on none
                self._non_finite("loss")
                return None
            loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 and not self.cfg.grad_normalize else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        if self.world.any(not bool(torch.isfinite(gnorm))):
            self._non_finite("gradient")
            return None
        if self.cfg.grad_normalize:
            # Growing NCA: every tensor's update direction counts alike, whatever its gradient's scale
            # (the late layers' gradients are orders of magnitude larger than the perception's)
            for p in params:
                p.grad.div_(p.grad.norm() + 1e-8)
        self.optimizer.step()
        if self.cfg.lr_schedule == "step":
            self.scheduler.step()
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
            payload = read_checkpoint(last, self.device)
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
        metrics: dict[str, float] = {}
        if self.world.is_main:  # validated once, on rank 0; every rank takes its numbers
            with torch.no_grad(), autocast(self.device, self.cfg.amp):
                metrics = self.task.validate(self.model)
                if self.cfg.samples > 0:
                    self.task.save_samples(
                        self.model, self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png"
                    )
                    self.logger.log_image(self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png", epoch + 1)
        metrics = self.world.broadcast(metrics)
        score = float(metrics[self.task.score_name])
        if math.isfinite(score) and self.cfg.lr_schedule == "plateau":
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


@contextlib.contextmanager
def lock_run_folder(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """Own ``run_dir`` for this run: a second ``ncatool train`` into it is refused while it runs.

    An exclusive ``flock`` on ``run_dir/.lock``: the kernel drops it when the process ends, however it
    ends (SIGKILL included), so a killed run never leaves the folder stuck. Only rank 0 holds it.

    Raises:
        NcaError: Another process holds the folder.
    """
    if not hold:
        yield
        return
    import fcntl

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fh = open(path, "a+")  # noqa: SIM115  (held open for the whole run)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise NcaError(
                f"run folder is in use by another ncatool train ({owner}); wait or use another --out", run_dir
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        fh.close()
        if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
            # the run failed before writing anything (e.g. a setting the task refused): leave no folder
            path.unlink(missing_ok=True)
            run_dir.rmdir()


def batch_size_of(batch: Any) -> int:
    """Items in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    for item in batch:
        if isinstance(item, torch.Tensor) and item.dim():
            return int(item.shape[0])
    raise TypeError("a batch must hold at least one tensor with a batch dimension")


class Stopped(NcaError):
    """Training stopped by a signal; the CLI exits with ``128 + signum`` (the shell's convention)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a request the loop honours at its next safe point.

    The handlers are installed only in the main thread (Python allows no other) and the previous
    ones are restored on exit. A second signal raises :class:`Stopped` immediately.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Stopped(signum)
        self.signum = signum
        warn(f"{signal.Signals(signum).name} received: stopping after this batch (again to stop at once)")

    def check(self) -> None:
        """Raise :class:`Stopped` if a signal arrived."""
        if self.signum is not None:
            raise Stopped(self.signum)
