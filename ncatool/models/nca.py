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

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
        self.register_buffer("fast_order", self._fast_order(), persistent=False)

    @property
    def out_channels(self) -> int:
        """Feature channels per cell: C * (1 + fixed kernels + learned filters)."""
        return self.channels * (1 + self.n_fixed + len(self.learned))

    def depthwise(self) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """The perception's filters as depthwise convolutions, for the fast step.

        One ``(weight (C, 1, k, ...), bias or None, radius)`` per filter: each fixed kernel (the same
        for every channel) and each learned layer. With a channel multiplier of 1 oneDNN runs them
        ~10x faster than one grouped convolution with ``C * K`` outputs. The fast step's features are
        ``[x | filter 1 | filter 2 | ...]``; :attr:`fast_order` maps them to :meth:`forward`'s order.
        """
        c, d = self.channels, self.dim
        out: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        if self.n_fixed:
            fixed = self.fixed_weight.view(c, self.n_fixed, *([3] * d))
            out.extend((fixed[:, i : i + 1], None, 1) for i in range(self.n_fixed))
        out.extend((layer.weight, layer.bias, self.learned_radius) for layer in self.learned)
        return out

    def _fast_order(self) -> torch.Tensor:
        """``order[j]``: index in :meth:`forward`'s order ``[x | fixed (c-major) | learned...]`` of
        feature ``j`` of the fast layout ``[x | fixed_1 (all c) | ... | learned_1 | ...]``."""
        c, k = self.channels, self.n_fixed
        order = list(range(c))
        for i in range(k):
            order.extend(c + ch * k + i for ch in range(c))
        for i in range(len(self.learned)):
            order.extend(c + c * k + i * c + ch for ch in range(c))
        return torch.tensor(order, dtype=torch.long)

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


def _onednn_linear_op() -> Any:
    """``torch.ops.mkldnn._linear_pointwise`` when it works here, else None.

    On x86 CPUs oneDNN's matmul runs the NCA's thin products (cells x 48 @ 48 x 128) 2-2.5x faster
    in float32 than ``torch.addmm`` (MKL) and fuses the ReLU. It is an internal PyTorch op (the one
    TorchInductor uses), so it is probed once against ``addmm`` and skipped if missing or different;
    ``NCATOOL_ONEDNN=0`` turns it off.
    """
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("NCATOOL_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
                # fixed values: the probe must not draw from the global RNG (fire masks do)
                a = torch.linspace(-1.0, 1.0, 40).view(8, 5)
                w, b = torch.linspace(1.0, -0.5, 15).view(3, 5), torch.tensor([0.1, -0.2, 0.3])
                if torch.allclose(op(a, w, b, "relu", [], ""), torch.relu(torch.addmm(b, a, w.t())), atol=1e-5):
                    _ONEDNN = op
            except (AttributeError, RuntimeError):
                _ONEDNN = False
    return _ONEDNN or None


_ONEDNN: Any = None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``x @ w.T + b`` (then ReLU), with oneDNN on CPU where it works."""
    op = _onednn_linear_op() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) else None
    if op is not None:
        return op(x, w, b, "relu" if relu else "none", [], "")
    y = torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    return y.relu_() if relu else y


class _CellMLP(torch.autograd.Function):
    """``relu(rows @ w0.T + b0) @ w1.T`` over a ``(cells, features)`` matrix, with its backward.

    The hand-written backward keeps only the input rows and the hidden activations and runs the
    products through :func:`_linear`; autograd's version of the same ops spends ~2x longer in MKL and
    in the ReLU mask. ``per_row_bias`` (conditioning) replaces ``b0`` when given.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor
    ) -> torch.Tensor:
        with torch.autocast(rows.device.type, enabled=False):
            if b0.dim() == 2:  # one bias per row
                h = _linear(rows, w0, None).add_(b0).relu_()
            else:
                h = _linear(rows, w0, b0, relu=True)
            out = _linear(h, w1, None)
        ctx.save_for_backward(rows, w0, w1, h)
        ctx.row_bias = b0.dim() == 2
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        rows, w0, w1, h = ctx.saved_tensors
        grad = grad.contiguous().to(h.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            g_w1 = _weight_grad(grad, h) if ctx.needs_input_grad[3] else None
            gh = _linear(grad, w1.t().contiguous(), None)
            torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)  # ReLU', in place
            g_rows = _linear(gh, w0.t().contiguous(), None) if ctx.needs_input_grad[0] else None
            g_w0 = _weight_grad(gh, rows) if ctx.needs_input_grad[1] else None
            g_b0 = (gh if ctx.row_bias else gh.sum(0)) if ctx.needs_input_grad[2] else None
        return g_rows, g_w0, g_b0, g_w1


