"""Multi-level segmentation NCAs: Med-NCA (2D, two levels) and M3D-NCA (3D, n levels).

Level 0 runs on the image downscaled by ``scale ** (levels - 1)``; each next level upsamples the
previous level's hidden channels by ``scale``, concatenates them with the image at its own
resolution and runs its own NCA. In training, levels above 0 may run on random patches (the label
is cropped to match); at inference every level sees the whole image, whatever its size.
:meth:`SegmentationNCA.states` yields every step's state (animation); ``forward(...,
step_budget=...)`` runs every step in slabs (large volumes in little memory, the same result).

The state of every level is ``[image channels (fixed) | output channels | hidden channels]``; the
logits are the ``n_out`` channels right after the image channels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ncatool.errors import NcaError
from ncatool.models.nca import NCA, NCAConfig


@dataclass(frozen=True)
class SegModelConfig:
    """Multi-level segmentation NCA.

    Attributes:
        dim: 2 (Med-NCA) or 3 (M3D-NCA).
        in_channels: Image channels.
        n_out: Output channels (one per foreground label).
        channels: State channels per level (image + outputs + hidden).
        hidden: MLP width.
        levels: Number of resolution levels.
        scale: Down/up-sampling factor between consecutive levels.
        steps: Steps per level, lowest resolution first.
        kernels: Learned perception kernel size per level (M3D-NCA: 7 at the coarse level, 3 above).
        filters: Perception filters (``learned`` or fixed names).
        fire_rate: Probability a cell updates per step.
        padding: Perception border mode.
        patch: Training patch edge per level (0 = whole image); level 0 always sees the whole image.
    """

    dim: int = 2
    in_channels: int = 1
    n_out: int = 1
    channels: int = 16
    hidden: int = 128
    levels: int = 2
    scale: int = 4
    steps: tuple[int, ...] = (64, 64)
    kernels: tuple[int, ...] = (7, 3)
    filters: tuple[str, ...] = ("learned",)
    fire_rate: float = 0.5
    padding: str = "reflect"
    patch: tuple[int, ...] = (0, 0)


def check_seg_config(cfg: SegModelConfig) -> None:
    """Raise ``ValueError`` for an inconsistent segmentation config."""
    for name in ("steps", "kernels", "patch"):
        if len(getattr(cfg, name)) != cfg.levels:
            raise ValueError(f"{name} needs one value per level ({cfg.levels}), got {getattr(cfg, name)}")
    if cfg.in_channels + cfg.n_out >= cfg.channels:
        raise ValueError(
            f"channels ({cfg.channels}) must exceed image channels + outputs ({cfg.in_channels + cfg.n_out})"
        )
    if cfg.scale < 1:
        raise ValueError(f"scale must be >= 1, got {cfg.scale}")


@dataclass
class SegOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``(B, n_out, *S')``; S' is the full image size, or the patch in training.
        window: Per spatial axis ``(start, stop)`` in full-resolution voxels covered by ``logits``.
        states: Intermediate states per level (only when asked for), each ``(B, C, *S_level)``.
    """

    logits: torch.Tensor
    window: tuple[tuple[int, int], ...]
    states: list[list[torch.Tensor]] | None = None


