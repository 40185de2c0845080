"""Image-to-image losses and PSNR for generative NCAs (``grow``, ``digits``).

Every loss compares a prediction ``x`` with a target ``t`` of the same shape ``(B, C, *S)`` and
returns one value per sample, shape ``(B,)``, so a sample pool can rank its samples; the training loss
is the batch mean of these values. With ``N = C * prod(S)`` elements per sample:

* ``L2``: ``sum((x - t)**2) / N``, the mean squared error (Growing NCA's loss).
* ``L1``: ``sum(|x - t|) / N``, the mean absolute error.
* ``Manhattan``: ``sum(|x - t|)``, the Manhattan distance between the two images as vectors (the
  same distance as L1, summed instead of averaged).
* ``Hinge``: ``sum(max(0, |x - t| - m)) / N``, the epsilon-insensitive hinge with margin ``m``.

L1 and Manhattan are mathematically the same distance: ``Manhattan = N * L1`` for every sample, so
they rank pool samples identically and their gradients point the same way. They differ only in
scale, which matters in two places: the logged loss values, and the loop's gradient clipping
(``grad_clip``, default 1.0 on the global norm). Manhattan's gradient is ``N`` times larger, so it
is clipped at almost every step, which makes each step a unit-norm, direction-only update before
Adam; with L1 the clip rarely acts (measured on the retina target, 24x24 grid, batch 8: gradient
norms 0.1-0.25 with L1, 250-590 with Manhattan). Adam itself is (up to its epsilon) invariant to a constant
gradient scale, so apart from clipping the two train alike. Both names are kept because seed 001
offers both; choose L1 unless you want the clipped behaviour.

``Hinge`` is the epsilon-insensitive (support-vector-regression) hinge: errors smaller than the
margin ``m`` cost nothing, larger ones cost linearly beyond the margin. It stops pushing on pixels
that are already within ``m`` of the target (PSNR above about ``-20 log10(m)`` dB is not rewarded)
and spends the update on the pixels that are still wrong. ``m = 0`` gives L1.

PSNR (``psnr``) is ``10 log10(1 / MSE)`` in dB per sample, with the prediction clipped to ``[0, 1]``
(peak value 1) and the MSE over all ``N`` elements; identical images give ``inf`` unless ``max_db``
caps it.
"""

from __future__ import annotations

import torch

IMAGE_LOSSES: tuple[str, ...] = ("L1", "L2", "Manhattan", "Hinge")


def canonical_loss_name(name: str) -> str:
    """Map a loss name in any letter case (``l2``, ``manhattan``) to its entry in :data:`IMAGE_LOSSES`.

    Raises:
        ValueError: For an unknown name.
    """
    for known in IMAGE_LOSSES:
        if name.lower() == known.lower():
            return known
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(IMAGE_LOSSES)}")


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 2:
        raise ValueError(f"expected (B, C, *S) tensors, got shape {tuple(pred.shape)}")


def per_sample_loss(
    name: str, pred: torch.Tensor, target: torch.Tensor, margin: float = 0.02
) -> torch.Tensor:
    """The named loss for each sample (see the module docstring for the formulas).

    Args:
        name: ``L1``, ``L2``, ``Manhattan`` or ``Hinge`` (any letter case).
        pred: Prediction ``(B, C, *S)``.
        target: Target, same shape.
        margin: Hinge margin ``m`` (ignored by the other losses).

    Returns:
        ``(B,)`` float32 losses.
    """
    _check(pred, target)
    kind = canonical_loss_name(name)
    diff = (pred.float() - target.float()).flatten(1)
    if kind == "L2":
        return diff.pow(2).mean(1)
    if kind == "L1":
        return diff.abs().mean(1)
    if kind == "Manhattan":
        return diff.abs().sum(1)
    if margin < 0:
        raise ValueError(f"hinge margin must be >= 0, got {margin}")
    return (diff.abs() - margin).clamp_min(0.0).mean(1)


def image_loss(name: str, pred: torch.Tensor, target: torch.Tensor, margin: float = 0.02) -> torch.Tensor:
    """Batch mean of :func:`per_sample_loss` (a scalar)."""
    return per_sample_loss(name, pred, target, margin).mean()


def psnr(pred: torch.Tensor, target: torch.Tensor, max_db: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, for images in ``[0, 1]``.

    Args:
        pred: Prediction ``(B, C, *S)``; clipped to ``[0, 1]`` first.
        target: Target in ``[0, 1]``, same shape.
        max_db: Optional cap (an exact match would otherwise be ``inf``).

    Returns:
        ``(B,)`` PSNR values.
    """
    _check(pred, target)
    mse = (pred.float().clamp(0.0, 1.0) - target.float()).flatten(1).pow(2).mean(1)
    out = 10.0 * torch.log10(1.0 / mse)
    return out.clamp_max(max_db) if max_db is not None else out


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample over the positions where ``mask`` is true (every channel there).

    Args:
        pred: Prediction ``(B, C, *S)``; clipped to ``[0, 1]`` first.
        target: Target in ``[0, 1]``, same shape.
        mask: ``(*S)`` boolean: the positions scored (e.g. inside the target's alpha).

    Returns:
        ``(B,)`` PSNR values (``inf`` for an exact match).
    """
    _check(pred, target)
    if tuple(mask.shape) != tuple(pred.shape[2:]) or not bool(mask.any()):
        raise ValueError(f"mask must be a non-empty {tuple(pred.shape[2:])} array, got {tuple(mask.shape)}")
    diff = (pred.float().clamp(0.0, 1.0) - target.float())[..., mask]  # (B, C, n)
    return 10.0 * torch.log10(1.0 / diff.pow(2).flatten(1).mean(1))


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (Wang et al. 2004), mean over channels and positions.

    The standard form: a Gaussian window (``window`` x ``window``, ``sigma``) without padding (only
    positions where the whole window fits count), peak value 1, ``C1 = 0.01**2``, ``C2 = 0.03**2``.

    Args:
        pred: Prediction ``(B, C, H, W)``; clipped to ``[0, 1]`` first.
        target: Target in ``[0, 1]``, same shape; ``H, W >= window``.
        window: Side of the Gaussian window.
        sigma: Its standard deviation in pixels.

    Returns:
        ``(B,)`` SSIM in ``[-1, 1]`` (1 for identical images).
    """
    import torch.nn.functional as F

    _check(pred, target)
    if pred.dim() != 4 or min(pred.shape[-2:]) < window:
        raise ValueError(f"ssim needs (B, C, H, W) with H, W >= {window}, got {tuple(pred.shape)}")
    x, y = pred.float().clamp(0.0, 1.0), target.float()
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).to(x.device)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
