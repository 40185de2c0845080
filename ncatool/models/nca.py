"""The one NCA core: perception, update rule, stochastic update, alive masking, in 2D and 3D.

Layout: states are ``(B, C, H, W)`` in 2D and ``(B, C, D, H, W)`` in 3D. The first ``fixed_channels``
channels (the input image for segmentation) are never updated; the rule writes the other
``C - fixed_channels`` channels.

One step::

    p   = perceive(x)                           # identity + filters, (B, C*(1+K), *S)
    dx  = rule(cat(p, cond))                    # 1x1 MLP, last layer zero-initialised
    m   = rand(B, 1, *S) < fire_rate            # a cell updates with probability fire_rate
    x'  = x + dx * m                            # only the non-fixed channels
    x'  = x' * (alive(x) & alive(x'))           # optional (Growing NCA)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ncatool.models.filters import FIXED_FILTERS, filter_bank

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class NCAConfig:
    """Shape and behaviour of one NCA.

    Attributes:
        channels: State channels C, including the fixed ones.
        fixed_channels: Leading channels the rule never changes (the input image).
        hidden: Width of the 1x1 MLP.
        dim: 2 or 3 spatial dimensions.
        filters: Perception filters besides identity: names from ``FIXED_FILTERS`` or ``"learned"``.
        learned_kernel: Kernel size of the learned depthwise filters.
        n_learned: Number of learned depthwise filters per channel (Med-NCA uses 2).
        fire_rate: Probability that a cell updates in a step (1.0 = deterministic).
        alive_channel: Channel whose 3^dim max-pool > ``alive_threshold`` marks living cells; None
            disables alive masking.
        alive_threshold: Threshold for alive masking (Growing NCA: 0.1).
        cond_channels: Extra per-cell inputs to the rule (e.g. a label embedding), broadcast in space.
        padding: Border handling of the perception: zeros, reflect, replicate or circular.
    """

    channels: int = 16
    fixed_channels: int = 1
    hidden: int = 128
    dim: int = 2
    filters: tuple[str, ...] = ("learned",)
    learned_kernel: int = 3
    n_learned: int = 2
    fire_rate: float = 0.5
    alive_channel: int | None = None
    alive_threshold: float = 0.1
    cond_channels: int = 0
    padding: str = "reflect"


def check_nca_config(cfg: NCAConfig) -> None:
    """Raise ``ValueError`` with a clear message for an inconsistent config."""
    if cfg.dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {cfg.dim}")
    if not 0 <= cfg.fixed_channels < cfg.channels:
        raise ValueError(f"fixed_channels must be in [0, channels={cfg.channels}), got {cfg.fixed_channels}")
    if not 0.0 < cfg.fire_rate <= 1.0:
        raise ValueError(f"fire_rate must be in (0, 1], got {cfg.fire_rate}")
    unknown = [f for f in cfg.filters if f not in (*FIXED_FILTERS, "learned")]
    if unknown:
        raise ValueError(f"unknown filter(s) {unknown}; choose from {[*FIXED_FILTERS, 'learned']}")
    if cfg.padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {cfg.padding!r}")
    if cfg.learned_kernel % 2 != 1:
        raise ValueError(f"learned_kernel must be odd, got {cfg.learned_kernel}")
    if cfg.alive_channel is not None and not 0 <= cfg.alive_channel < cfg.channels:
        raise ValueError(f"alive_channel must be a state channel, got {cfg.alive_channel}")


def _pad(x: torch.Tensor, radius: int, mode: str) -> torch.Tensor:
    """Pad all spatial sides of ``x`` (B, C, *S) by ``radius``."""
    if radius == 0:
        return x
    pads = [radius] * (2 * (x.dim() - 2))
    if mode == "zeros":
        return F.pad(x, pads)
    return F.pad(x, pads, mode=mode)


class Perception(nn.Module):
    """Identity plus depthwise filters, as one tensor of per-cell features.

    Fixed filters are registered buffers (so ``.to(device)`` moves them); ``learned`` filters are
    depthwise convolutions. All fixed 3x3(x3) kernels run as one grouped convolution.

    Args:
        cfg: The NCA config (channels, dim, filters, padding, learned kernel).

    Shapes:
        input ``(B, C, *S)`` → output ``(B, C * (1 + K), *S)`` with K the number of kernels.
    """

    def __init__(self, cfg: NCAConfig) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.padding = cfg.padding
        self.channels = cfg.channels
        fixed = [name for name in cfg.filters if name != "learned"]
        bank = filter_bank(fixed, cfg.dim) if fixed else torch.zeros(0, *([3] * cfg.dim))
        self.n_fixed = int(bank.shape[0])
        # (C*K, 1, 3, 3[, 3]): every channel gets every kernel, grouped by channel.
        self.register_buffer("fixed_weight", bank.repeat(cfg.channels, *([1] * cfg.dim)).unsqueeze(1))
        self.learned: nn.ModuleList = nn.ModuleList()
        if "learned" in cfg.filters:
            conv = nn.Conv2d if cfg.dim == 2 else nn.Conv3d
            for _ in range(cfg.n_learned):
                self.learned.append(
                    conv(cfg.channels, cfg.channels, cfg.learned_kernel, padding=0, groups=cfg.channels)
                )
        self.learned_radius = cfg.learned_kernel // 2

    @property
    def out_channels(self) -> int:
        """Feature channels per cell: C * (1 + fixed kernels + learned filters)."""
        return self.channels * (1 + self.n_fixed + len(self.learned))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Perceive the neighbourhood.

        Args:
            x: State ``(B, C, *S)``.

        Returns:
            Features ``(B, C * (1 + K), *S)``: identity first, then fixed, then learned filters.
        """
        feats = [x]
        conv = F.conv2d if self.dim == 2 else F.conv3d
        if self.n_fixed:
            w = self.fixed_weight.to(x.dtype)
            feats.append(conv(_pad(x, 1, self.padding), w, groups=self.channels))
        if len(self.learned):
            xp = _pad(x, self.learned_radius, self.padding)
            feats.extend(layer(xp) for layer in self.learned)
        return torch.cat(feats, dim=1) if len(feats) > 1 else x


