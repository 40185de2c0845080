"""The one NCA core: perception, update rule, stochastic update, alive masking, in 2D and 3D.

Layout: states are ``(B, C, H, W)`` in 2D and ``(B, C, D, H, W)`` in 3D. The first ``fixed_channels``
channels (the input image for segmentation) are never updated; the rule writes the other
``C - fixed_channels`` channels.

One step (:meth:`NCA.reference_step`, the definition)::

    p   = perceive(x)                           # identity + filters, (B, C*(1+K), *S)
    dx  = rule(cat(p, cond))                    # 1x1 MLP, last layer zero-initialised
    m   = rand(B, 1, *S) < fire_rate            # a cell updates with probability fire_rate
    x'  = x + dx * m                            # only the non-fixed channels
    x'  = x' * (alive(x) & alive(x'))           # optional (Growing NCA)

What runs the step is a setting, ``NCA.backend``: ``"reference"`` runs the step above as written;
``"fast"`` runs :mod:`ncatool.models.fast_step` (channels-last rows, only the fired cells through
the MLP, fused C++ operators on CPU: the same result to float32 rounding, from the same random
draws; its docstring has the measurements); ``"auto"`` (the default) is fast on CPU and CUDA and
the reference elsewhere; ``"compiled"`` runs the reference step through ``torch.compile``
(:mod:`ncatool.models.compiled_step`, for GPUs). :func:`set_backend` sets it on every NCA in a model.

:meth:`NCA.rollout` yields the state after every step (animation); ``forward(..., step_budget=n)``
runs each step in slabs of about ``n`` bytes of temporaries (:mod:`ncatool.models.slabs`), for
inference on volumes whose whole-state step would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ncatool.models.filters import FIXED_FILTERS, filter_bank
from ncatool.models.shard import per_sample_uniform
from ncatool.models.slabs import run_in_slabs, slab_step

if TYPE_CHECKING:
    from ncatool.models.fast_step import FastOptions

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
BACKENDS = ("auto", "reference", "fast", "compiled")
FAST_DEVICES = ("cpu", "cuda")  # "auto" runs the fast step there (CUDA: the masked, sync-free variant)
MEMORY_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}  # the fast step's layout


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


def pad(x: torch.Tensor, radius: int, mode: str) -> torch.Tensor:
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
            feats.append(conv(pad(x, 1, self.padding), w, groups=self.channels))
        if len(self.learned):
            xp = pad(x, self.learned_radius, self.padding)
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

    Both backends draw it this way, from the global generator, so the same seed fires the same cells.

    Args:
        shape: ``(B, 1, *S)``.
        fire_rate: Probability that a cell updates; 1.0 gives all ones.
        device: Where the mask lives.
        dtype: Its dtype (0/1 values).
    """
    if fire_rate >= 1.0:
        return torch.ones(shape, device=device, dtype=dtype)
    return (per_sample_uniform(shape, device) < fire_rate).to(dtype)


def alive_mask(x: torch.Tensor, channel: int, threshold: float) -> torch.Tensor:
    """Cells with a live neighbour: max-pool of ``x[:, channel]`` over 3^dim > ``threshold``.

    Computed as the 3^dim dilation of ``x[:, channel] > threshold`` (the same set: a maximum exceeds
    the threshold exactly when one of its values does), one shifted OR per side and axis, which is
    several times faster than ``max_pool`` on a channels-last state.

    Args:
        x: State ``(B, C, *S)``.
        channel: The alpha channel.
        threshold: Alive threshold.

    Returns:
        Boolean ``(B, 1, *S)``.
    """
    alive = x[:, channel : channel + 1] > threshold
    for axis in range(2, x.dim()):
        n = alive.shape[axis]
        if n < 2:
            continue
        grown = alive.clone()
        grown.narrow(axis, 1, n - 1).logical_or_(alive.narrow(axis, 0, n - 1))
        grown.narrow(axis, 0, n - 1).logical_or_(alive.narrow(axis, 1, n - 1))
        alive = grown
    return alive


