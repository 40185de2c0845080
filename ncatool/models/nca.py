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

How it runs (``NCA.step`` → ``_step_fast``; ``_step_reference`` is the plain version, kept for tests;
measured on 2 CPU cores against ``benchmarks/reference_nca.py``, see ``benchmarks/README.md``):

- the state lives channels-last, so cells are rows of a ``(cells, C)`` matrix and the 1x1 MLP is two
  matrix products through oneDNN (``_linear``: 2-2.5x MKL's float32 ``addmm`` on these thin shapes);
- the perception is one depthwise convolution per filter (channel multiplier 1: ~10x faster in
  oneDNN than one grouped convolution with C*K outputs) and one concatenation;
- on CPU only the cells that fire go through the MLP (gathered rows; half the work at fire rate
  0.5); row counts are padded to a few fixed sizes so oneDNN reuses its kernels;
- the MLP has a hand-written backward (``_CellMLP``); with gradient checkpointing each step is one
  autograd node that keeps only its input and fire mask and recomputes the rest (``_RecomputeStep``);
- the alive mask is a dilation of ``alpha > threshold`` (shifted ORs) instead of a max-pool;
- on CPU, where a C compiler is present, :mod:`ncatool.models.kernels` fuses the memory-bound parts:
  the perception of the fired cells straight into the MLP's rows (no convolution over every cell, no
  concatenation, gather or cast) and its adjoint, the update with alive masking and its adjoint, the
  ReLU backward and the fire-mask indices (1 thread, 64x64x8: training 2.97 -> 3.40 M cell-updates/s
  fp32, 4.66 -> 6.67 bf16; inference 9.1 -> 12.8 fp32, 13.8 -> 20.1 bf16). Without a compiler the
  same step runs on PyTorch ops.
