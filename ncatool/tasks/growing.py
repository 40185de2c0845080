"""``grow``: Growing Neural Cellular Automata (Mordvintsev et al., Distill 2020; seed 001).

An NCA learns to grow a target image from one live cell and to keep it (sample pool), optionally
to regrow it after damage. Everything runs on the shared core (:class:`ncatool.models.nca.NCA` with
alive masking on channel 3) and the one training loop.

Target: any PNG/JPG/BMP/TIFF, or a slice of a NIfTI/NRRD/MHA volume (``data``; default the retina
shipped in the package, ``ncatool/resources/retina/retina_rgba_64.png``). RGBA is used as is; RGB or
grayscale gets alpha 1 where the brightest channel exceeds ``alpha_threshold`` (holes filled), or
where ``mask`` is nonzero. Colour is
premultiplied by alpha, the image is fitted into ``img_size`` x ``img_size`` (aspect kept, centred)
and ``padding`` transparent pixels are added on each side: the grid is ``img_size + 2 * padding``.

One iteration (``iters_per_epoch`` per epoch): draw ``batch_size`` states from the pool, replace the
worst (highest loss) by the seed, erase a random circle from the ``damage_n`` best when ``damage`` is
on, run a number of steps drawn uniformly from ``steps = (lo, hi)`` (both inclusive), take ``loss``
between the RGBA channels and the target, write the states back to the pool.

Validation grows ``val_samples`` seeds for ``val_steps`` steps (fixed noise) and reports ``psnr``
(dB, premultiplied RGBA clipped to [0, 1] against the target over the whole grid; the score),
``psnr_long`` after as many steps again (persistence) and, with damage, ``psnr_regrow`` after a
circle is erased from the grown states and they run ``val_steps`` more steps.

``ncatool eval`` reports on other noise than the validation that chose ``best.pt`` (``test_samples``
seeds, :data:`TEST_SEED_OFFSET`): the same PSNRs, ``psnr_alpha`` (only inside the target's alpha, where
the picture is), ``ssim``, the PSNR curve over steps (``psnr_at_N``: does growth settle?) and, beside
them, the two trivial baselines on the same grid: an empty grid and a flat disc (the target's alpha
filled with its mean colour). A figure below the flat disc says the automaton grows the shape, not
the picture.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncatool.config import TrainConfig
from ncatool.distributed import world
from ncatool.errors import NcaError
from ncatool.image_losses import canonical_loss_name, masked_psnr, per_sample_loss, psnr, ssim
from ncatool.models.filters import FIXED_FILTERS
from ncatool.models.growing import ALPHA_CHANNEL, SamplePool, circle_masks, growing_nca_config, make_seed
from ncatool.models.nca import NCA, PADDING_MODES, NCAConfig
from ncatool.resources import resource_path
from ncatool.runtime import Checkpoint, PredictRequest, load_weights
from ncatool.tasks.generation import GenerationRunner
from ncatool.viz.colour import hidden_tiles, rgba_to_rgb
from ncatool.viz.grid import TILES_PER_ROW_2D, in_rows, save_grid, tile_grid, upscale, write_png

#: The default target, shipped inside the package (:mod:`ncatool.resources`).
DEFAULT_TARGET = resource_path("retina", "retina_rgba_64.png")


#: ``ncatool eval`` grows from ``seed + TEST_SEED_OFFSET`` (validation, which picks best.pt, from ``seed``).
TEST_SEED_OFFSET = 1_000_003
#: SSIM's Gaussian window (the standard 11 x 11); grids smaller than that get no SSIM.
SSIM_WINDOW = 11
#: The PSNR curve ``ncatool eval`` reports, in multiples of the validation steps.
CURVE_FACTORS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)


#: Seed 001 (``train_config.yaml`` of the Growing-NCA-on-MedMNIST repository) → ncatool names.
SEED_001_RENAMED: dict[str, str] = {"n_channels": "channels", "learning_rate": "lr", "target_path": "data"}
#: Seed 001 keys that need more than a rename (:meth:`GrowConfig.translate_keys`).
SEED_001_TRANSLATED: tuple[str, ...] = ("iterations", "model_path")


@dataclass(frozen=True)
class GrowConfig(TrainConfig):
    """A Growing NCA run (defaults as Growing NCA: 16 channels, hidden 128, pool 1024, batch 8)."""

    # settings saved by an older ncatool under another name, and seed 001's train_config.yaml names
    # (see ncatool.config.rename_old_keys; seed 001's iterations, model_path, device: translate_keys)
    RENAMED: ClassVar[dict[str, str]] = {
        "filter": "filters",
        "steps": "train_steps",
        **SEED_001_RENAMED,
    }

    task: str = "grow"
    data: str = ""  # target image or volume; "" = the shipped retina (ncatool/resources/retina)
    mask: str = ""  # optional mask image for an RGB/grayscale target: alpha = mask > 0
    alpha_threshold: float = 0.1  # no alpha and no mask: alpha = brightest channel (0..1) > this
    fill_holes: bool = True  # fill holes of a thresholded/mask alpha (dark structures inside the body)
    slice_axis: int = 0  # 3D target: array axis to slice along
    slice_index: int = -1  # 3D target: slice number; -1 = the middle one
    img_size: int = 40  # the target is fitted into img_size x img_size ...
    padding: int = 16  # ... and padded by this many transparent pixels on each side
    channels: int = 16  # RGB, alpha, hidden
    hidden: int = 128
    filters: tuple[str, ...] = (
        "sobel",
    )  # perception: sobel | scharr | gaussian | laplacian | mean | learned
    fire_rate: float = 0.5
    alive_threshold: float = 0.1
    border: str = "zeros"  # how the perception sees beyond the grid: zeros | reflect | replicate | circular
    train_steps: tuple[int, int] = (64, 96)  # NCA steps per training iteration, drawn uniformly (inclusive)
    pool_size: int = 1024
    damage: bool = False  # erase random circles from the best pool samples (regeneration training)
    damage_n: int = 3  # how many of the batch's lowest-loss samples get damaged
    damage_radius: tuple[float, float] = (0.1, 0.4)  # circle radius range, grid spans [-1, 1]
    loss: str = "L2"  # L1 | L2 | Manhattan | Hinge (see ncatool.image_losses)
    hinge_margin: float = 0.02  # margin of the Hinge loss
    val_steps: int = 0  # steps grown for validation, prediction and animation; 0 = train_steps[1]
    val_samples: int = 8  # seeds grown for validation (choosing best.pt)
    test_samples: int = 16  # seeds grown by ncatool eval, with noise validation never saw
    lr: float = 2e-3  # Growing NCA
    epochs: int = 80  # 80 x 100 iterations = Growing NCA's 8000
    iters_per_epoch: int = 100  # 0 = pool_size // batch_size
    batch_size: int = 8

    @classmethod
    def translate_keys(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Seed 001's settings that need more than a rename (called by :func:`ncatool.config.build_config`).

        * ``iterations`` (optimiser steps) → ``epochs`` x ``iters_per_epoch``: ``iters_per_epoch``
          as given (default 100, at most ``iterations``), ``epochs`` rounded up;
        * ``model_path`` is dropped: ncatool writes checkpoints into the run folder (``--out``);
        * ``device``: in a seed 001 file, a device this machine lacks (``mps`` off a Mac, ``cuda``
          without a GPU) becomes ``auto``; where it exists it is used.

        Each translation is noted in one line on stderr.

        Raises:
            NcaError: ``iterations`` together with ``epochs``, or not a positive integer.
        """
        if not any(k in values for k in (*SEED_001_RENAMED, *SEED_001_TRANSLATED)):
            return values
        from ncatool.console import info

        out = dict(values)
        notes = []
        if "iterations" in out:
            if "epochs" in out:
                raise NcaError("give either seed 001's iterations or epochs, not both", source)
            try:
                total = int(out.pop("iterations"))
            except (TypeError, ValueError):
                raise NcaError("iterations must be a positive integer", source) from None
            if total < 1:
                raise NcaError(f"iterations must be >= 1, got {total}", source)
            per = int(out.get("iters_per_epoch") or cls.iters_per_epoch)
            per = min(per, total)
            epochs = -(-total // per)
            out["iters_per_epoch"], out["epochs"] = per, epochs
            exact = "" if epochs * per == total else f", {epochs * per} in all"
            notes.append(f"iterations={total} -> epochs={epochs} x iters_per_epoch={per}{exact}")
        if "model_path" in out:
            notes.append(
                f"model_path={out.pop('model_path')} ignored: checkpoints go to the run folder (--out)"
            )
        device = str(out.get("device", "auto"))
        if device != "auto" and not device_available(device):
            out["device"] = "auto"
            notes.append(f"device={device} is not available here -> auto")
        if notes:
            info(f"{source}: seed 001 setting(s) " + "; ".join(notes))
        return out


class GrowBatch(NamedTuple):
    """One training batch: pool entries, their (prepared) states and the number of steps."""

    indices: torch.Tensor  # (B,)
    states: torch.Tensor  # (B, C, H, W)
    steps: int


def device_available(name: str) -> bool:
    """Whether torch device ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) exists on this machine."""
    kind = name.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind == "cpu"


def check_filters(names: tuple[str, ...]) -> tuple[str, ...]:
    """Perception filter names, lower-cased and checked (``filters=sobel,laplacian`` mixes two).

    Raises:
        NcaError: None given, or an unknown name.
    """
    names = tuple(n.strip().lower() for n in names if n.strip())
    valid = (*FIXED_FILTERS, "learned")
    bad = [n for n in names if n not in valid]
    if not names or bad:
        shown = ",".join(names)
        raise NcaError(f"filters must be one or more of {', '.join(valid)} (comma-separated), got {shown!r}")
    return names


def model_config(cfg: GrowConfig) -> NCAConfig:
    """The Growing NCA shape of a run (a function of its config alone)."""
    return growing_nca_config(
        cfg.channels, cfg.hidden, check_filters(cfg.filters), cfg.fire_rate, cfg.alive_threshold, cfg.border
    )


def build_model(cfg: GrowConfig) -> NCA:
    """A fresh Growing NCA on the shared core.

    Raises:
        NcaError: Inconsistent model settings.
    """
    try:
        return NCA(model_config(cfg))
    except ValueError as err:
        raise NcaError(f"invalid model settings: {err}") from err


def validation_steps(cfg: GrowConfig) -> int:
    """Steps a grown sample runs in validation, ``predict`` and ``animate`` (``val_steps`` or the longest
    training rollout)."""
    return cfg.val_steps or cfg.train_steps[1]


def check_grow_config(cfg: GrowConfig) -> None:
    """Reject inconsistent settings with a clear message.

    Raises:
        NcaError: On a bad value.
    """
    check_filters(cfg.filters)
    try:
        canonical_loss_name(cfg.loss)
    except ValueError as err:
        raise NcaError(str(err)) from None
    if cfg.channels < 5:
        raise NcaError(f"channels must be >= 5 (RGB, alpha and at least one hidden), got {cfg.channels}")
    if cfg.img_size < 1 or cfg.padding < 0:
        raise NcaError(f"img_size must be >= 1 and padding >= 0, got {cfg.img_size} and {cfg.padding}")
    lo, hi = cfg.train_steps
    if not 1 <= lo <= hi:
        raise NcaError(f"train_steps must be (lo, hi) with 1 <= lo <= hi, got {cfg.train_steps}")
    if cfg.pool_size < cfg.batch_size:
        raise NcaError(f"pool_size ({cfg.pool_size}) must be >= batch_size ({cfg.batch_size})")
    if cfg.border not in PADDING_MODES:
        raise NcaError(f"border must be one of {', '.join(PADDING_MODES)}, got {cfg.border!r}")
    if not 0.0 < cfg.fire_rate <= 1.0:
        raise NcaError(f"fire_rate must be in (0, 1], got {cfg.fire_rate}")
    if cfg.damage_n < 0 or not 0.0 <= cfg.damage_radius[0] <= cfg.damage_radius[1]:
        raise NcaError(f"damage_n must be >= 0 and damage_radius (min, max), got {cfg.damage_radius}")
    if cfg.hinge_margin < 0:
        raise NcaError(f"hinge_margin must be >= 0, got {cfg.hinge_margin}")
    if cfg.val_steps < 0 or cfg.val_samples < 1 or cfg.test_samples < 1:
        raise NcaError("val_steps must be >= 0, val_samples and test_samples >= 1")


# ------------------------------------------------------------------------------------------ target
def _to_unit(array: np.ndarray, integer_max: bool) -> np.ndarray:
    """Scale to [0, 1]: by the dtype's maximum for integer pixel formats, else min-max."""
    a = array.astype(np.float64)
    if integer_max and np.issubdtype(array.dtype, np.integer):
        return a / float(np.iinfo(array.dtype).max)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _read_plane(path: Path, slice_axis: int, slice_index: int) -> tuple[np.ndarray, bool]:
    """A 2D plane ``(H, W[, K])`` of an image file and whether it is a planar (PNG/JPG...) format."""
    from ncatool.data.io import PLANAR_EXTENSIONS, read_image, split_extension

    img = read_image(path)
    arr = img.array
    spatial = len(img.spatial_shape)
    if spatial == 3:
        if img.is_vector:
            raise NcaError("vector-valued 3D images are not supported as a growing target", path)
        if not 0 <= slice_axis < 3:
            raise NcaError(f"slice_axis must be 0, 1 or 2 for a 3D target, got {slice_axis}", path)
        n = arr.shape[slice_axis]
        idx = n // 2 if slice_index < 0 else slice_index
        if not 0 <= idx < n:
            raise NcaError(f"slice_index {slice_index} out of range: the volume has {n} slices", path)
        arr = np.take(arr, idx, axis=slice_axis)
    elif spatial != 2:
        raise NcaError(f"expected a 2D image or a 3D volume, got {spatial} dimensions", path)
    return arr, split_extension(path)[1] in PLANAR_EXTENSIONS


def load_target(
    path: str | Path,
    img_size: int,
    padding: int,
    mask: str | Path = "",
    alpha_threshold: float = 0.1,
    fill_holes: bool = True,
    slice_axis: int = 0,
    slice_index: int = -1,
) -> torch.Tensor:
    """Read a growing target as premultiplied RGBA on the padded grid.

    Args:
        path: Image or volume file.
        img_size: Side of the square the image is fitted into (aspect ratio kept, centred).
        padding: Transparent border added on each side.
        mask: Optional mask file of the same size: alpha = mask > 0 (for RGB/grayscale targets).
        alpha_threshold: Without alpha or mask: alpha = brightest channel in [0, 1] > threshold.
        fill_holes: Fill holes in a thresholded or mask alpha.
        slice_axis: For a 3D volume, the array axis to slice.
        slice_index: For a 3D volume, the slice (-1 = middle).

    Returns:
        ``(4, S, S)`` float32 in [0, 1] with ``S = img_size + 2 * padding``: premultiplied RGB, alpha.

    Raises:
        NcaError: Unreadable file, unsupported layout, mask of another size, empty alpha.
    """
    from scipy import ndimage

    path = Path(path)
    arr, planar = _read_plane(path, slice_axis, slice_index)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        raise NcaError(f"expected 1-4 colour components, got {arr.shape[-1]}", path)
    if arr.ndim == 2:
        arr = arr[..., None]
    unit = _to_unit(arr, integer_max=planar)
    comps = unit.shape[-1]
    has_alpha = comps in (2, 4) and not mask
    colour = unit[..., : comps - 1] if comps in (2, 4) else unit
    rgb = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour
    if has_alpha:
        alpha = unit[..., -1]
    else:
        if mask:
            marr, _ = _read_plane(Path(mask), slice_axis, slice_index)
            marr = marr if marr.ndim == 2 else marr.max(-1)
            if marr.shape != rgb.shape[:2]:
                raise NcaError(f"mask has shape {marr.shape}, the target {rgb.shape[:2]}", Path(mask))
            solid = marr > 0
        else:
            solid = rgb.max(-1) > alpha_threshold
        if fill_holes:
            solid = ndimage.binary_fill_holes(solid)
        alpha = solid.astype(np.float64)
    if not (alpha > 0).any():
        raise NcaError(
            "the target has no opaque pixel (alpha is 0 everywhere); lower alpha_threshold or pass a mask",
            path,
        )
    rgba = np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(rgba.transpose(2, 0, 1))).float().unsqueeze(0)
    h, w = x.shape[-2:]
    scale = img_size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (img_size - nh) // 2, (img_size - nw) // 2
    pads = (left + padding, img_size - nw - left + padding, top + padding, img_size - nh - top + padding)
    return F.pad(x, pads)[0].clamp(0.0, 1.0)