class NCA(nn.Module):
    """A Neural Cellular Automaton in 2D or 3D.

    Args:
        cfg: Its :class:`NCAConfig`.
        backend: What runs a step: ``"auto"``, ``"reference"``, ``"fast"`` or ``"compiled"`` (module doc).
        fast_options: Settings of the fast step (:class:`ncatool.models.fast_step.FastOptions`);
            None for its defaults.
    """

    def __init__(
        self, cfg: NCAConfig, backend: str = "auto", fast_options: FastOptions | None = None
    ) -> None:
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
        self.backend = _checked_backend(backend)
        self.fast_options = fast_options

    def runs_fast(self, x: torch.Tensor) -> bool:
        """Whether a step of ``x`` runs on the fast backend."""
        backend = _checked_backend(self.backend)
        return backend == "fast" or (backend == "auto" and x.device.type in FAST_DEVICES)

    def step(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, fire: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One NCA step of ``x`` ``(B, C, *S)`` on the backend the ``backend`` setting picks.

        ``cond`` ``(B, cond_channels)`` conditions a conditional NCA; ``fire`` ``(B, 1, *S)`` (bool or
        0/1) gives the cells that update, None draws them (:func:`fire_mask`). Returns the next state
        (channels-last in memory on the fast backend).
        """
        return self._step(x, cond, fire, recompute=False)

    def _step(
        self, x: torch.Tensor, cond: torch.Tensor | None, fire: torch.Tensor | None, recompute: bool
    ) -> torch.Tensor:
        if self.cfg.cond_channels and cond is None:
            raise ValueError("this NCA is conditional: pass cond of shape (B, cond_channels)")
        if self.backend == "compiled":
            from ncatool.models.compiled_step import compiled_step

            return compiled_step(self, x, cond, fire)
        if not self.runs_fast(x):
            return self.reference_step(x, cond, fire)
        from ncatool.models.fast_step import fast_step  # imported late: it builds on this module

        return fast_step(self, x, cond, fire, recompute, self.fast_options)

    def reference_step(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, fire: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The step as the module docstring writes it: perceive, 1x1 MLP, fire mask, alive mask."""
        cfg = self.cfg
        p = self.perception(x)
        if cfg.cond_channels:
            if cond is None:
                raise ValueError("this NCA is conditional: pass cond of shape (B, cond_channels)")
            view = (*cond.shape, *([1] * cfg.dim))
            p = torch.cat([p, cond.to(p.dtype).view(view).expand(-1, -1, *x.shape[2:])], dim=1)
        dx = self.rule(p)
        if fire is None:
            fire = fire_mask((x.shape[0], 1, *x.shape[2:]), cfg.fire_rate, x.device, dx.dtype)
        k = cfg.fixed_channels
        new = x[:, k:] + dx * fire.to(dx.dtype)
        new = torch.cat([x[:, :k], new], dim=1) if k else new
        if cfg.alive_channel is not None:
            pre = alive_mask(x, cfg.alive_channel, cfg.alive_threshold)
            post = alive_mask(new, cfg.alive_channel, cfg.alive_threshold)
            new = new * (pre & post).to(new.dtype)
        return new

    def rollout(
        self, x: torch.Tensor, steps: int, cond: torch.Tensor | None = None, step_budget: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the state ``(B, C, *S)`` after each of ``steps`` steps from ``x`` (a yielded state is
        never changed later). ``step_budget``: run each step in slabs with about this many bytes of
        temporaries (:func:`ncatool.models.slabs.slab_step`)."""
        x = x.contiguous(memory_format=MEMORY_FORMATS[self.cfg.dim])
        for _ in range(steps):
            x = self.step(x, cond) if step_budget is None else slab_step(self, x, cond, step_budget)
            yield x

    def _advance(
        self, x: torch.Tensor, steps: int, cond: torch.Tensor | None, recompute: bool
    ) -> torch.Tensor:
        for _ in range(steps):
            x = self._step(x, cond, None, recompute)
        return x

    def forward(
        self,
        x: torch.Tensor,
        steps: int,
        cond: torch.Tensor | None = None,
        return_states: bool = False,
        checkpoint_every: int = 0,
        step_budget: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``steps`` steps.

        Args:
            x: Initial state ``(B, C, *S)``.
            steps: Number of steps.
            cond: Optional conditioning ``(B, cond_channels)``.
            return_states: Also return every intermediate state (for animation and multi-step losses).
            checkpoint_every: When > 0 and gradients are on, recompute chunks of this many steps in
                the backward pass instead of keeping their activations (memory O(steps / chunk)).
            step_budget: Inference in slabs of about this many bytes of step temporaries, into two
                state buffers (:func:`ncatool.models.slabs.run_in_slabs`; gradients off): the same
                result as without, from the same random draws.

        Returns:
            The final state ``(B, C, *S)``, and with ``return_states`` the list of ``steps`` states.
        """
        # The fast steps run channels-last; callers get the usual contiguous layout back.
        x = x.contiguous(memory_format=MEMORY_FORMATS[self.cfg.dim])
        if step_budget is not None and not return_states:
            return run_in_slabs(self, x, steps, cond, step_budget).contiguous()
        if checkpoint_every > 0 and torch.is_grad_enabled() and not return_states:
            # The fast step keeps only its input state and fire mask (RecomputeStep); chunks of more
            # than one step also drop the states inside the chunk (torch checkpoint, recomputed).
            fast = self.runs_fast(x)
            if checkpoint_every == 1 and fast:
                return self._advance(x, steps, cond, recompute=True).contiguous()
            for done in range(0, steps, checkpoint_every):
                n = min(checkpoint_every, steps - done)
                x = checkpoint(self._advance, x, n, cond, fast, use_reentrant=False)
            return x.contiguous()
        states = []
        for state in self.rollout(x, steps, cond, step_budget):
            x = state
            if return_states:
                states.append(state.contiguous())
        return (x.contiguous(), states) if return_states else x.contiguous()


def _checked_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(module: nn.Module, backend: str, fast_options: FastOptions | None = None) -> int:
    """Set ``backend`` (one of :data:`BACKENDS`) and the fast step's options
    (:class:`ncatool.models.fast_step.FastOptions`, None: defaults) on every :class:`NCA` inside
    ``module`` (an NCA, a segmentation model ...); returns how many it set."""
    _checked_backend(backend)
    found = [m for m in module.modules() if isinstance(m, NCA)]
    for nca in found:
        nca.backend, nca.fast_options = backend, fast_options
    return len(found)
