"""``digits``: class-conditional digit generation with one NCA (seed 003).

A learned embedding of the digit label (0-9) is fed to the update rule of every cell (the core's
``cond_channels``); from one live cell in the centre the NCA grows that digit in channel 0. Training
puts the loss on several intermediate steps (``loss_steps``), not only the last, so the digit forms
progressively and stays formed.

Per-class pre-training (seed 003: "weights pre-trained on individual digit classes, further fine-tuned
into a unified model"): with ``pretrain_per_class=E`` the first ``E`` epochs of the one training loop
draw every batch from a single class, the classes taking turns batch by batch, so each optimiser step
trains the shared rule (and that class's embedding) on one digit alone; from epoch ``E + 1`` on the
batches mix all classes, fine-tuning the same weights into the unified model. The phase is a function
of the epoch number only, and each epoch's batches come from the loop's per-epoch seed, so a resumed
run continues exactly, across the phase boundary too. Off by default: for the same 3 minutes it
scored below mixed batches from the start on two seeds (README, "Growing NCA and digits").

Data: the real handwritten digits shipped in the package (``ncatool/resources/digits/digits_8x8.npz``,
1,797 8x8 images from scikit-learn's copy of the UCI set, values 0..16), or MNIST IDX files / an NPZ
via ``data``; every image is scaled to [0, 1] and resized to ``img_size`` (bilinear, antialiased when
shrinking).
A seeded split keeps ``val_fraction`` of the images for evaluation.

Evaluation (every validation, with fixed noise) generates one digit per validation image, of that
image's class, after ``steps`` steps (clipped to [0, 1]) and reports:

* ``pixel_acc`` (the score) and ``pixel_acc_<k>``: fraction of pixels where the generated and the
  real image agree once both are binarised at 0.5, averaged over all items / the items of class k;
* ``mse_means`` and ``mse_means_<k>``: mean squared error between each generated digit and the mean
  of the real training images of its class;
* ``recognised`` and ``recognised_<k>``: fraction of generated digits that a classifier trained on
  the real training images (``classifier``: ``logreg``, multinomial logistic regression, or ``cnn``,
  a two-layer CNN; trained once inside the evaluation code with a fixed seed) assigns to their class;
  ``classifier_acc_real`` is that classifier's accuracy on the real validation images.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncatool.config import TrainConfig
from ncatool.console import warn
from ncatool.data.splits import split_indices
from ncatool.errors import NcaError
from ncatool.image_losses import canonical_loss_name, per_sample_loss
from ncatool.models.growing import ConditionalNCA, make_seed
from ncatool.models.nca import PADDING_MODES, NCAConfig
from ncatool.resources import resource_path
from ncatool.runtime import Checkpoint, PredictRequest, load_weights
from ncatool.tasks.generation import GenerationRunner
from ncatool.tasks.growing import check_filters, isolated_rng
from ncatool.viz.colour import gray_to_rgb, hidden_tiles, to_uint8
from ncatool.viz.grid import save_grid, tile_grid, upscale, write_png

DEFAULT_DIGITS = resource_path("digits", "digits_8x8.npz")
N_CLASSES = 10
CLASSIFIERS = ("logreg", "cnn")


@dataclass(frozen=True)
class DigitsConfig(TrainConfig):
    """A class-conditional digit NCA run."""

    # settings saved by an older ncatool under another name (see ncatool.config.rename_old_keys)
    RENAMED: ClassVar[dict[str, str]] = {"filter": "filters"}

    task: str = "digits"
    data: str = ""  # MNIST IDX folder/file or NPZ; "" = the shipped sklearn digits (ncatool.resources)
    img_size: int = 16  # images are resized to img_size x img_size (8x8 digits: 16 or 32)
    max_items: int = 0  # use a seeded random subset of this many images; 0 = all
    val_fraction: float = 0.2  # held out for evaluation (seeded split)
    val_max: int = 1000  # evaluate on at most this many held-out images
    channels: int = 16  # channel 0 is the digit, the rest hidden
    hidden: int = 128
    embed_dim: int = 8  # width of the learned label embedding fed to the rule
    filters: tuple[str, ...] = (
        "sobel",
    )  # perception: sobel | scharr | gaussian | laplacian | mean | learned
    fire_rate: float = 0.5
    border: str = "zeros"  # zeros | reflect | replicate | circular
    steps: int = 32  # NCA steps from the seed to the digit (about 2 x img_size)
    loss_steps: tuple[int, ...] = ()  # steps whose states enter the loss; () = steps/2, 3*steps/4, steps
    loss: str = "L2"  # L1 | L2 | Manhattan | Hinge (see ncatool.image_losses)
    hinge_margin: float = 0.02
    classifier: str = "logreg"  # logreg | cnn: the recogniser trained on the real digits
    # per-class pre-training (seed 003): the first N epochs draw each batch from one class, classes
    # taking turns batch by batch, then all classes are mixed (fine-tuning); 0 = mixed from the start
    pretrain_per_class: int = 0
    batch_size: int = 32
    lr: float = 2e-3  # Adam
    epochs: int = 40


def resolved_loss_steps(cfg: DigitsConfig) -> tuple[int, ...]:
    """``loss_steps``, or its default ``(steps // 2, 3 * steps // 4, steps)`` (sorted, unique, >= 1)."""
    chosen = cfg.loss_steps or (cfg.steps // 2, 3 * cfg.steps // 4, cfg.steps)
    return tuple(sorted({s for s in chosen if s >= 1}))


def check_digits_config(cfg: DigitsConfig) -> None:
    """Reject inconsistent settings with a clear message.

    Raises:
        NcaError: On a bad value.
    """
    check_filters(cfg.filters)
    try:
        canonical_loss_name(cfg.loss)
    except ValueError as err:
        raise NcaError(str(err)) from None
    if cfg.img_size < 4:
        raise NcaError(f"img_size must be >= 4, got {cfg.img_size}")
    if cfg.channels < 2:
        raise NcaError(f"channels must be >= 2 (the digit and at least one hidden), got {cfg.channels}")
    if cfg.steps < 1:
        raise NcaError(f"steps must be >= 1, got {cfg.steps}")
    bad = [s for s in cfg.loss_steps if not 1 <= s <= cfg.steps]
    if bad:
        raise NcaError(f"loss_steps must lie in [1, steps={cfg.steps}], got {list(cfg.loss_steps)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise NcaError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.classifier not in CLASSIFIERS:
        raise NcaError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {cfg.classifier!r}")
    if cfg.border not in PADDING_MODES:
        raise NcaError(f"border must be one of {', '.join(PADDING_MODES)}, got {cfg.border!r}")
    if cfg.embed_dim < 1 or cfg.val_max < 1 or cfg.max_items < 0:
        raise NcaError("embed_dim and val_max must be >= 1, max_items >= 0")
    if cfg.pretrain_per_class < 0:
        raise NcaError(
            f"pretrain_per_class must be >= 0 (epochs of one-class batches; 0 = off), got {cfg.pretrain_per_class}"
        )
    if cfg.pretrain_per_class >= cfg.epochs:  # allowed: a run may be resumed later with more epochs
        warn(
            f"pretrain_per_class={cfg.pretrain_per_class} covers all {cfg.epochs} epochs: every batch "
            "holds one class and no epoch trains the classes mixed"
        )


# ------------------------------------------------------------------------------------------ data
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format; ``.gz`` allowed).

    Raises:
        NcaError: Not an IDX file, or truncated.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as err:
            raise NcaError(f"cannot decompress ({err})", path) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise NcaError("not an IDX file (bad magic number)", path)
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) < header + count * dtype.itemsize:
        raise NcaError(f"IDX file truncated: header says {dims}", path)
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def _find_idx_pair(path: Path) -> tuple[Path, Path]:
    """The (images, labels) IDX files for a folder or for an images file."""
    if path.is_dir():
        images = sorted(path.glob("*images*idx3*"), key=lambda p: (not p.name.startswith("train"), p.name))
        labels = sorted(path.glob("*labels*idx1*"), key=lambda p: (not p.name.startswith("train"), p.name))
        if not images or not labels:
            raise NcaError("no MNIST IDX files (*images*idx3*, *labels*idx1*) in this folder", path)
        return images[0], labels[0]
    partner = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    if partner == path or not partner.is_file():
        raise NcaError(f"cannot find the labels file (expected {partner.name} next to it)", path)
    return path, partner


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray, float | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            for xk, yk in (("images", "labels"), ("x_train", "y_train"), ("x", "y"), ("X", "y")):
                if xk in files and yk in files:
                    mx = float(z["max_value"]) if "max_value" in files else None
                    return np.asarray(z[xk]), np.asarray(z[yk]), mx
    except (OSError, ValueError) as err:
        raise NcaError(f"cannot read NPZ ({err})", path) from err
    raise NcaError(
        f"NPZ needs images+labels, x_train+y_train, x+y or X+y arrays; found {sorted(files)}", path
    )


def load_digit_images(path: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """Read digit images and labels.

    Args:
        path: An NPZ file, MNIST IDX images file (the labels file next to it), a folder with both,
            or ``""`` for the shipped sklearn digits.

    Returns:
        ``(images (N, H, W) float32 in [0, 1], labels (N,) int64 in 0..9)``.

    Raises:
        NcaError: Missing or malformed files, labels outside 0..9, non-square images.
    """
    p = Path(path) if path else DEFAULT_DIGITS
    if not p.exists():
        raise NcaError("digits data does not exist", p)
    if p.is_file() and p.suffix.lower() == ".npz":
        images, labels, max_value = _from_npz(p)
    else:
        img_path, lab_path = _find_idx_pair(p)
        images, labels, max_value = read_idx(img_path), read_idx(lab_path), None
    labels = labels.reshape(-1)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 2:  # flattened square images
        side = round(images.shape[1] ** 0.5)
        if side * side != images.shape[1]:
            raise NcaError(f"flattened images of {images.shape[1]} pixels are not square", p)
        images = images.reshape(-1, side, side)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise NcaError(f"expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}", p)
    if images.shape[0] == 0:
        raise NcaError("no images", p)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= N_CLASSES:
        raise NcaError(f"labels must be integers 0..9, got range {labels.min()}..{labels.max()}", p)
    x = images.astype(np.float32)
    if max_value is None:
        if np.issubdtype(images.dtype, np.integer):
            max_value = 255.0 if images.max() > 16 else float(max(images.max(), 1))
        else:
            max_value = float(max(x.max(), 1.0))
    return np.clip(x / max_value, 0.0, 1.0), labels.astype(np.int64)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, h, w)`` → ``(N, size, size)`` (bilinear; antialiased when shrinking), clipped to [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images.clone()
    out = F.interpolate(
        images[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[:, 0].clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------ classifier
class _TinyCNN(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (size // 4) ** 2, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, None]).flatten(1))


class _LogReg(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size * size, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "logreg",
    seed: int = 0,
    max_items: int = 10000,
    cnn_epochs: int = 15,
) -> nn.Module:
    """Fit a digit recogniser on real images (deterministic for a seed; leaves the global RNG as it was).

    ``logreg``: multinomial logistic regression on the pixels, L-BFGS (200 iterations, L2 1e-4).
    ``cnn``: conv(16)-pool-conv(32)-pool-linear, Adam 3e-3, ``cnn_epochs`` epochs of batches of 64.

    Args:
        images: ``(N, S, S)`` in [0, 1].
        labels: ``(N,)`` in 0..9.
        kind: ``logreg`` or ``cnn``.
        seed: Seed of its initialisation and shuffling.
        max_items: Train on at most this many images (the first ones).
        cnn_epochs: Passes over the images for the CNN.

    Returns:
        The classifier in eval mode: ``(N, S, S)`` → logits ``(N, 10)``.
    """
    images, labels = images[:max_items].float(), labels[:max_items].long()
    size = images.shape[-1]
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(seed)
        if kind == "logreg":
            model: nn.Module = _LogReg(size)
            opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(images), labels) + 1e-4 * model.linear.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        elif kind == "cnn":
            model = _TinyCNN(size)
            opt2 = torch.optim.Adam(model.parameters(), lr=3e-3)
            for _ in range(cnn_epochs):
                order = torch.randperm(len(images))
                for start in range(0, len(images), 64):
                    idx = order[start : start + 64]
                    opt2.zero_grad()
                    F.cross_entropy(model(images[idx]), labels[idx]).backward()
                    opt2.step()
        else:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {kind!r}")
    return model.eval()


def nca_config(cfg: DigitsConfig) -> NCAConfig:
    """The core's shape: no fixed channels, no alive masking, label embedding as conditioning."""
    return NCAConfig(
        channels=cfg.channels,
        fixed_channels=0,
        hidden=cfg.hidden,
        dim=2,
        filters=check_filters(cfg.filters),
        fire_rate=cfg.fire_rate,
        alive_channel=None,
        cond_channels=cfg.embed_dim,
        padding=cfg.border,
    )


def build_model(cfg: DigitsConfig) -> ConditionalNCA:
    """A fresh :class:`ConditionalNCA` for a run's config.

    Raises:
        NcaError: Inconsistent model settings.
    """
    try:
        return ConditionalNCA(nca_config(cfg), N_CLASSES, cfg.embed_dim)
    except ValueError as err:
        raise NcaError(f"invalid model settings: {err}") from err


def seed_state(cfg: DigitsConfig) -> torch.Tensor:
    """The ``(C, S, S)`` seed every digit grows from (one live cell in the centre, channels >= 1)."""
    return make_seed(cfg.channels, cfg.img_size, cfg.img_size, first_live_channel=1)


# ------------------------------------------------------------------------------------------ task
class DigitsTask:
    """Trains a label-conditioned NCA to grow real handwritten digits.

    Args:
        cfg: The run config.
        device: Training device.
    """

    score_name = "pixel_acc"

    def __init__(self, cfg: DigitsConfig, device: torch.device) -> None:
        check_digits_config(cfg)
        self.config = cfg
        self.device = device
        self.filters = check_filters(cfg.filters)
        self.loss_name = canonical_loss_name(cfg.loss)
        self.loss_steps = resolved_loss_steps(cfg)
        images, labels = load_digit_images(cfg.data)
        kept, held = split_indices(len(images), cfg.val_fraction, cfg.seed, limit=cfg.max_items)
        if len(held) == 0:
            raise NcaError(f"too few images ({len(kept)}) for a training and a validation split")
        x = resize_images(torch.from_numpy(images), cfg.img_size)
        y = torch.from_numpy(labels)
        tr, va = torch.from_numpy(kept), torch.from_numpy(held[: cfg.val_max])
        self.train_x, self.train_y = x[tr], y[tr]
        self.val_x, self.val_y = x[va], y[va]
        self.class_means = torch.stack(
            [
                self.train_x[self.train_y == k].mean(0)
                if (self.train_y == k).any()
                else torch.zeros(cfg.img_size, cfg.img_size)
                for k in range(N_CLASSES)
            ]
        )
        self.seed = seed_state(cfg).to(device)
        self._classifier: nn.Module | None = None

    def build_model(self) -> nn.Module:
        """A fresh :class:`ConditionalNCA`."""
        return build_model(self.config)

    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled ``(images (B, 1, S, S), labels (B,))`` from the training split: one class per
        batch during the ``pretrain_per_class`` epochs, all classes mixed after them."""
        if epoch < self.config.pretrain_per_class:
            batches = self._one_class_batches(epoch, batch_size)
        else:
            batches = self._mixed_batches(batch_size)
        for idx in batches:
            yield self.train_x[idx, None].to(self.device), self.train_y[idx].to(self.device)

    def _mixed_batches(self, batch_size: int) -> list[torch.Tensor]:
        """Index batches drawn from the whole training split (``iters_per_epoch`` draws, or one pass)."""
        n = len(self.train_x)
        iters = self.config.iters_per_epoch
        order = torch.randint(0, n, (iters * batch_size,)) if iters > 0 else torch.randperm(n)
        return list(order.split(batch_size))

    def _one_class_batches(self, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """Index batches of one class each, the classes present taking turns batch by batch.

        With ``iters_per_epoch`` each batch draws ``batch_size`` items of its class (with replacement)
        and the turn carries over from one epoch to the next, so every class gets its share of steps
        even when an epoch holds fewer than ten batches; without it, every class's items are shuffled
        and cut into batches (one pass), taken round-robin over the classes.
        """
        members = [(self.train_y == k).nonzero()[:, 0] for k in range(N_CLASSES)]
        members = [m for m in members if len(m)]
        iters = self.config.iters_per_epoch
        if iters > 0:
            turns = [members[(epoch * iters + b) % len(members)] for b in range(iters)]
            return [m[torch.randint(0, len(m), (batch_size,))] for m in turns]
        per_class = [m[torch.randperm(len(m))].split(batch_size) for m in members]
        return [chunks[i] for i in range(max(map(len, per_class))) for chunks in per_class if i < len(chunks)]

    def generate(self, model: nn.Module, labels: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Grow one digit per label: ``(B,)`` → raw channel 0 ``(B, S, S)`` after ``steps``."""
        x = self.seed.unsqueeze(0).repeat(len(labels), 1, 1, 1)
        out = model(x, steps or self.config.steps, labels.to(self.device))
        return out[:, 0]

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean of the configured loss over the ``loss_steps`` states (channel 0 vs the real digit)."""
        images, labels = batch
        x = self.seed.unsqueeze(0).repeat(len(labels), 1, 1, 1)
        _, states = model(x, max(self.loss_steps), labels, return_states=True)
        cfg = self.config
        terms = [
            per_sample_loss(self.loss_name, states[s - 1][:, :1], images, cfg.hinge_margin).mean()
            for s in self.loss_steps
        ]
        with torch.no_grad():
            final_mse = float((states[-1][:, :1].float().clamp(0, 1) - images).pow(2).mean())
        # 1 while the batches hold one class (pretrain_per_class), so metrics.jsonl shows the phase
        one_class = float(bool((labels == labels[0]).all()))
        return torch.stack(terms).mean(), {"mse_last": final_mse, "one_class": one_class}

    def classifier(self) -> nn.Module:
        """The recogniser, trained on the real training split on first use (then cached)."""
        if self._classifier is None:
            self._classifier = train_classifier(
                self.train_x, self.train_y, self.config.classifier, seed=self.config.seed
            )
        return self._classifier

    def _generate_all(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        chunks = [
            self.generate(model, labels[i : i + 256]).float().clamp(0.0, 1.0).cpu()
            for i in range(0, len(labels), 256)
        ]
        return torch.cat(chunks)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Pixel accuracy, MSE to the class means and recognisability (see the module docstring)."""
        with isolated_rng(self.device):
            torch.manual_seed(self.config.seed)
            gen = self._generate_all(model, self.val_y)
        return evaluate_generated(gen, self.val_x, self.val_y, self.class_means, self.classifier())

    def save_samples(self, model: nn.Module, path: Path) -> None:
        """Columns 0-9: the real class mean, then ``samples`` generated digits per class."""
        n = max(1, self.config.samples)
        labels = torch.arange(N_CLASSES).repeat(n)
        with isolated_rng(self.device):
            torch.manual_seed(self.config.seed)
            gen = self._generate_all(model, labels).view(n, N_CLASSES, *self.class_means.shape[-2:])

        def tile(img: torch.Tensor) -> np.ndarray:
            return gray_to_rgb(img.numpy(), 0.0, 1.0)

        rows = [[tile(m) for m in self.class_means]] + [[tile(g) for g in row] for row in gen]
        save_grid(rows, path, scale=max(1, 48 // self.config.img_size))

    def reduce_memory(self) -> str | None:
        """Nothing task-side to shrink."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """The model shape and split sizes (for later evaluation)."""
        return {
            "model": {**nca_config(self.config).__dict__, "embed_dim": self.config.embed_dim},
            "n_train": len(self.train_x),
            "n_val": len(self.val_x),
            "loss_steps": list(self.loss_steps),
        }


def evaluate_generated(
    gen: torch.Tensor,
    real: torch.Tensor,
    labels: torch.Tensor,
    class_means: torch.Tensor,
    classifier: nn.Module,
) -> dict[str, float]:
    """Score generated digits against real ones of the same classes.

    Args:
        gen: Generated digits ``(N, S, S)`` in [0, 1], ``gen[i]`` of class ``labels[i]``.
        real: The real digits ``(N, S, S)`` they are compared with.
        labels: ``(N,)`` classes.
        class_means: ``(10, S, S)`` mean real image per class.
        classifier: Real-digit recogniser ``(N, S, S)`` → logits.

    Returns:
        ``pixel_acc``, ``mse_means``, ``recognised`` (over all N), the same per class as ``*_<k>``
        (classes without items are left out), and ``classifier_acc_real`` on ``real``.
    """
    gen, real, labels = gen.float().cpu(), real.float().cpu(), labels.cpu()
    pix = ((gen > 0.5) == (real > 0.5)).float().flatten(1).mean(1)
    mse = (gen - class_means[labels]).pow(2).flatten(1).mean(1)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        hit = (classifier(gen).argmax(1) == labels).float()
        real_hit = (classifier(real).argmax(1) == labels).float()
    out = {
        "pixel_acc": float(pix.mean()),
        "mse_means": float(mse.mean()),
        "recognised": float(hit.mean()),
        "classifier_acc_real": float(real_hit.mean()),
    }
    for k in range(N_CLASSES):
        sel = labels == k
        if sel.any():
            out[f"pixel_acc_{k}"] = float(pix[sel].mean())
            out[f"mse_means_{k}"] = float(mse[sel].mean())
            out[f"recognised_{k}"] = float(hit[sel].mean())
    return out


# ------------------------------------------------------------------------------------------ inference
class DigitsRunner(GenerationRunner):
    """A trained digit NCA: ``digit_K_NNN.png`` (grayscale), ``samples`` per requested digit ``K``."""

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: torch.device, amp: str = "none") -> DigitsRunner:
        """Rebuild the model from the run's config."""
        cfg = checkpoint.config
        model = load_weights(build_model(cfg), checkpoint)  # type: ignore[arg-type]
        return cls(model, seed_state(cfg), checkpoint, device, amp)  # type: ignore[arg-type]

    def default_steps(self) -> int:
        """The run's ``steps``."""
        return int(self.config.steps)

    def grow(self, n: int, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One grown state per label: ``(B,)`` → ``(B, C, S, S)``."""
        if labels is None:
            raise ValueError("a digits model grows one sample per label")
        return self.model(self.seeds(len(labels)), steps, labels.to(self.device))

    def digits(self, labels: tuple[int, ...] | None) -> list[int]:
        """The requested digits (all ten by default), checked.

        Raises:
            NcaError: A label outside 0-9.
        """
        if labels is None:
            return list(range(N_CLASSES))
        bad = [int(k) for k in labels if not 0 <= int(k) < N_CLASSES]
        if bad:
            raise NcaError(f"--labels must be digits 0-9 for a digits checkpoint, got {bad}")
        return [int(k) for k in labels]

    def write_samples(self, request: PredictRequest, steps: int) -> list[str]:
        """``digit_K_NNN.png`` for each requested digit ``K``."""
        wanted = torch.tensor(self.digits(request.labels)).repeat_interleave(request.samples)
        pixels = to_uint8(self.grow(len(wanted), steps, wanted)[:, 0].float().cpu().numpy(), 0.0, 1.0)
        return [
            str(write_png(img, request.output / f"digit_{k}_{i % request.samples:03d}.png"))
            for i, (k, img) in enumerate(zip(wanted.tolist(), pixels, strict=True))
        ]

    def animation_start(self) -> tuple[Any, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The ten digits side by side, each conditioned on its label's embedding."""
        with torch.no_grad():
            cond = self.model.embed(torch.arange(N_CLASSES, device=self.device))
        return self.model.nca, self.seeds(N_CLASSES), cond, {"classes": list(range(N_CLASSES))}

    def draw(self, state: torch.Tensor, hidden: int, scale: int) -> np.ndarray:
        """The digits (channel 0, white on black) in a row, then one row per hidden channel."""
        digits = state[:, 0].clamp(0.0, 1.0).numpy()
        rows = [[upscale(gray_to_rgb(d, 0.0, 1.0), scale) for d in digits]]
        rows += [hidden_tiles(state[:, self.first_hidden + k].numpy(), scale) for k in range(hidden)]
        return tile_grid(rows)

    def columns(self, batch: int, hidden: int) -> int:
        return batch