def flat_disc(target: torch.Tensor) -> torch.Tensor:
    """The trivial baseline with the exact shape: the target's alpha filled with its mean colour.

    Args:
        target: ``(4, H, W)`` premultiplied RGBA.

    Returns:
        ``(4, H, W)``: premultiplied RGB = alpha x (alpha-weighted mean of the straight colour), alpha.
    """
    alpha = target[ALPHA_CHANNEL : ALPHA_CHANNEL + 1]
    mean_colour = target[:ALPHA_CHANNEL].sum((1, 2), keepdim=True) / alpha.sum().clamp_min(1e-8)
    return torch.cat([mean_colour * alpha, alpha])


def isolated_rng(device: torch.device) -> Any:
    """Isolate validation noise from the training RNG streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ------------------------------------------------------------------------------------------ task
class GrowTask:
    """Trains a Growing NCA on one target image with a sample pool.

    Args:
        cfg: The run config.
        device: Training device.
    """

    score_name = "psnr"

    def __init__(self, cfg: GrowConfig, device: torch.device) -> None:
        check_grow_config(cfg)
        self.config = cfg
        self.device = device
        self.filters = check_filters(cfg.filters)
        self.loss_name = canonical_loss_name(cfg.loss)
        target_path = Path(cfg.data) if cfg.data else DEFAULT_TARGET
        self.target = load_target(
            target_path,
            cfg.img_size,
            cfg.padding,
            cfg.mask,
            cfg.alpha_threshold,
            cfg.fill_holes,
            cfg.slice_axis,
            cfg.slice_index,
        ).to(device)
        size = self.target.shape[-1]
        self.seed = make_seed(cfg.channels, size, size).to(device)
        self.pool = SamplePool(self.seed, cfg.pool_size, device)
        self.val_steps = validation_steps(cfg)

    def build_model(self) -> nn.Module:
        """A fresh Growing NCA on the shared core."""
        return build_model(self.config)

    def per_sample_loss(self, states: torch.Tensor) -> torch.Tensor:
        """The configured loss of each state's RGBA against the target, ``(B,)``."""
        rgba = states[:, : ALPHA_CHANNEL + 1]
        return per_sample_loss(self.loss_name, rgba, self.target.expand_as(rgba), self.config.hinge_margin)

    def batches(self, epoch: int, batch_size: int) -> Iterator[GrowBatch]:
        """``iters_per_epoch`` pool batches (worst → seed, best damaged) with their step counts."""
        cfg = self.config
        n = cfg.iters_per_epoch or max(1, cfg.pool_size // batch_size)
        damage_n = cfg.damage_n if cfg.damage else 0
        lo, hi = cfg.train_steps
        for _ in range(n):
            idx, states = self.pool.sample(batch_size, self.per_sample_loss, damage_n, cfg.damage_radius)
            steps = int(torch.randint(lo, hi + 1, (1,)).item())
            yield GrowBatch(idx, states, steps)

    def loss(self, model: nn.Module, batch: GrowBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Grow the batch, write it back to the pool, return the loss and the batch PSNR."""
        out = model(batch.states, batch.steps, checkpoint_every=self.config.grad_checkpoint)
        per = self.per_sample_loss(out)
        # under torchrun every rank holds the whole pool and grew its share of the batch: commit the
        # whole batch everywhere, so the pools stay identical (and equal the single-process pool)
        w = world()
        self.pool.commit(w.all_gather_tensor(batch.indices), w.all_gather_tensor(out.detach()))
        with torch.no_grad():
            logs = {"psnr": self._psnr(out.detach())}
        return per.mean(), logs

    def _grow(self, model: nn.Module, n: int, steps: int) -> torch.Tensor:
        return model(self.seed.unsqueeze(0).repeat(n, 1, 1, 1), steps)

    def _psnr(self, states: torch.Tensor) -> float:
        """Mean whole-grid PSNR of states ``(B, C, H, W)`` against the target."""
        rgba = states[:, : ALPHA_CHANNEL + 1]
        return float(psnr(rgba, self.target.expand_as(rgba), max_db=100.0).mean())

    def image_scores(self, states: torch.Tensor) -> dict[str, float]:
        """``psnr`` (whole grid), ``psnr_alpha`` (inside the target's alpha) and ``ssim`` of states
        ``(B, C, H, W)`` (RGBA = the first four channels), means over the batch."""
        rgba = states[:, : ALPHA_CHANNEL + 1].float()
        target = self.target.expand_as(rgba)
        inside = self.target[ALPHA_CHANNEL] > 0
        scores = {
            "psnr": self._psnr(states),
            "psnr_alpha": float(masked_psnr(rgba, target, inside).clamp_max(100.0).mean()),
        }
        if min(rgba.shape[-2:]) >= SSIM_WINDOW:
            scores["ssim"] = float(ssim(rgba, target, window=SSIM_WINDOW).mean())
        return scores

    def _regrown(self, model: nn.Module, grown: torch.Tensor) -> torch.Tensor:
        """Erase a random circle from each state and run ``val_steps`` more steps."""
        n, (h, w) = grown.shape[0], grown.shape[-2:]
        hurt = grown * circle_masks(n, h, w, self.config.damage_radius, device=grown.device).to(grown.dtype)
        return model(hurt, self.val_steps)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """PSNR after ``val_steps`` from the seed, after twice as many, and after damage + regrowth."""
        cfg = self.config
        with isolated_rng(self.device):
            torch.manual_seed(cfg.seed)
            grown = self._grow(model, cfg.val_samples, self.val_steps)
            out = {
                "psnr": self._psnr(grown),
                "loss": float(self.per_sample_loss(grown.float()).mean()),
                "psnr_long": self._psnr(model(grown, self.val_steps)),
            }
            if cfg.damage:
                out["psnr_regrow"] = self._psnr(self._regrown(model, grown))
        return out

    def test(self, model: nn.Module) -> dict[str, float]:
        """What ``ncatool eval`` reports: scores on ``test_samples`` growths whose noise validation (and
        so the choice of best.pt) never saw.

        Returns:
            :meth:`image_scores` after ``val_steps``; ``psnr_long`` after twice as many; ``psnr_at_N``
            for N in :data:`CURVE_FACTORS` x ``val_steps``; with damage, ``psnr_regrow`` and
            ``psnr_alpha_regrow`` (erase a circle from the grown states, run ``val_steps`` more).
        """
        cfg = self.config
        curve = sorted({max(1, round(f * self.val_steps)) for f in CURVE_FACTORS})
        with isolated_rng(self.device):
            torch.manual_seed(cfg.seed + TEST_SEED_OFFSET)
            x, done, at = self.seed.unsqueeze(0).repeat(cfg.test_samples, 1, 1, 1), 0, {}
            for steps in curve:  # one rollout, scored on the way
                x = model(x, steps - done)
                done, at[steps] = steps, x
            grown = at[self.val_steps]
            out = self.image_scores(grown)
            out["psnr_long"] = self._psnr(model(grown, self.val_steps))
            out.update({f"psnr_at_{steps}": self._psnr(states) for steps, states in at.items()})
            if cfg.damage:
                regrown = self.image_scores(self._regrown(model, grown))
                out.update(psnr_regrow=regrown["psnr"], psnr_alpha_regrow=regrown["psnr_alpha"])
        return out

    def baselines(self) -> dict[str, dict[str, float]]:
        """The trivial baselines' :meth:`image_scores` on this target and grid: an empty grid and a flat
        disc (:func:`flat_disc`)."""
        empty = torch.zeros_like(self.target)
        return {
            "flat_disc": self.image_scores(flat_disc(self.target).unsqueeze(0)),
            "empty": self.image_scores(empty.unsqueeze(0)),
        }

    def save_samples(self, model: nn.Module, path: Path) -> None:
        """Row 1: target, then growth from the seed; row 2: up to ``samples`` x 3 pool entries."""
        cfg = self.config
        with isolated_rng(self.device):
            torch.manual_seed(cfg.seed)
            x = self.seed.unsqueeze(0)
            _, states = model(x, 2 * self.val_steps, return_states=True)
        picks = sorted(
            {s for s in (1, 8, 16, 32, 64, self.val_steps, 2 * self.val_steps) if s <= len(states)}
        )
        row1 = [rgba_to_rgb(self.target), *(rgba_to_rgb(states[s - 1][0, :4]) for s in picks)]
        n_pool = min(len(self.pool), max(1, cfg.samples) * 3)
        row2 = [rgba_to_rgb(self.pool.states[i, :4]) for i in range(n_pool)]
        scale = max(1, 96 // self.target.shape[-1])
        save_grid([row1, row2], path, scale=scale)

    def reduce_memory(self) -> str | None:
        """Nothing task-side to shrink (use grad_checkpoint or a smaller img_size)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """Stored in checkpoints: the model shape, the target, and (``last.pt`` only) the sample pool."""
        return {
            "model": model_config(self.config).__dict__,
            "target": self.target.cpu(),
            "resume": {"pool": self.pool.state_dict()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the sample pool saved by :meth:`extra_state` (called on resume)."""
        pool = state.get("resume", {}).get("pool")
        if pool is not None:
            try:
                self.pool.load_state_dict(pool)
            except ValueError as err:
                raise NcaError(f"cannot resume the sample pool: {err}") from err


# ------------------------------------------------------------------------------------------ inference
class GrowRunner(GenerationRunner):
    """A trained Growing NCA: grows RGBA samples from one live cell (``sample_NNN.png``, RGB over white)."""

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: torch.device, amp: str = "none") -> GrowRunner:
        """Rebuild the model from the run's config; the grid size comes from the stored target."""
        cfg = checkpoint.config
        model = load_weights(build_model(cfg), checkpoint)  # type: ignore[arg-type]
        target = checkpoint.task_state.get("target")
        size = int(target.shape[-1]) if target is not None else cfg.img_size + 2 * cfg.padding  # type: ignore[attr-defined]
        return cls(model, make_seed(cfg.channels, size, size), checkpoint, device, amp)  # type: ignore[attr-defined]

    def default_steps(self) -> int:
        """The validation steps of the run."""
        return validation_steps(self.config)

    def grow(self, n: int, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` grown states ``(n, C, H, W)``."""
        return self.model(self.seeds(n), steps)

    def write_samples(self, request: PredictRequest, steps: int) -> list[str]:
        """``sample_NNN.png``: RGB composited over white."""
        request.refuse(self.task, "labels")
        out = self.grow(request.samples, steps)
        return [
            str(write_png(rgba_to_rgb(out[i, :4]), request.output / f"sample_{i:03d}.png"))
            for i in range(len(out))
        ]

    first_hidden = ALPHA_CHANNEL + 1

    def animation_start(self) -> tuple[Any, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """One sample from the seed."""
        return self.model, self.seeds(1), None, {}

    def draw(self, state: torch.Tensor, hidden: int, scale: int) -> np.ndarray:
        """RGBA over white, then ``hidden`` hidden channels, in rows of tiles."""
        tiles = [upscale(rgba_to_rgb(state[0, :4]), scale)]
        if hidden:
            k0 = self.first_hidden
            tiles += hidden_tiles(state[0, k0 : k0 + hidden].numpy(), scale)
        return tile_grid(in_rows(tiles, TILES_PER_ROW_2D))

    def columns(self, batch: int, hidden: int) -> int:
        return min(1 + hidden, TILES_PER_ROW_2D)
