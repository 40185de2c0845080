"""What the generation tasks (``grow``, ``digits``) share at inference: a model that grows images
from a seed state, scored by its own training validation, animated step by step (with damage).

A generation runner holds the trained NCA and its seed state ``(C, H, W)``; its task module says how
the model is conditioned (nothing for ``grow``, a digit label for ``digits``), how a state becomes a
picture and what the files are called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ncatool.distributed import world
from ncatool.errors import NcaError
from ncatool.runtime import AnimateRequest, Checkpoint, EvalRequest, PredictRequest, autocast


class GenerationRunner:
    """Base of the ``grow`` and ``digits`` runners.

    Args:
        model: The trained model (moved to ``device``, eval mode).
        seed_state: ``(C, H, W)`` state every sample grows from.
        checkpoint: The checkpoint it came from (config, task state, path).
        device: Where to run.
        amp: ``none`` or ``bf16`` autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        seed_state: torch.Tensor,
        checkpoint: Checkpoint,
        device: torch.device,
        amp: str,
    ) -> None:
        self.model = model.eval().to(device)
        self.seed_state = seed_state.to(device)
        self.checkpoint = checkpoint
        self.config: Any = checkpoint.config
        self.task = checkpoint.task
        self.device = device
        self.amp = amp

    # ------------------------------------------------------------------ task specific
    def default_steps(self) -> int:
        """Steps a sample grows when ``--steps`` is not given (as validation grew them)."""
        raise NotImplementedError

    def grow(self, n: int, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` samples after ``steps`` steps from the seed: ``(n, C, H, W)``."""
        raise NotImplementedError

    def write_samples(self, request: PredictRequest, steps: int) -> list[str]:
        """Grow and write the requested samples; return the files."""
        raise NotImplementedError

    #: Index of the first hidden channel (the ones ``--hidden`` shows).
    first_hidden: int = 1

    def animation_start(self) -> tuple[Any, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """``(NCA core, initial states (B, C, H, W), conditioning or None, facts)`` to animate."""
        raise NotImplementedError

    def draw(self, state: torch.Tensor, hidden: int, scale: int) -> np.ndarray:
        """A frame body for ``state`` ``(B, C, H, W)`` (CPU, float32) with ``hidden`` hidden channels."""
        raise NotImplementedError

    def columns(self, batch: int, hidden: int) -> int:
        """Tiles side by side in a frame body."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def seeds(self, n: int) -> torch.Tensor:
        """``n`` copies of the seed state, ``(n, C, H, W)``."""
        return self.seed_state.unsqueeze(0).repeat(n, 1, 1, 1)

    def predict(self, request: PredictRequest) -> dict[str, Any]:
        """Grow ``request.samples`` samples from the seed (seeded) and write them as PNGs."""
        request.refuse(self.task, "input", "ensemble", "native", "context", "context_size", "adapt_steps")
        steps = self.default_steps() if request.steps is None else request.steps
        if steps < 1:
            raise NcaError(f"--steps must be >= 1, got {steps}")
        if request.samples < 1:
            raise NcaError(f"--samples must be >= 1, got {request.samples}")
        torch.manual_seed(request.seed)
        files: list[str] = []
        if world().is_main:  # under torchrun the samples are written once
            with torch.no_grad(), autocast(self.device, self.amp):
                files = self.write_samples(request, steps)
        return {
            "checkpoint": str(self.checkpoint.path),
            "task": self.task,
            "output": str(request.output),
            "steps": steps,
            "samples": request.samples,
            "files": files,
        }

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Score the model with its task's ``test`` (grow: other seeds than the validation that chose
        best.pt, and the trivial baselines beside) or else its validation.

        The training task is rebuilt from the run's config; ``request.data`` replaces the run's data
        path (e.g. when the files moved).

        Returns:
            ``{"task", "checkpoint", "data", "metrics": {...}}`` and, where the task has them,
            ``"baselines": {name: {...}}``.
        """
        request.refuse(self.task, "context_size", "adapt_steps")
        from dataclasses import replace

        from ncatool.evaluate import write_scores
        from ncatool.tasks import make_task

        if request.split != "val" or request.labels is not None or request.ensemble != 1 or request.native:
            raise NcaError(
                f"{self.task} checkpoints are scored by their own validation: --split, --labels, "
                "--ensemble and --native do not apply"
            )
        cfg = self.config
        if request.data is not None:
            cfg = replace(cfg, data=str(request.data))
        task = make_task(replace(cfg, device=str(self.device)), self.device)
        # a task that separates them reports on other seeds than the validation that chose best.pt
        score = getattr(task, "test", task.validate)
        with torch.no_grad(), autocast(self.device, self.amp):
            metrics = {k: float(v) for k, v in score(self.model).items()}
        summary = {
            "task": self.task,
            "checkpoint": str(self.checkpoint.path),
            "data": cfg.data or None,
            "metrics": metrics,
        }
        if hasattr(task, "baselines"):
            summary["baselines"] = task.baselines()
        if request.output is not None:
            write_scores(summary, request.output)
        return summary

    def animation(self, request: AnimateRequest) -> SeedSource:
        """Grow from the seed for the run's validation steps (``--steps`` to change); with damage,
        grow, erase a circle, and regrow for as many steps again (see :mod:`ncatool.animate`).

        Raises:
            NcaError: Options for segmentation, bad steps or damage.
        """
        from ncatool.animate import check_hidden, parse_steps

        request.refuse(
            self.task, "input", "axis", "slice_index", "montage", "context", "context_size", "labels"
        )
        if request.overlay != "mask":
            raise NcaError(f"--overlay applies to segmentation checkpoints, not to {self.task}")
        nca, x, cond, facts = self.animation_start()
        check_hidden(request.hidden, x.shape[1] - self.first_hidden, self.task)
        parsed = parse_steps(request.steps, 1)
        base = self.default_steps()
        explicit = parsed[0] if parsed is not None else None
        at = request.damage_at
        damaged = (
            request.damage
            or at is not None
            or request.damage_center is not None
            or request.damage_radius is not None
        )
        dmg = None
        if damaged:
            if explicit is not None:
                total = explicit  # damage half-way unless --damage-at says otherwise
            elif at is None:
                total, at = 2 * base, base  # grow, then as many steps again to regrow
            else:
                total = at + base
            lo, hi = getattr(self.config, "damage_radius", (0.1, 0.4))
            size = (x.shape[-2], x.shape[-1])
            dmg = resolve_damage(
                total, size, at, request.damage_center, request.damage_radius, (lo, hi), request.seed
            )
        else:
            total = explicit if explicit is not None else base
        columns = self.columns(x.shape[0], request.hidden)
        return SeedSource(nca, self.task, x, int(total), self.draw, columns, cond, request.hidden, dmg, facts)


# --------------------------------------------------------------------------------------------------
# Animation: from the seed, optionally damaged
# --------------------------------------------------------------------------------------------------


@dataclass
class Damage:
    """A circle erased from the state right after ``step`` (centre and radius in grid pixels)."""

    step: int
    center: tuple[float, float]
    radius: float

    def keep_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``(1, 1, H, W)``: 0 inside the circle, 1 outside."""
        ys = torch.arange(height, dtype=torch.float32).view(height, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, width)
        inside = (ys - self.center[0]) ** 2 + (xs - self.center[1]) ** 2 < self.radius**2
        return (~inside).float().view(1, 1, height, width).to(device)


#: ``draw(state (B, C, H, W) on the CPU, hidden, scale)`` → the frame body ``(H', W', 3)`` uint8.
Painter = Callable[[torch.Tensor, int, int], np.ndarray]


@dataclass
class SeedSource:
    """A seed-grown 2D model to animate (the :class:`ncatool.animate.Source` protocol).

    Attributes:
        nca: The :class:`~ncatool.models.nca.NCA` core (eval mode, on its device).
        task: The task name (for messages and the summary).
        seed_state: ``(B, C, H, W)`` initial state.
        total_steps: Steps to run.
        draw: How a state is drawn (the task's :meth:`GenerationRunner.draw`).
        columns: Tiles side by side in the body (for the automatic scale).
        cond: ``(B, cond_channels)`` conditioning (digits: the label embeddings), or None.
        hidden: Hidden channels shown.
        damage: Optional damage.
        facts: Task facts for the summary.
    """

    nca: Any
    task: str
    seed_state: torch.Tensor
    total_steps: int
    draw: Painter
    columns: int
    cond: torch.Tensor | None = None
    hidden: int = 0
    damage: Damage | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def label(self, step: int) -> str:
        text = f"step {step}/{self.total_steps}"
        if self.damage is not None and step >= self.damage.step:
            text += " | damaged" if step == self.damage.step else " | regrowing"
        return text

    def run(self, on_step: Callable[[int, torch.Tensor, int], None]) -> None:
        with torch.no_grad():
            on_step(0, self.seed_state, 0)
            for step, state in enumerate(self._rollout(self.seed_state), 1):
                on_step(step, state, 0)

    def _rollout(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The model's own rollout; with damage, the state at the damage step is the damaged one."""
        if self.damage is None:
            yield from self.nca.rollout(x, self.total_steps, self.cond)
            return
        for step, state in enumerate(self.nca.rollout(x, self.damage.step, self.cond), 1):
            if step < self.damage.step:
                yield state
            x = state
        h, w = x.shape[-2:]
        x = x * self.damage.keep_mask(h, w, x.device).to(x.dtype)
        yield x
        yield from self.nca.rollout(x, self.total_steps - self.damage.step, self.cond)

    def render(self, state: torch.Tensor, level: int, scale: int) -> np.ndarray:
        return self.draw(state.float().cpu(), self.hidden, scale)

    def base_size(self) -> tuple[int, int]:
        h, w = self.seed_state.shape[-2:]
        return max(h, w), self.columns * w

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grid": list(self.seed_state.shape[-2:]), **self.facts}
        if self.damage is not None:
            out["damage"] = {
                "step": self.damage.step,
                "center": [round(c, 2) for c in self.damage.center],
                "radius": round(self.damage.radius, 2),
            }
        return out


def resolve_damage(
    total: int,
    size: tuple[int, int],
    at: int | None,
    center: tuple[float, float] | None,
    radius: float | None,
    radius_range: tuple[float, float],
    seed: int,
) -> Damage:
    """The damage of an animation: at ``at`` (default half-way), a seeded random centre near the
    middle and radius in ``radius_range`` (fractions of the half side) unless given.

    Raises:
        NcaError: A step, centre or radius outside the grid or the run.
    """
    h, w = size
    step = total // 2 if at is None else at
    if not 1 <= step < total:
        raise NcaError(f"--damage-at must be in [1, {total - 1}] (the run has {total} steps), got {step}")
    rng = np.random.default_rng(seed)
    if center is None:
        cy = (h - 1) / 2 + rng.uniform(-0.25, 0.25) * (h - 1)
        cx = (w - 1) / 2 + rng.uniform(-0.25, 0.25) * (w - 1)
        center = (float(cy), float(cx))
    elif not (0 <= center[0] < h and 0 <= center[1] < w):
        raise NcaError(f"--damage-center {center[0]:g},{center[1]:g} is outside the {h}x{w} grid (y,x)")
    if radius is None:
        lo, hi = radius_range
        radius = float(rng.uniform(lo, hi)) * (min(h, w) - 1) / 2
    if radius <= 0:
        raise NcaError(f"--damage-radius must be > 0, got {radius:g}")
    return Damage(step, center, float(radius))