Results equal the plain step to float32 rounding, with the same random draws (tests/test_perf.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ncatool.models import kernels
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
                if torch.allclose(
                    op(a, w, b, "relu", [], ""), torch.relu(torch.addmm(b, a, w.t())), atol=1e-5
                ):
                    _ONEDNN = op
            except (AttributeError, RuntimeError):
                _ONEDNN = False
    return _ONEDNN or None


_ONEDNN: Any = None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``x @ w.T + b`` (then ReLU), with oneDNN on CPU where it works."""
    op = (
        _onednn_linear_op() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) else None
    )
    if op is not None:
        return op(x, w, b, "relu" if relu else "none", [], "")
    y = torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    return y.relu_() if relu else y


def _hidden(
    rows: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, which: torch.Tensor | None
) -> torch.Tensor:
    """``relu(rows @ w0.T + bias)``; ``b0`` is ``(hidden,)``, or ``(B, hidden)`` picked per row by ``which``."""
    if which is None:
        return _linear(rows, w0, b0, relu=True)
    return _linear(rows, w0, None).add_(b0.index_select(0, which)).relu_()


def _mlp_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    h: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    which: torch.Tensor | None,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``relu(rows @ w0.T + b0) @ w1.T`` for (rows, w0, b0, w1); ``h`` is overwritten."""
    g_w1 = _weight_grad(grad, h) if needs[3] else None
    gh = _linear(grad, w1.t().contiguous(), None)
    _relu_backward_(gh, h)
    g_rows = _linear(gh, w0.t().contiguous(), None) if needs[0] else None
    g_w0 = _weight_grad(gh, rows) if needs[1] else None
    g_b0 = None
    if needs[2]:
        g_b0 = gh.sum(0) if which is None else torch.zeros_like(b0).index_add_(0, which, gh)
    return g_rows, g_w0, g_b0, g_w1


#: Rows per chunk in the recomputing backward: bounds its temporaries (hidden activations).
_CHUNK_ROWS = 8192


def _chunked_mlp_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    which: torch.Tensor | None,
    needs: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The MLP's backward with the hidden layer recomputed, ``_CHUNK_ROWS`` rows at a time.

    Returns:
        ``(d rows, d w0, d b0, d w1)`` (None where ``needs`` = (w0, b0, w1) says not needed).
    """
    n = rows.shape[0]
    if n <= _CHUNK_ROWS:
        h = _hidden(rows, w0, b0, which)
        g_rows, g_w0, g_b0, g_w1 = _mlp_backward(grad, rows, h, w0, b0, w1, which, (True, *needs))
        assert g_rows is not None
        return g_rows, g_w0, g_b0, g_w1
    g_rows = rows.new_empty(n, w0.shape[1])
    g_w0 = torch.zeros_like(w0) if needs[0] else None
    g_b0 = torch.zeros_like(b0) if needs[1] else None
    g_w1 = torch.zeros_like(w1) if needs[2] else None
    for start in range(0, n, _CHUNK_ROWS):
        part = slice(start, min(n, start + _CHUNK_ROWS))
        sel = which[part] if which is not None else None
        h = _hidden(rows[part], w0, b0, sel)
        got = _mlp_backward(grad[part], rows[part], h, w0, b0, w1, sel, (True, *needs))
        del h
        assert got[0] is not None
        g_rows[part] = got[0]
        for acc, g in ((g_w0, got[1]), (g_b0, got[2]), (g_w1, got[3])):
            if acc is not None and g is not None:
                acc.add_(g)
    return g_rows, g_w0, g_b0, g_w1


class _CellMLP(torch.autograd.Function):
    """``relu(rows @ w0.T + b0) @ w1.T`` over a ``(cells, features)`` matrix, with its backward.

    The hand-written backward keeps only the input rows and the hidden activations and runs the
    products through :func:`_linear`; autograd's version of the same ops spends ~2x longer in MKL and
    in the ReLU mask. ``which`` (conditioning) picks a row of a ``(B, hidden)`` bias for each row.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        w0: torch.Tensor,
        b0: torch.Tensor,
        w1: torch.Tensor,
        which: torch.Tensor | None,
    ) -> torch.Tensor:
        with torch.autocast(rows.device.type, enabled=False):
            h = _hidden(rows, w0, b0, which)
            out = _linear(h, w1, None)
        ctx.save_for_backward(rows, w0, b0, w1, h)
        ctx.which = which
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        rows, w0, b0, w1, h = ctx.saved_tensors
        grad = grad.contiguous().to(h.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grads = _mlp_backward(grad, rows, h, w0, b0, w1, ctx.which, ctx.needs_input_grad[:4])
        return (*grads, None)


def _weight_grad(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad.T @ inputs``, a reduction over cells (MKL reads the transposes in place; oneDNN copies
    them, which costs more than its faster product gains)."""
    return torch.mm(grad.t(), inputs)


def _relu_backward_(grad: torch.Tensor, h: torch.Tensor) -> None:
    """Zero ``grad`` in place where ``h <= 0`` (the fused kernel on CPU: 3x faster in bfloat16)."""
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.bfloat16) and kernels.library():
        kernels.relu_backward_(grad, h.contiguous())
    else:
        torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)


#: Devices where only the fired cells go through the MLP (gathered rows). Elsewhere (CUDA) every
#: cell does and the update is multiplied by the fire mask: no host synchronisation per step.
GATHER_DEVICES = {"cpu"}


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


class _StepPlan:
    """Everything one fast step needs besides the autograd graph: layout, dtypes, fire mask, weights.

    Built once per step from the module and the input; :class:`_RecomputeStep` keeps it for the
    backward pass (it holds the fire mask, so the recomputation sees the same cells fire).
    """

    def __init__(self, nca: NCA, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        cfg = nca.cfg
        self.cfg = cfg
        dim = cfg.dim
        self.memory_format = torch.channels_last if dim == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=self.memory_format)
        self.x = x
        self.batch, self.channels, self.spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        self.cells = x.numel() // self.channels
        device = x.device
        self.device_type = device.type
        self.compute = _autocast_dtype(device) or x.dtype
        # On CPU the depthwise convolutions are no faster in bf16; on GPUs they follow autocast.
        self.conv_dtype = x.dtype if device.type == "cpu" else self.compute
        depthwise = nca.perception.depthwise()
        self.radii = [r for _, _, r in depthwise]
        self.has_bias = [b is not None for _, b, _ in depthwise]
        self.kernel_tensors = [t for w, b, _ in depthwise for t in ((w, b) if b is not None else (w,))]
        self.to_rows = (0, *range(2, dim + 2), 1)
        # the fused perception kernels (CPU, float32 state, float32/bf16 rows), else PyTorch ops
        self.use_kernels = (
            device.type == "cpu"
            and x.dtype == torch.float32
            and self.compute in (torch.float32, torch.bfloat16)
            and all((2 * r + 1) ** dim <= kernels.MAX_TAPS for r in self.radii)
            and kernels.library() is not None
        )

        self.idx: torch.Tensor | None = None
        self.idx_rows: torch.Tensor | None = None
        self.mask_rows: torch.Tensor | None = None  # (cells, 1) fire mask when not gathering
        self.fired = self.cells
        if cfg.fire_rate < 1.0 and device.type not in GATHER_DEVICES:
            # e.g. CUDA: a nonzero() per step would synchronise; multiply by the mask instead
            mask = fire_mask((self.batch, 1, *self.spatial), cfg.fire_rate, device, x.dtype)
            self.mask_rows = mask.reshape(self.cells, 1)
        elif cfg.fire_rate < 1.0:
            mask = fire_mask((self.batch, 1, *self.spatial), cfg.fire_rate, device, torch.bool)
            mask = mask.reshape(-1)
            idx = kernels.mask_indices(mask) if kernels.library() else mask.nonzero().squeeze(1)
            self.fired = idx.numel()
            # Pad the row count to a coarse multiple with copies of one row (their results are
            # dropped): oneDNN builds a kernel per matrix shape, and the fired count changes every step.
            n_rows = _bucket(self.fired)
            if n_rows > self.fired and self.fired:
                idx = torch.cat([idx, idx[:1].expand(n_rows - self.fired)])
            self.idx_rows = idx
            self.idx = idx[: self.fired]

        self.n_rows = self.idx_rows.numel() if self.idx_rows is not None else self.fired
        # the update and alive masking through the fused kernels (not for the masked variant)
        self.fused_update = self.use_kernels and self.mask_rows is None
        order = nca.perception.fast_order
        w0 = nca.rule.fc0.weight.flatten(1)  # (hidden, perception [+ cond])
        n_feat = order.numel()
        self.w0 = w0[:, :n_feat].index_select(1, order).to(self.compute)
        b0 = nca.rule.fc0.bias
        self.which: torch.Tensor | None = None
        if cfg.cond_channels:
            assert cond is not None
            b0 = torch.addmm(b0, cond.to(w0.dtype), w0[:, n_feat:].t())  # (B, hidden)
            which = torch.arange(self.batch, device=device).repeat_interleave(self.cells // self.batch)
            self.which = which.index_select(0, self.idx_rows) if self.idx_rows is not None else which
        self.b0 = b0.to(self.compute)
        self.w1 = nca.rule.fc1.weight.flatten(1).to(self.compute)  # (C - k, hidden)

    def blocks(self, x: torch.Tensor, kernel_tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The perception's feature blocks ``x, filter 1, filter 2, ...``, each ``(B, C, *S)``, lazily."""
        with torch.autocast(self.device_type, enabled=False):
            xc = x.to(self.conv_dtype)
            yield xc
            padded: dict[int, torch.Tensor] = {}
            for j in range(len(self.radii)):
                yield self.filter_block(j, xc, kernel_tensors, padded)

    def filter_block(
        self,
        j: int,
        xc: torch.Tensor,
        kernel_tensors: Sequence[torch.Tensor],
        padded: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Filter ``j``'s depthwise convolution of ``xc`` (``padded`` caches padded copies by radius)."""
        conv = F.conv2d if self.cfg.dim == 2 else F.conv3d
        start = sum(2 if b else 1 for b in self.has_bias[:j])
        w = kernel_tensors[start].to(self.conv_dtype)
        b = kernel_tensors[start + 1].to(self.conv_dtype) if self.has_bias[j] else None
        radius = self.radii[j]
        if self.cfg.padding == "zeros" or radius == 0:
            return conv(xc, w, b, padding=radius, groups=self.channels)
        if radius not in padded:
            padded[radius] = _pad(xc, radius, self.cfg.padding)
        return conv(padded[radius], w, b, groups=self.channels)

    def kernel_slice(self, j: int) -> slice:
        """Where filter ``j``'s weight (and bias) sit in ``kernel_tensors``."""
        start = sum(2 if b else 1 for b in self.has_bias[:j])
        return slice(start, start + (2 if self.has_bias[j] else 1))

    def filters(
        self, kernel_tensors: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(weight, bias or None)`` per filter, from the flat ``kernel_tensors``."""
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for j in range(len(self.radii)):
            part = kernel_tensors[self.kernel_slice(j)]
            out.append((part[0], part[1] if len(part) > 1 else None))
        return out

    def gather_rows(self, x: torch.Tensor, kernel_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The MLP's input rows ``(rows, F)`` in the compute dtype (no autograd graph)."""
        if self.use_kernels:
            return kernels.perceive_rows(
                x, self.filters(kernel_tensors), self.cfg.padding, self.idx_rows, self.compute
            )
        return torch.cat([self.rows(b) for b in self.blocks(x, kernel_tensors)], dim=1).to(self.compute)

    def rows_backward(
        self,
        x: torch.Tensor,
        kernel_tensors: Sequence[torch.Tensor],
        g_rows: torch.Tensor,
        g_x: torch.Tensor | None,
        kernel_needs: Sequence[bool],
    ) -> list[torch.Tensor | None]:
        """The fused kernels' backward of :meth:`gather_rows`.

        Args:
            x: The state the rows were read from.
            kernel_tensors: The filters' weights and biases.
            g_rows: ``d rows`` ``(rows, F)``; padding rows past ``fired`` are ignored.
            g_x: ``(cells, C)`` float32 buffer that ``d x`` is added to, or None.
            kernel_needs: Which kernel tensors need a gradient.

        Returns:
            The gradient of each kernel tensor (None where not needed).
        """
        filters = self.filters(kernel_tensors)
        needs = []
        for j in range(len(filters)):
            part = list(kernel_needs[self.kernel_slice(j)])
            needs.append((part[0], len(part) > 1 and part[1]))
        got = kernels.perceive_rows_backward(
            x, filters, self.cfg.padding, self.idx, g_rows[: self.fired], g_x, needs
        )
        return [t for j, (gw, gb) in enumerate(got) for t in ((gw, gb) if self.has_bias[j] else (gw,))]

    def cells_to_state(self, rows: torch.Tensor) -> torch.Tensor:
        """A ``(cells, C)`` matrix as a ``(B, C, *S)`` channels-last view."""
        dim = self.cfg.dim
        return rows.view(self.batch, *self.spatial, self.channels).permute(0, dim + 1, *range(1, dim + 1))

    def perceive(self, x: torch.Tensor, kernel_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[x | filter 1 | filter 2 | ...]`` as ``(B, F, *S)`` channels-last."""
        feats = list(self.blocks(x, kernel_tensors))
        return torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]

    def rows(self, p: torch.Tensor) -> torch.Tensor:
        """The MLP's input rows: every cell, or the fired ones (padded to the bucket)."""
        rows = p.permute(self.to_rows).reshape(self.cells, p.shape[1])
        return rows.index_select(0, self.idx_rows) if self.idx_rows is not None else rows

    def update(self, x: torch.Tensor, dx: torch.Tensor, alive: bool = True) -> torch.Tensor:
        """``x`` plus the update of the fired cells (non-fixed channels), then alive masking."""
        cfg = self.cfg
        dim = cfg.dim
        k = cfg.fixed_channels
        dx = dx[: self.fired]
        new = x.permute(self.to_rows).reshape(self.cells, self.channels).clone()
        target = new[:, k:] if k else new
        if self.idx is not None:
            target.index_add_(0, self.idx, dx.to(new.dtype))
        elif self.mask_rows is not None:
            target.addcmul_(dx.to(new.dtype), self.mask_rows)
        else:
            target.add_(dx.to(new.dtype))
        new = new.view(self.batch, *self.spatial, self.channels).permute(0, dim + 1, *range(1, dim + 1))
        if alive and cfg.alive_channel is not None:
            new = new * self.life(x, new).to(new.dtype)
        return new

    def update_backward(
        self, grad: torch.Tensor, life: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adjoint of :meth:`update`: ``(d x (cells, C), d dx (rows, C - fixed))``; ``d x`` may be
        a view of ``grad``."""
        grad = grad.contiguous(memory_format=self.memory_format)
        if life is not None:
            grad = grad * life.to(grad.dtype)
        g_state = grad.permute(self.to_rows).reshape(self.cells, self.channels)  # d new / d x = 1
        g_dx = g_state[:, self.cfg.fixed_channels :]
        if self.mask_rows is not None:
            g_dx = g_dx * self.mask_rows
        if self.idx is not None:
            g_dx = g_dx.index_select(0, self.idx)
            if self.n_rows > self.fired:
                g_dx = torch.cat([g_dx, g_dx.new_zeros(self.n_rows - self.fired, g_dx.shape[1])])
        return g_state, g_dx.contiguous().to(self.compute)

    def update_fused(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`update` through the fused kernels: the new state and the ``(cells,)`` life mask."""
        cfg = self.cfg
        alive = (cfg.alive_channel, cfg.alive_threshold) if cfg.alive_channel is not None else None
        return kernels.update_rows(x, dx, self.idx, self.fired, cfg.fixed_channels, alive)

    def update_fused_backward(
        self, grad: torch.Tensor, life: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adjoint of :meth:`update_fused`: ``(d x (cells, C), d dx (rows, C - fixed))``."""
        grad = grad.float().contiguous(memory_format=self.memory_format)
        return kernels.update_rows_backward(
            grad, life, self.idx, self.fired, self.n_rows, self.cfg.fixed_channels, self.compute
        )

    def life(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Alive before and after the step (Growing NCA)."""
        cfg = self.cfg
        assert cfg.alive_channel is not None
        life = alive_mask(x, cfg.alive_channel, cfg.alive_threshold)
        life &= alive_mask(new, cfg.alive_channel, cfg.alive_threshold)
        return life


class _PerceiveRows(torch.autograd.Function):
    """The fired cells' perception rows through the fused kernels (:mod:`ncatool.models.kernels`)."""

    @staticmethod
    def forward(ctx: Any, plan: _StepPlan, x: torch.Tensor, *kernel_tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(x, *kernel_tensors)
        return plan.gather_rows(x, kernel_tensors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: _StepPlan = ctx.plan
        x, *kernel_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (plan, x, *kernels)
        g_x = x.new_zeros(plan.cells, plan.channels) if needs[1] else None
        g_kernels = plan.rows_backward(x, kernel_tensors, grad, g_x, needs[2:])
        return (None, plan.cells_to_state(g_x) if g_x is not None else None, *g_kernels)


class _UpdateRows(torch.autograd.Function):
    """The state update and alive masking through the fused kernels (:meth:`_StepPlan.update_fused`)."""

    @staticmethod
    def forward(ctx: Any, plan: _StepPlan, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        new, ctx.life = plan.update_fused(x, dx)
        ctx.plan = plan
        return new

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: _StepPlan = ctx.plan
        g_x, g_dx = plan.update_fused_backward(grad, ctx.life)
        return None, plan.cells_to_state(g_x), g_dx


class _RecomputeStep(torch.autograd.Function):
    """One whole fast step as a single autograd node that keeps only its input and the fire mask.

    Backward recomputes the perception and the MLP's hidden layer (the cheap parts) and runs the
    hand-written MLP backward, so a training run stores one state per step (memory as gradient
    checkpointing every step, without storing or replaying the RNG).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        plan: _StepPlan,
        x: torch.Tensor,
        w0: torch.Tensor,
        b0: torch.Tensor,
        w1: torch.Tensor,
        *kernel_tensors: torch.Tensor,
    ) -> torch.Tensor:
        # the (cells, F) perception is never materialised, only the fired rows
        rows = plan.gather_rows(x, kernel_tensors)
        with torch.autocast(plan.device_type, enabled=False):
            h = _hidden(rows, w0, b0, plan.which)
            del rows
            dx = _linear(h, w1, None)
            del h
        if plan.fused_update:
            new, ctx.life = plan.update_fused(x, dx)
        elif plan.cfg.alive_channel is not None:
            new_pre = plan.update(x, dx, alive=False)
            ctx.life = plan.life(x, new_pre)
            new = new_pre * ctx.life.to(new_pre.dtype)
        else:
            new, ctx.life = plan.update(x, dx), None
        ctx.plan = plan
        ctx.save_for_backward(x, w0, b0, w1, *kernel_tensors)
        return new

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: _StepPlan = ctx.plan
        x, w0, b0, w1, *kernel_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (plan, x, w0, b0, w1, *kernels)
        if plan.fused_update:
            g_state, g_dx = plan.update_fused_backward(grad, ctx.life)
        else:
            g_state, g_dx = plan.update_backward(grad, ctx.life)

        with torch.no_grad():
            rows = plan.gather_rows(x, kernel_tensors)
        with torch.autocast(plan.device_type, enabled=False):
            g_rows, g_w0, g_b0, g_w1 = _chunked_mlp_backward(g_dx, rows, w0, b0, w1, plan.which, needs[2:5])
        del rows, g_dx

        # the perception's backward, one block at a time (a block's gradient is never materialised
        # for all blocks at once); the identity block is a scatter-add of its rows' gradient
        c = plan.channels
        kernel_needs = needs[5:]
        if plan.use_kernels:
            # d x: the state's own path (a fresh buffer from the fused update), then the perception's
            g_x = (g_state if plan.fused_update else g_state.clone()) if needs[1] else None
            g_kernels = plan.rows_backward(x, kernel_tensors, g_rows, g_x, kernel_needs)
            return (None, plan.cells_to_state(g_x) if g_x is not None else None, g_w0, g_b0, g_w1, *g_kernels)
        g_kernels: list[torch.Tensor | None] = [None] * len(kernel_tensors)
        g_x = None
        if needs[1]:
            g_x = g_state.clone()  # rows of d loss / d x, starting with the state's own path
            g_id = g_rows[:, :c].to(g_x.dtype)
            if plan.idx_rows is not None:
                g_x.index_add_(0, plan.idx_rows, g_id)
            else:
                g_x.add_(g_id)
        if needs[1] or any(kernel_needs):
            padded: dict[int, torch.Tensor] = {}
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(needs[1])
                leaves = [
                    t.detach().requires_grad_(bool(n))
                    for t, n in zip(kernel_tensors, kernel_needs, strict=True)
                ]
                with torch.autocast(plan.device_type, enabled=False):
                    xc = x_in.to(plan.conv_dtype)
            for j in range(len(plan.radii)):
                where = plan.kernel_slice(j)
                mine = [t for t in leaves[where] if t.requires_grad]
                inputs = ([x_in] if needs[1] else []) + mine
                if not inputs:
                    continue
                with torch.enable_grad(), torch.autocast(plan.device_type, enabled=False):
                    out = plan.rows(plan.filter_block(j, xc, leaves, padded))
                g_out = g_rows[:, (j + 1) * c : (j + 2) * c].to(out.dtype)
                got = list(torch.autograd.grad(out, inputs, g_out, retain_graph=j < len(plan.radii) - 1))
                del out, g_out
                if needs[1]:
                    assert g_x is not None
                    g_x.add_(got.pop(0).permute(plan.to_rows).reshape(plan.cells, c))
                for i, t in zip(range(where.start, where.stop), leaves[where], strict=True):
                    if t.requires_grad:
                        g_kernels[i] = got.pop(0)
        return (None, plan.cells_to_state(g_x) if g_x is not None else None, g_w0, g_b0, g_w1, *g_kernels)


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
        self._recompute = False  # set by forward() while gradient checkpointing

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
        - The MLP has a hand-written backward (:class:`_CellMLP`). With ``self._recompute`` (set by
          :meth:`forward` for gradient checkpointing) the whole step is one autograd node that keeps
          only its input state and the fire mask, and recomputes the rest in the backward pass
          (:class:`_RecomputeStep`).
        """
        plan = _StepPlan(self, x, cond)
        if getattr(self, "_recompute", False) and torch.is_grad_enabled():
            return _RecomputeStep.apply(plan, plan.x, plan.w0, plan.b0, plan.w1, *plan.kernel_tensors)
        if plan.use_kernels:
            rows = _PerceiveRows.apply(plan, plan.x, *plan.kernel_tensors)
        else:
            rows = plan.rows(plan.perceive(plan.x, plan.kernel_tensors)).to(plan.compute)
        dx = _CellMLP.apply(rows, plan.w0, plan.b0, plan.w1, plan.which)
        if plan.fused_update:
            return _UpdateRows.apply(plan, plan.x, dx)
        return plan.update(plan.x, dx)

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

    def _run(
        self, x: torch.Tensor, steps: int, cond: torch.Tensor | None, recompute: bool = False
    ) -> torch.Tensor:
        previous, self._recompute = getattr(self, "_recompute", False), recompute
        try:
            for _ in range(steps):
                x = self.step(x, cond)
        finally:
            self._recompute = previous
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
            # Every step keeps only its input state and fire mask (_RecomputeStep); chunks of more
            # than one step also drop the states inside the chunk (torch checkpoint, recomputed).
            if checkpoint_every == 1:
                return self._run(x, steps, cond, recompute=True).contiguous()
            done = 0
            while done < steps:
                n = min(checkpoint_every, steps - done)
                x = checkpoint(self._run, x, n, cond, True, use_reentrant=False)
                done += n
            return x.contiguous()
        if not return_states:
            return self._run(x, steps, cond).contiguous()
        states = []
        for _ in range(steps):
            x = self.step(x, cond)
            states.append(x.contiguous())
        return states[-1] if states else x.contiguous(), states
