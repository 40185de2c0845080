"""Growing NCA pieces on the shared core: the seed state, the sample pool, damage, and the
label-conditioned NCA for digit generation.

State layout of the growing task (Growing NCA, Distill 2020): ``(B, C, H, W)`` with channels 0-2 the
premultiplied RGB colour, channel 3 alpha (alive when the 3x3 max of alpha exceeds 0.1) and channels
4.. hidden. The seed is one live cell in the centre with alpha and every hidden channel at 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ncatool.models.nca import NCA, NCAConfig

ALPHA_CHANNEL = 3


def make_seed(
    channels: int, height: int, width: int, first_live_channel: int = ALPHA_CHANNEL
) -> torch.Tensor:
    """One live cell in the centre.

    Args:
        channels: State channels C.
        height: Grid height H.
        width: Grid width W.
        first_live_channel: Channels from this one on are set to 1 at the centre cell (alpha and
            hidden for Growing NCA; every channel but the output for digits).

    Returns:
        ``(C, H, W)`` float32 zeros except ``[first_live_channel:, H // 2, W // 2] = 1``.
    """
    if not 0 <= first_live_channel < channels:
        raise ValueError(f"first_live_channel must be in [0, {channels}), got {first_live_channel}")
    seed = torch.zeros(channels, height, width)
    seed[first_live_channel:, height // 2, width // 2] = 1.0
    return seed


def circle_masks(
    n: int,
    height: int,
    width: int,
    radius: tuple[float, float] = (0.1, 0.4),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Random circular holes, as in Growing NCA's regeneration training.

    The grid spans ``[-1, 1]`` along each axis; a centre is drawn uniformly in ``[-0.5, 0.5]^2`` and
    a radius uniformly in ``radius`` (in the same units), from the global torch RNG.

    Args:
        n: Number of masks.
        height: Grid height.
        width: Grid width.
        radius: ``(min, max)`` radius.
        device: Where to build the masks.

    Returns:
        ``(n, 1, H, W)`` float32: 0 inside the circle (erased), 1 outside.
    """
    centre = torch.rand(n, 2) - 0.5
    r = radius[0] + (radius[1] - radius[0]) * torch.rand(n)
    ys = torch.linspace(-1.0, 1.0, height).view(1, height, 1)
    xs = torch.linspace(-1.0, 1.0, width).view(1, 1, width)
    dist2 = (ys - centre[:, 0].view(n, 1, 1)) ** 2 + (xs - centre[:, 1].view(n, 1, 1)) ** 2
    keep = (dist2 >= r.view(n, 1, 1) ** 2).float().unsqueeze(1)
    return keep.to(device) if device is not None else keep


class SamplePool:
    """A pool of NCA states that training samples from and writes back to (Growing NCA, experiment 2).

    Every batch: ``batch_size`` distinct pool entries are drawn; the one with the highest loss is
    replaced by the seed (so the NCA keeps learning to grow from scratch); with damage, the
    ``damage_n`` entries with the lowest loss get a random circle erased (so it learns to regrow).
    After the NCA ran, :meth:`commit` writes the new states back to the same entries.

    Args:
        seed: The seed state ``(C, H, W)``.
        size: Number of entries.
        device: Where the pool lives.
    """

    def __init__(self, seed: torch.Tensor, size: int, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.seed = seed.detach().to(device=device, dtype=torch.float32)
        self.states = self.seed.unsqueeze(0).repeat(size, *([1] * seed.dim())).contiguous()

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def sample(
        self,
        batch_size: int,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        damage_n: int = 0,
        radius: tuple[float, float] = (0.1, 0.4),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a batch, reseed its worst entry and damage its best ones (global torch RNG).

        Args:
            batch_size: Entries to draw (without replacement, at most the pool size).
            loss_fn: Per-sample loss of states ``(B, C, H, W)`` → ``(B,)``; higher is worse.
            damage_n: How many of the lowest-loss entries get a circle erased (never the reseeded
                one); 0 disables damage.
            radius: Circle radius range for :func:`circle_masks`.

        Returns:
            ``(indices (B,), states (B, C, H, W))``; ``states`` is a copy, in loss order (worst
            first, replaced by the seed; best last).
        """
        if not 1 <= batch_size <= len(self):
            raise ValueError(f"batch size must be in [1, pool size {len(self)}], got {batch_size}")
        idx = torch.randperm(len(self))[:batch_size].to(self.states.device)
        x = self.states[idx].clone()
        with torch.no_grad():
            loss = loss_fn(x).float()
        loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("inf")))
        order = torch.argsort(loss, descending=True, stable=True)
        idx, x = idx[order], x[order]
        x[0] = self.seed
        n = min(damage_n, batch_size - 1)
        if n > 0:
            h, w = x.shape[-2:]
            x[-n:] *= circle_masks(n, h, w, radius, device=x.device)
        return idx, x

    def commit(self, idx: torch.Tensor, states: torch.Tensor) -> None:
        """Write ``states (B, C, H, W)`` back to entries ``idx``; non-finite states become the seed."""
        states = states.detach().to(self.states.device, torch.float32)
        finite = torch.isfinite(states.flatten(1)).all(1)
        states = torch.where(finite.view(-1, *([1] * (states.dim() - 1))), states, self.seed)
        self.states[idx.to(self.states.device)] = states

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The pool contents (for checkpoints), on the CPU."""
        return {"states": self.states.cpu().clone(), "seed": self.seed.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output; the shapes must match this pool's."""
        states = state["states"]
        if tuple(states.shape) != tuple(self.states.shape):
            raise ValueError(
                f"pool in checkpoint has shape {tuple(states.shape)}, expected {tuple(self.states.shape)}"
            )
        self.states = states.to(self.states.device, torch.float32).clone()


def growing_nca_config(
    channels: int = 16,
    hidden: int = 128,
    filters: Sequence[str] = ("sobel",),
    fire_rate: float = 0.5,
    alive_threshold: float = 0.1,
    border: str = "zeros",
) -> NCAConfig:
    """The Growing NCA shape on the shared core: nothing fixed, alpha channel 3 drives alive masking."""
    return NCAConfig(
        channels=channels,
        fixed_channels=0,
        hidden=hidden,
        dim=2,
        filters=tuple(filters),
        fire_rate=fire_rate,
        alive_channel=ALPHA_CHANNEL,
        alive_threshold=alive_threshold,
        padding=border,
    )


class ConditionalNCA(nn.Module):
    """An NCA whose update rule also sees a learned embedding of a class label.

    The embedding ``(B, embed_dim)`` of each sample's label is fed to the rule of every cell as extra
    inputs (the core's ``cond_channels``), so one set of weights grows a different pattern per label.

    Args:
        nca: Config of the core; its ``cond_channels`` must equal ``embed_dim``.
        n_classes: Number of labels.
        embed_dim: Embedding width.
    """

    def __init__(self, nca: NCAConfig, n_classes: int = 10, embed_dim: int = 8) -> None:
        super().__init__()
        if nca.cond_channels != embed_dim:
            raise ValueError(f"cond_channels ({nca.cond_channels}) must equal embed_dim ({embed_dim})")
        self.n_classes = n_classes
        self.embed = nn.Embedding(n_classes, embed_dim)
        self.nca = NCA(nca)

    @property
    def cfg(self) -> NCAConfig:
        """The core's config."""
        return self.nca.cfg

    def forward(
        self,
        x: torch.Tensor,
        steps: int,
        labels: torch.Tensor,
        return_states: bool = False,
        checkpoint_every: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``steps`` steps conditioned on ``labels``.

        Args:
            x: Initial states ``(B, C, H, W)``.
            steps: Number of steps.
            labels: ``(B,)`` integer labels in ``[0, n_classes)``.
            return_states: Also return every intermediate state.
            checkpoint_every: Gradient checkpointing chunk (see :meth:`NCA.forward`).

        Returns:
            As :meth:`NCA.forward`.
        """
        cond = self.embed(labels.long())
        return self.nca(x, steps, cond=cond, return_states=return_states, checkpoint_every=checkpoint_every)