class UpdateRule(nn.Module):
    """The per-cell MLP as 1x1 convolutions; the last layer starts at zero (identity dynamics).

    Args:
        in_channels: Perception (+ conditioning) channels.
        hidden: Hidden width.
        out_channels: Channels it updates.
        dim: 2 or 3.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, dim: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.fc0 = conv(in_channels, hidden, 1)
        self.fc1 = conv(hidden, out_channels, 1, bias=False)
        nn.init.zeros_(self.fc1.weight)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """``(B, in, *S)`` → update ``(B, out, *S)``."""
        return self.fc1(F.relu(self.fc0(p)))


def fire_mask(
    shape: Sequence[int], fire_rate: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Stochastic update mask: 1 where a cell updates this step, with probability ``fire_rate``.

    Args:
        shape: ``(B, 1, *S)``.
        fire_rate: Probability that a cell updates; 1.0 gives all ones.
        device: Device of the mask.
        dtype: Dtype of the mask.

    Returns:
        A 0/1 tensor of ``shape``.
    """
    if fire_rate >= 1.0:
        return torch.ones(shape, device=device, dtype=dtype)
    return (torch.rand(shape, device=device) < fire_rate).to(dtype)


def alive_mask(x: torch.Tensor, channel: int, threshold: float) -> torch.Tensor:
    """Cells with a live neighbour: max-pool of ``x[:, channel]`` over 3^dim > ``threshold``.

    Args:
        x: State ``(B, C, *S)``.
        channel: The alpha channel.
        threshold: Alive threshold.

    Returns:
        Boolean ``(B, 1, *S)``.
    """
    a = x[:, channel : channel + 1]
    pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
    return pool(a, kernel_size=3, stride=1, padding=1) > threshold


class NCA(nn.Module):
    """A Neural Cellular Automaton in 2D or 3D.

    Args:
        cfg: Its :class:`NCAConfig`.
    """

    def __init__(self, cfg: NCAConfig) -> None:
        super().__init__()
        check_nca_config(cfg)
        self.cfg = cfg
        self.perception = Perception(cfg)
        self.rule = UpdateRule(
            self.perception.out_channels + cfg.cond_channels,
            cfg.hidden,
            cfg.channels - cfg.fixed_channels,
            cfg.dim,
        )

    def step(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """One NCA step.

        Args:
            x: State ``(B, C, *S)``.
            cond: Optional conditioning ``(B, cond_channels)``, broadcast over space.

        Returns:
            The next state ``(B, C, *S)``.
        """
        cfg = self.cfg
        p = self.perception(x)
        if cfg.cond_channels:
            if cond is None:
                raise ValueError("this NCA is conditional: pass cond of shape (B, cond_channels)")
            view = (*cond.shape, *([1] * cfg.dim))
            p = torch.cat([p, cond.to(p.dtype).view(view).expand(-1, -1, *x.shape[2:])], dim=1)
        dx = self.rule(p)
        mask = fire_mask((x.shape[0], 1, *x.shape[2:]), cfg.fire_rate, x.device, dx.dtype)
        k = cfg.fixed_channels
        new = x[:, k:] + dx * mask
        new = torch.cat([x[:, :k], new], dim=1) if k else new
        if cfg.alive_channel is not None:
            pre = alive_mask(x, cfg.alive_channel, cfg.alive_threshold)
            post = alive_mask(new, cfg.alive_channel, cfg.alive_threshold)
            new = new * (pre & post).to(new.dtype)
        return new

    def _run(self, x: torch.Tensor, steps: int, cond: torch.Tensor | None) -> torch.Tensor:
        for _ in range(steps):
            x = self.step(x, cond)
        return x

    def forward(
        self,
        x: torch.Tensor,
        steps: int,
        cond: torch.Tensor | None = None,
        return_states: bool = False,
        checkpoint_every: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``steps`` steps.

        Args:
            x: Initial state ``(B, C, *S)``.
            steps: Number of steps.
            cond: Optional conditioning ``(B, cond_channels)``.
            return_states: Also return every intermediate state (for animation and multi-step losses).
            checkpoint_every: When > 0 and gradients are on, recompute chunks of this many steps in
                the backward pass instead of keeping their activations (memory O(steps / chunk)).

        Returns:
            The final state ``(B, C, *S)``, and with ``return_states`` the list of ``steps`` states.
        """
        use_ckpt = checkpoint_every > 0 and torch.is_grad_enabled() and not return_states
        if use_ckpt:
            done = 0
            while done < steps:
                n = min(checkpoint_every, steps - done)
                x = checkpoint(self._run, x, n, cond, use_reentrant=False)
                done += n
            return x
        if not return_states:
            return self._run(x, steps, cond)
        states = []
        for _ in range(steps):
            x = self.step(x, cond)
            states.append(x)
        return x, states
