"""The fast NCA step: the same result as :meth:`ncatool.models.nca.NCA.reference_step`, less work.

:class:`~ncatool.models.nca.NCA` runs this backend when its ``backend`` setting is ``"fast"``, or
``"auto"`` on CPU and CUDA; :class:`FastOptions` (``NCA.fast_options``) tunes it. Measured on 2 CPU
cores against ``benchmarks/reference_nca.py`` (see ``benchmarks/README.md``):

- the state lives channels-last (``(B, *S, C)`` in memory), so cells are rows of a ``(cells, C)``
  matrix and the 1x1 MLP is two matrix products through oneDNN (:mod:`ncatool.models.cell_mlp`:
  2-2.5x MKL's float32 ``addmm`` on these thin shapes) with no layout copies;
- the perception is one depthwise convolution per filter (channel multiplier 1: ~10x faster in
  oneDNN than one grouped convolution with C*K outputs) and one concatenation; the MLP's first
  weight is permuted to match (:func:`fast_order`);
- on CPU only the cells that fire go through the MLP (rows gathered by the fire mask, drawn exactly
  as :func:`~ncatool.models.nca.fire_mask` draws it; half the work at fire rate 0.5); row counts are
  padded to a few fixed sizes (:func:`bucket`) so oneDNN reuses its kernels. On GPUs every cell goes
  through the MLP and the update is multiplied by the mask: no host synchronisation per step;
- the MLP has a hand-written backward (:class:`~ncatool.models.cell_mlp.CellMLP`); with gradient
  checkpointing each step is one autograd node that keeps only its input and fire mask and
  recomputes the rest (:class:`RecomputeStep`);
- the alive mask is a dilation of ``alpha > threshold`` (shifted ORs) instead of a max-pool;
- on CPU, where a C/C++ compiler is present, the operators of :mod:`ncatool.models.kernels` fuse
  the memory-bound parts: the perception of the fired cells straight into the MLP's rows (no
  convolution over every cell, no concatenation, gather or cast) and its adjoint, the update with
  alive masking and its adjoint, the ReLU backward and the fire-mask indices (1 thread, 64x64x8:
  training 2.97 -> 3.40 M cell-updates/s fp32, 4.66 -> 6.67 bf16; inference 9.1 -> 12.8 fp32,
  13.8 -> 20.1 bf16). Without a compiler the same step runs on PyTorch ops.

Results equal the reference step to float32 rounding, with the same random draws
(``tests/test_perf.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ncatool.models import kernels
from ncatool.models.cell_mlp import CellMLP, chunked_mlp_backward, hidden, linear
from ncatool.models.nca import Perception, alive_mask, fire_mask, pad

if TYPE_CHECKING:
    from ncatool.models.nca import NCA


@dataclass(frozen=True)
class FastOptions:
    """How the fast step runs (the defaults are what ncatool uses; tests switch parts off).

    Attributes:
        kernels: Use the fused operators of :mod:`ncatool.models.kernels` where they load (CPU,
            float32 state); False runs the same step on PyTorch ops. ``NCATOOL_KERNELS=0`` turns
            them off for the whole process.
        gather: Only the fired cells go through the MLP (gathered rows). None: on CPU only; False
            is the GPU variant (every cell, update multiplied by the mask).
        chunk_rows: Rows per chunk in the recomputing backward (bounds its hidden activations).
        onednn: oneDNN's matmul for the MLP on CPU where it works (else ``addmm``).
        compiler: ``torch.compile`` backend of the ``"compiled"`` NCA backend
            (:mod:`ncatool.models.compiled_step`).
        compile_mode: ``torch.compile`` mode there (None: its default).
    """

    kernels: bool = True
    gather: bool | None = None
    chunk_rows: int = 8192
    onednn: bool = True
    compiler: str = "inductor"
    compile_mode: str | None = None


def bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ~1/64 of its power of two (at least 64): <= 1.6 % more rows."""
    step = max(64, 1 << max(0, n.bit_length() - 7))
    return -(-n // step) * step


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if kind not in ("cpu", "cuda", "mps", "xpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def depthwise(perception: Perception) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """The perception's filters as depthwise convolutions: ``(weight (C, 1, k, ...), bias or None,
    radius)`` per filter, each fixed kernel (the same for every channel) and each learned layer.

    With a channel multiplier of 1 oneDNN runs them ~10x faster than one grouped convolution with
    ``C * K`` outputs. The fast features are ``[x | filter 1 | filter 2 | ...]`` (see :func:`fast_order`).
    """
    c, d = perception.channels, perception.dim
    out: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
    if perception.n_fixed:
        fixed = perception.fixed_weight.view(c, perception.n_fixed, *([3] * d))
        out.extend((fixed[:, i : i + 1], None, 1) for i in range(perception.n_fixed))
    out.extend((layer.weight, layer.bias, perception.learned_radius) for layer in perception.learned)
    return out


@functools.lru_cache(maxsize=64)
def _order(channels: int, n_fixed: int, n_learned: int, device: torch.device) -> torch.Tensor:
    c, k = channels, n_fixed
    order = list(range(c))
    for i in range(k):
        order.extend(c + ch * k + i for ch in range(c))
    for i in range(n_learned):
        order.extend(c + c * k + i * c + ch for ch in range(c))
    return torch.tensor(order, dtype=torch.long, device=device)


def fast_order(perception: Perception, device: torch.device) -> torch.Tensor:
    """``order[j]``: index in :meth:`Perception.forward`'s order ``[x | fixed (c-major) | learned...]``
    of feature ``j`` of the fast layout ``[x | fixed_1 (all c) | ... | learned_1 | ...]``."""
    return _order(perception.channels, perception.n_fixed, len(perception.learned), device)


def fast_step(
    nca: NCA,
    x: torch.Tensor,
    cond: torch.Tensor | None = None,
    fire: torch.Tensor | None = None,
    recompute: bool = False,
    options: FastOptions | None = None,
) -> torch.Tensor:
    """One step of ``nca``, as :meth:`NCA.reference_step` defines it.

    Args:
        nca: The automaton (its config and parameters).
        x: State ``(B, C, *S)``.
        cond: Conditioning ``(B, cond_channels)`` for a conditional NCA.
        fire: The cells that update ``(B, 1, *S)`` (bool or 0/1); None draws them.
        recompute: Keep only the input state and the fire mask for the backward pass and recompute
            the rest there (gradient checkpointing of one step; only while gradients are on).
        options: :class:`FastOptions` (None: the defaults).

    Returns:
        The next state ``(B, C, *S)``, channels-last in memory.
    """
    plan = StepPlan(nca, x, cond, fire, options or FastOptions())
    if recompute and torch.is_grad_enabled():
        return RecomputeStep.apply(plan, plan.x, plan.w0, plan.b0, plan.w1, *plan.kernel_tensors)
    if plan.use_kernels:
        rows = PerceiveRows.apply(plan, plan.x, *plan.kernel_tensors)
    else:
        rows = plan.rows(plan.perceive(plan.x, plan.kernel_tensors)).to(plan.compute)
    dx = CellMLP.apply(rows, plan.w0, plan.b0, plan.w1, plan.which, plan.onednn, plan.fused_relu)
    if plan.fused_update:
        return UpdateRows.apply(plan, plan.x, dx)
    return plan.update(plan.x, dx)


class StepPlan:
    """Everything one fast step needs besides the autograd graph: layout, dtypes, fire mask, weights.

    Built once per step from the module and the input; :class:`RecomputeStep` keeps it for the
    backward pass (it holds the fire mask, so the recomputation sees the same cells fire).
    """

    def __init__(
        self,
        nca: NCA,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        fire: torch.Tensor | None,
        options: FastOptions,
    ) -> None:
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
        self.compute = autocast_dtype(device) or x.dtype
        # On CPU the depthwise convolutions are no faster in bf16; on GPUs they follow autocast.
        self.conv_dtype = x.dtype if device.type == "cpu" else self.compute
        filters = depthwise(nca.perception)
        self.radii = [r for _, _, r in filters]
        self.has_bias = [b is not None for _, b, _ in filters]
        self.kernel_tensors = [t for w, b, _ in filters for t in ((w, b) if b is not None else (w,))]
        self.to_rows = (0, *range(2, dim + 2), 1)
        self.chunk_rows, self.onednn = options.chunk_rows, options.onednn
        have_ops = options.kernels and device.type == "cpu" and kernels.library() is not None
        self.fused_relu = have_ops
        # the fused perception operators (float32 state, float32/bf16 rows), else PyTorch ops
        self.use_kernels = (
            have_ops
            and x.dtype == torch.float32
            and self.compute in (torch.float32, torch.bfloat16)
            and all((2 * r + 1) ** dim <= kernels.MAX_TAPS for r in self.radii)
        )

        self.idx: torch.Tensor | None = None
        self.idx_rows: torch.Tensor | None = None
        self.mask_rows: torch.Tensor | None = None  # (cells, 1) fire mask when not gathering
        self.fired = self.cells
        gather = options.gather if options.gather is not None else device.type == "cpu"
        if fire is None and cfg.fire_rate < 1.0:
            fire = fire_mask((self.batch, 1, *self.spatial), cfg.fire_rate, device, torch.bool)
        if fire is not None and not gather:
            # e.g. CUDA: a nonzero() per step would synchronise; multiply by the mask instead
            self.mask_rows = fire.to(x.dtype).reshape(self.cells, 1)
        elif fire is not None:
            mask = fire.to(torch.bool).reshape(-1).contiguous()
            idx = kernels.mask_indices(mask) if have_ops else mask.nonzero().squeeze(1)
            self.fired = idx.numel()
            # Pad the row count to a coarse multiple with copies of one row (their results are
            # dropped): oneDNN builds a kernel per matrix shape, and the fired count changes every step.
            n_rows = bucket(self.fired)
            if n_rows > self.fired and self.fired:
                idx = torch.cat([idx, idx[:1].expand(n_rows - self.fired)])
            self.idx_rows = idx
            self.idx = idx[: self.fired]

        self.n_rows = self.idx_rows.numel() if self.idx_rows is not None else self.fired
        # the update and alive masking through the fused kernels (not for the masked variant)
        self.fused_update = self.use_kernels and self.mask_rows is None
        order = fast_order(nca.perception, device)
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
            padded[radius] = pad(xc, radius, self.cfg.padding)
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


# The fused operators have no autograd registration of their own (see ncatool.models.kernels): these
# Functions hold the step plan their backward needs.


class PerceiveRows(torch.autograd.Function):
    """The fired cells' perception rows through the fused kernels (:mod:`ncatool.models.kernels`)."""

    @staticmethod
    def forward(ctx: Any, plan: StepPlan, x: torch.Tensor, *kernel_tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(x, *kernel_tensors)
        return plan.gather_rows(x, kernel_tensors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: StepPlan = ctx.plan
        x, *kernel_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (plan, x, *kernels)
        g_x = x.new_zeros(plan.cells, plan.channels) if needs[1] else None
        g_kernels = plan.rows_backward(x, kernel_tensors, grad, g_x, needs[2:])
        return (None, plan.cells_to_state(g_x) if g_x is not None else None, *g_kernels)


class UpdateRows(torch.autograd.Function):
    """The state update and alive masking through the fused kernels (:meth:`StepPlan.update_fused`)."""

    @staticmethod
    def forward(ctx: Any, plan: StepPlan, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        new, ctx.life = plan.update_fused(x, dx)
        ctx.plan = plan
        return new

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: StepPlan = ctx.plan
        g_x, g_dx = plan.update_fused_backward(grad, ctx.life)
        return None, plan.cells_to_state(g_x), g_dx


class RecomputeStep(torch.autograd.Function):
    """One whole fast step as a single autograd node that keeps only its input and the fire mask.

    Backward recomputes the perception and the MLP's hidden layer (the cheap parts) and runs the
    hand-written MLP backward, so a training run stores one state per step (memory as gradient
    checkpointing every step, without storing or replaying the RNG).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        plan: StepPlan,
        x: torch.Tensor,
        w0: torch.Tensor,
        b0: torch.Tensor,
        w1: torch.Tensor,
        *kernel_tensors: torch.Tensor,
    ) -> torch.Tensor:
        # the (cells, F) perception is never materialised, only the fired rows
        rows = plan.gather_rows(x, kernel_tensors)
        with torch.autocast(plan.device_type, enabled=False):
            h = hidden(rows, w0, b0, plan.which, plan.onednn)
            del rows
            dx = linear(h, w1, None, onednn=plan.onednn)
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
        plan: StepPlan = ctx.plan
        x, w0, b0, w1, *kernel_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (plan, x, w0, b0, w1, *kernels)
        if plan.fused_update:
            g_state, g_dx = plan.update_fused_backward(grad, ctx.life)
        else:
            g_state, g_dx = plan.update_backward(grad, ctx.life)

        with torch.no_grad():
            rows = plan.gather_rows(x, kernel_tensors)
        with torch.autocast(plan.device_type, enabled=False):
            g_rows, g_w0, g_b0, g_w1 = chunked_mlp_backward(
                g_dx, rows, w0, b0, w1, plan.which, needs[2:5], plan.chunk_rows, plan.onednn, plan.fused_relu
            )
        del rows, g_dx

        kernel_needs = needs[5:]
        if plan.use_kernels:
            # d x: the state's own path (a fresh buffer from the fused update), then the perception's
            g_x = (g_state if plan.fused_update else g_state.clone()) if needs[1] else None
            g_kernels = plan.rows_backward(x, kernel_tensors, g_rows, g_x, kernel_needs)
            return (None, plan.cells_to_state(g_x) if g_x is not None else None, g_w0, g_b0, g_w1, *g_kernels)
        g_x, g_kernels = _perception_backward(
            plan, x, kernel_tensors, g_rows, g_state, needs[1], kernel_needs
        )
        return (None, plan.cells_to_state(g_x) if g_x is not None else None, g_w0, g_b0, g_w1, *g_kernels)


def _perception_backward(
    plan: StepPlan,
    x: torch.Tensor,
    kernel_tensors: Sequence[torch.Tensor],
    g_rows: torch.Tensor,
    g_state: torch.Tensor,
    need_x: bool,
    kernel_needs: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """The perception's backward on PyTorch ops, one filter block at a time (a block's gradient is
    never materialised for all blocks at once); the identity block is a scatter-add of its rows'
    gradient. Returns ``d x`` as ``(cells, C)`` (the state's own path ``g_state`` included) and the
    kernel tensors' gradients."""
    c = plan.channels
    g_kernels: list[torch.Tensor | None] = [None] * len(kernel_tensors)
    g_x = None
    if need_x:
        g_x = g_state.clone()  # rows of d loss / d x, starting with the state's own path
        g_id = g_rows[:, :c].to(g_x.dtype)
        if plan.idx_rows is not None:
            g_x.index_add_(0, plan.idx_rows, g_id)
        else:
            g_x.add_(g_id)
    if not need_x and not any(kernel_needs):
        return g_x, g_kernels
    padded: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(need_x)
        leaves = [
            t.detach().requires_grad_(bool(n)) for t, n in zip(kernel_tensors, kernel_needs, strict=True)
        ]
        with torch.autocast(plan.device_type, enabled=False):
            xc = x_in.to(plan.conv_dtype)
    for j in range(len(plan.radii)):
        where = plan.kernel_slice(j)
        mine = [t for t in leaves[where] if t.requires_grad]
        inputs = ([x_in] if need_x else []) + mine
        if not inputs:
            continue
        with torch.enable_grad(), torch.autocast(plan.device_type, enabled=False):
            out = plan.rows(plan.filter_block(j, xc, leaves, padded))
        g_out = g_rows[:, (j + 1) * c : (j + 2) * c].to(out.dtype)
        got = list(torch.autograd.grad(out, inputs, g_out, retain_graph=j < len(plan.radii) - 1))
        del out, g_out
        if need_x:
            assert g_x is not None
            g_x.add_(got.pop(0).permute(plan.to_rows).reshape(plan.cells, c))
        for i, t in zip(range(where.start, where.stop), leaves[where], strict=True):
            if t.requires_grad:
                g_kernels[i] = got.pop(0)
    return g_x, g_kernels
