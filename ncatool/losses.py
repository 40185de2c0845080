"""Losses for segmentation NCAs (Dice, focal, BCE and their sum, as Med-NCA trains with).

Inputs are logits ``(B, K, *S)`` and binary targets of the same shape (one channel per foreground
label). Each loss is a plain module; :class:`DiceFocalLoss` is ``w_dice * Dice + w_focal * Focal``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - (2|P∩T| + s) / (|P| + |T| + s)`` on sigmoid probabilities.

    The overlap is summed over space per sample and channel, then averaged over both.

    Args:
        smooth: Additive smoothing ``s`` (keeps empty targets finite).
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` logits and targets → scalar loss."""
        _check_shapes(logits, target)
        probs = torch.sigmoid(logits.float()).flatten(2)
        tgt = target.float().flatten(2)
        inter = (probs * tgt).sum(-1)
        denom = probs.sum(-1) + tgt.sum(-1)
        return (1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)).mean()


class FocalLoss(nn.Module):
    """Binary focal loss ``-α_t (1 - p_t)^γ log p_t``, averaged over all elements.

    Args:
        gamma: Focusing parameter γ (0 gives BCE).
        alpha: Weight of the positive class in [0, 1], or None for no class weighting.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` logits and targets → scalar loss."""
        _check_shapes(logits, target)
        logits = logits.float()
        target = target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = torch.exp(-bce)
        loss = (1.0 - p_t) ** self.gamma * bce
        if self.alpha is not None:
            loss = (self.alpha * target + (1.0 - self.alpha) * (1.0 - target)) * loss
        return loss.mean()


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, averaged over all elements."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` logits and targets → scalar loss."""
        _check_shapes(logits, target)
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class DiceFocalLoss(nn.Module):
    """``dice_weight * Dice + focal_weight * Focal`` (seed 000's combination).

    Args:
        dice_weight: Weight of the Dice term.
        focal_weight: Weight of the focal term.
        gamma: Focal γ.
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.dice = DiceLoss()
        self.focal = FocalLoss(gamma=gamma)
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` logits and targets → scalar loss."""
        return self.dice_weight * self.dice(logits, target) + self.focal_weight * self.focal(logits, target)


SEG_LOSSES = ("dicefocal", "dice", "focal", "bce")


def make_seg_loss(name: str, dice_weight: float = 1.0, focal_weight: float = 1.0) -> nn.Module:
    """Build a segmentation loss by name (one of :data:`SEG_LOSSES`)."""
    if name == "dicefocal":
        return DiceFocalLoss(dice_weight, focal_weight)
    if name == "dice":
        return DiceLoss()
    if name == "focal":
        return FocalLoss()
    if name == "bce":
        return BCELoss()
    raise ValueError(f"unknown loss {name!r}; choose from {SEG_LOSSES}")