def image_pyramid(image: torch.Tensor, levels: int, scale: int) -> list[torch.Tensor]:
    """Area-downscaled copies of the image, coarsest first.

    Args:
        image: ``(B, C, *S)``.
        levels: Number of levels.
        scale: Factor between levels.

    Returns:
        ``levels`` tensors; the last is ``image`` itself.
    """
    out = [image]
    for _ in range(levels - 1):
        prev = out[0]
        size = [max(1, s // scale) for s in prev.shape[2:]]
        out.insert(0, F.interpolate(prev, size=size, mode="area"))
    return out


def random_window(
    shape: tuple[int, ...], patch: int, generator: torch.Generator | None
) -> tuple[tuple[int, int], ...]:
    """A random window of edge ``patch`` (clipped to the shape) inside ``shape``."""
    window = []
    for s in shape:
        p = min(patch, s)
        start = int(torch.randint(0, s - p + 1, (1,), generator=generator)) if s > p else 0
        window.append((start, start + p))
    return tuple(window)


def crop(x: torch.Tensor, window: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Crop the spatial axes of ``(B, C, *S)`` to ``window``."""
    return x[(slice(None), slice(None), *(slice(a, b) for a, b in window))]


class SegmentationNCA(nn.Module):
    """Med-NCA / M3D-NCA multi-level segmentation.

    Args:
        cfg: The :class:`SegModelConfig`.
    """

    def __init__(self, cfg: SegModelConfig) -> None:
        super().__init__()
        check_seg_config(cfg)
        self.cfg = cfg
        base = NCAConfig(
            channels=cfg.channels,
            fixed_channels=cfg.in_channels,
            hidden=cfg.hidden,
            dim=cfg.dim,
            filters=cfg.filters,
            fire_rate=cfg.fire_rate,
            padding=cfg.padding,
        )
        self.levels = nn.ModuleList(NCA(replace(base, learned_kernel=k)) for k in cfg.kernels)

    def forward(
        self,
        image: torch.Tensor,
        patch: tuple[int, ...] | None = None,
        generator: torch.Generator | None = None,
        return_states: bool = False,
        checkpoint_every: int = 0,
        step_budget: int | None = None,
    ) -> SegOutput:
        """Segment an image.

        Args:
            image: ``(B, in_channels, *S)``, normalised.
            patch: Patch edge per level for training (0 = whole), e.g. ``cfg.patch``; None runs every
                level on the whole image (inference).
            generator: Random source for the patch positions.
            return_states: Keep every intermediate state (animation).
            checkpoint_every: Gradient checkpointing chunk (0 = off).
            step_budget: Low-memory inference: every step runs in slabs with about this many bytes of
                temporaries, into two state buffers (:mod:`ncatool.models.slabs`); gradients must be
                off and ``patch`` None. The same result as without it, from the same random draws.

        Returns:
            A :class:`SegOutput`; ``window`` maps the logits back to full-resolution voxels.
        """
        cfg = self.cfg
        if step_budget is not None and patch is not None:
            raise ValueError("step_budget is for inference on the whole image: pass patch=None")
        pyramid = image_pyramid(image, cfg.levels, cfg.scale)
        # window of the current state, in that level's voxel coordinates
        window = tuple((0, s) for s in pyramid[0].shape[2:])
        state = image.new_zeros(0)
        all_states: list[list[torch.Tensor]] = []
        for level, nca in enumerate(self.levels):
            state, window = self._level_input(level, pyramid, state, window, patch, generator)
            steps = cfg.steps[level]
            if return_states:
                state, states = nca(state, steps, return_states=True, step_budget=step_budget)
                all_states.append(states)
            else:
                state = nca(state, steps, checkpoint_every=checkpoint_every, step_budget=step_budget)
        # The last level is at full resolution, so its window is in full-resolution voxels.
        logits = state[:, cfg.in_channels : cfg.in_channels + cfg.n_out]
        return SegOutput(logits=logits, window=window, states=all_states if return_states else None)

    def states(
        self, image: torch.Tensor, step_budget: int | None = None, steps: Sequence[int] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Inference step by step: every level on the whole image, as :meth:`forward` with no patch.

        Args:
            image: ``(B, in_channels, *S)``, normalised.
            step_budget: As for :meth:`forward` (slabs; call under ``torch.no_grad()``).
            steps: Steps per level instead of ``cfg.steps`` (e.g. to watch a model run longer).

        Yields:
            ``(level, step, state)``: ``step`` 0 is the level's initial state, ``step`` k the state
            after its k-th step; ``state`` is ``(B, C, *S_level)`` (channels-last in memory). The
            logits of the last state are what :meth:`forward` returns for the same random draws.
        """
        cfg = self.cfg
        pyramid = image_pyramid(image, cfg.levels, cfg.scale)
        window = tuple((0, s) for s in pyramid[0].shape[2:])
        state = image.new_zeros(0)
        for level, nca in enumerate(self.levels):
            state, window = self._level_input(level, pyramid, state, window, None, None)
            yield level, 0, state
            n = cfg.steps[level] if steps is None else steps[level]
            for step, new in enumerate(nca.rollout(state, n, step_budget=step_budget), 1):
                state = new
                yield level, step, state

    def _level_input(
        self,
        level: int,
        pyramid: list[torch.Tensor],
        previous: torch.Tensor,
        window: tuple[tuple[int, int], ...],
        patch: tuple[int, ...] | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """The initial state of ``level`` and its window (in that level's voxels).

        Level 0 starts from zeros; a later level from the ``previous`` level's final state, whose
        hidden channels are upsampled (nearest) and, with a ``patch``, cropped to a random window.
        """
        cfg = self.cfg
        img = pyramid[level]
        if level == 0:
            zeros = img.new_zeros((img.shape[0], cfg.channels - cfg.in_channels, *img.shape[2:]))
            state = torch.cat([img, zeros], dim=1)
        else:
            factor = [img.shape[2 + i] / pyramid[level - 1].shape[2 + i] for i in range(cfg.dim)]
            window = tuple(
                (round(a * f), min(round(b * f), img.shape[2 + i]))
                for i, ((a, b), f) in enumerate(zip(window, factor, strict=True))
            )
            size = [b - a for a, b in window]
            hidden = F.interpolate(previous[:, cfg.in_channels :], size=size, mode="nearest")
            if patch is not None and patch[level] > 0:
                sub = random_window(tuple(size), patch[level], generator)
                hidden = crop(hidden, sub)
                window = tuple((a + sa, a + sb) for (a, _), (sa, sb) in zip(window, sub, strict=True))
            state = torch.cat([crop(img, window), hidden], dim=1)
        check_level_size(state.shape[2:], cfg.kernels[level], cfg.padding, level)
        return state, window

    @torch.no_grad()
    def predict_proba(self, image: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities ``(B, n_out, *S)`` for a whole image ``(B, in_channels, *S)``."""
        return torch.sigmoid(self.forward(image).logits.float())


def check_level_size(size: torch.Size, kernel: int, padding: str, level: int) -> None:
    """Refuse a level whose grid is too small for its perception kernel under reflect padding.

    Raises:
        NcaError: Some axis is not longer than ``max(kernel, 3) // 2`` voxels.
    """
    pad = max(kernel, 3) // 2
    if padding == "reflect" and min(size) <= pad:
        raise NcaError(
            f"level {level} runs on a {'x'.join(str(s) for s in size)} grid, too small for its "
            f"{kernel}-voxel kernel with reflect padding (every axis needs more than {pad} voxels): "
            "use larger images (target_size), fewer levels, a smaller scale or kernels, or padding=zeros"
        )


def probs_to_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-channel probabilities to an integer label map.

    Args:
        probs: ``(B, n_out, *S)`` sigmoid outputs, channel ``k`` for label ``k + 1``.
        threshold: A voxel is foreground if its highest probability exceeds this.

    Returns:
        ``(B, *S)`` int64 labels in ``0..n_out``.
    """
    best, idx = probs.max(dim=1)
    return torch.where(best > threshold, idx + 1, torch.zeros_like(idx))