def _weight_grad(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad.T @ inputs``, a reduction over cells (MKL reads the transposes in place; oneDNN copies)."""
    return torch.mm(grad.t(), inputs)


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ~1/64 of its power of two (at least 64): <= 1.6 % more rows."""
    step = max(64, 1 << max(0, n.bit_length() - 7))
    return -(-n // step) * step


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if kind not in ("cpu", "cuda", "mps", "xpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


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
            The next state ``(B, C, *S)``, channels-last in memory (see :meth:`_step_fast`).
        """
        cfg = self.cfg
        if cfg.cond_channels and cond is None:
            raise ValueError("this NCA is conditional: pass cond of shape (B, cond_channels)")
        return self._step_fast(x, cond)

    def _step_fast(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The step as ncatool runs it: same result as :meth:`_step_reference`, less work.

        - The state lives channels-last (``(B, *S, C)`` in memory), so every cell is a row of a
          ``(cells, C)`` matrix: the 1x1 MLP is two matrix products over cells with no layout copies.
        - The perception is one depthwise convolution per filter (channel multiplier 1, the fast
          kernel in oneDNN) and one concatenation; the MLP's first weight is permuted to match.
        - Only the cells that fire go through the MLP (rows gathered by the fire mask, drawn exactly
          as :func:`fire_mask` draws it); the others would be multiplied by 0. At fire rate 0.5 this
          halves the MLP's work, forward and backward.
        """
        cfg = self.cfg
        dim = cfg.dim
        memory_format = torch.channels_last if dim == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=memory_format)
        batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
        cells = x.numel() // channels
        device = x.device
        compute = _autocast_dtype(device) or x.dtype
        # On CPU the depthwise convolutions are no faster in bf16; on GPUs they follow autocast.
        conv_dtype = x.dtype if device.type == "cpu" else compute
        conv = F.conv2d if dim == 2 else F.conv3d
        order = self.perception.fast_order
        with torch.autocast(device.type, enabled=False):
            xc = x.to(conv_dtype)
            feats = [xc]
            padded: dict[int, torch.Tensor] = {}
            for weight, bias, radius in self.perception.depthwise():
                w = weight.to(conv_dtype)
                b = bias.to(conv_dtype) if bias is not None else None
                if cfg.padding == "zeros" or radius == 0:
                    feats.append(conv(xc, w, b, padding=radius, groups=channels))
                else:
                    if radius not in padded:
                        padded[radius] = _pad(xc, radius, cfg.padding)
                    feats.append(conv(padded[radius], w, b, groups=channels))
            p = torch.cat(feats, dim=1) if len(feats) > 1 else xc
        to_rows = (0, *range(2, dim + 2), 1)
        rows = p.permute(to_rows).reshape(cells, p.shape[1])

        idx = idx_rows = None
        fired = cells
        if cfg.fire_rate < 1.0:
            mask = fire_mask((batch, 1, *spatial), cfg.fire_rate, device, torch.bool)
            idx = mask.reshape(-1).nonzero().squeeze(1)
            fired = idx.numel()
            # Pad the row count to a coarse multiple with copies of one row (their results are
            # dropped): oneDNN builds a kernel per matrix shape, and the fired count changes every step.
            n_rows = _bucket(fired)
            if n_rows > fired and fired:
                idx_rows = torch.cat([idx, idx[:1].expand(n_rows - fired)])
            else:
                idx_rows = idx
            rows = rows.index_select(0, idx_rows)

        w0 = self.rule.fc0.weight.flatten(1)  # (hidden, perception [+ cond])
        n_feat = order.numel()
        w0_feat = w0[:, :n_feat].index_select(1, order).to(compute)
        b0 = self.rule.fc0.bias
        if cfg.cond_channels:
            assert cond is not None
            per_batch = torch.addmm(b0, cond.to(w0.dtype), w0[:, n_feat:].t())  # (B, hidden)
            which = torch.arange(batch, device=device).repeat_interleave(cells // batch)
            if idx_rows is not None:
                which = which.index_select(0, idx_rows)
            b0 = per_batch.index_select(0, which)
        w1 = self.rule.fc1.weight.flatten(1).to(compute)  # (C - k, hidden)
        dx = _CellMLP.apply(rows.to(compute), w0_feat, b0.to(compute), w1)[:fired]

        k = cfg.fixed_channels
        new = x.permute(to_rows).reshape(cells, channels).clone()
        target = new[:, k:] if k else new
        if idx is not None:
            target.index_add_(0, idx, dx.to(new.dtype))
        else:
            target.add_(dx.to(new.dtype))
        new = new.view(batch, *spatial, channels).permute(0, dim + 1, *range(1, dim + 1))
        if cfg.alive_channel is not None:
            life = alive_mask(x, cfg.alive_channel, cfg.alive_threshold)
            life &= alive_mask(new, cfg.alive_channel, cfg.alive_threshold)
            new = new * life.to(new.dtype)
        return new

    def _step_reference(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The straightforward step (perceive, concatenate, 1x1 convolutions, mask): for tests."""
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
        # The steps run channels-last (see _step_fast); callers get the usual contiguous layout back.
        x = x.contiguous(memory_format=torch.channels_last if self.cfg.dim == 2 else torch.channels_last_3d)
        use_ckpt = checkpoint_every > 0 and torch.is_grad_enabled() and not return_states
        if use_ckpt:
            done = 0
            while done < steps:
                n = min(checkpoint_every, steps - done)
                x = checkpoint(self._run, x, n, cond, use_reentrant=False)
                done += n
            return x.contiguous()
        if not return_states:
            return self._run(x, steps, cond).contiguous()
        states = []
        for _ in range(steps):
            x = self.step(x, cond)
            states.append(x.contiguous())
        return states[-1] if states else x.contiguous(), states
