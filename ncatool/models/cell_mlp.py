"""The NCA's per-cell MLP over a ``(rows, features)`` matrix, with a hand-written backward.

Part of the fast step (:mod:`ncatool.models.fast_step`): ``relu(rows @ w0.T + b0) @ w1.T`` where a
row is one cell's perception (channels-last states make every cell a row, no layout copies).

- On x86 CPUs oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op TorchInductor uses)
  runs these thin products (cells x 48 @ 48 x 128) 2-2.5x faster in float32 than ``torch.addmm``
  (MKL) and fuses the ReLU. It is internal to PyTorch, so it is probed once against ``addmm`` and
  skipped where missing or different; ``NCATOOL_ONEDNN=0`` turns it off for the process.
- :class:`CellMLP`'s backward keeps only the input rows and the hidden activations; autograd's
  version of the same ops spends ~2x longer in MKL and in the ReLU mask.
- :func:`chunked_mlp_backward` recomputes the hidden layer a chunk of rows at a time (for the step
  that keeps only its input, :class:`~ncatool.models.fast_step.RecomputeStep`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from ncatool.models import kernels


@functools.cache
def onednn_linear_op() -> Any | None:
    """``torch.ops.mkldnn._linear_pointwise`` when it works here (probed once), else None."""
    if os.environ.get("NCATOOL_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        # fixed values: the probe must not draw from the global RNG (fire masks do)
        a = torch.linspace(-1.0, 1.0, 40).view(8, 5)
        w, b = torch.linspace(1.0, -0.5, 15).view(3, 5), torch.tensor([0.1, -0.2, 0.3])
        ok = torch.allclose(op(a, w, b, "relu", [], ""), torch.relu(torch.addmm(b, a, w.t())), atol=1e-5)
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool = False, onednn: bool = True
) -> torch.Tensor:
    """``x @ w.T + b`` (then ReLU), through oneDNN on CPU where it works and ``onednn`` allows."""
    use = onednn and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    op = onednn_linear_op() if use else None
    if op is not None:
        return op(x, w, b, "relu" if relu else "none", [], "")
    y = torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    return y.relu_() if relu else y


def hidden(
    rows: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, which: torch.Tensor | None, onednn: bool = True
) -> torch.Tensor:
    """``relu(rows @ w0.T + bias)``; ``b0`` is ``(hidden,)``, or ``(B, hidden)`` picked per row by ``which``."""
    if which is None:
        return linear(rows, w0, b0, relu=True, onednn=onednn)
    return linear(rows, w0, None, onednn=onednn).add_(b0.index_select(0, which)).relu_()


def weight_grad(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad.T @ inputs``, a reduction over cells (MKL reads the transposes in place; oneDNN copies
    them, which costs more than its faster product gains)."""
    return torch.mm(grad.t(), inputs)


def relu_backward_(grad: torch.Tensor, h: torch.Tensor, fused: bool) -> None:
    """Zero ``grad`` in place where ``h <= 0`` (the fused kernel when ``fused``: 3x faster in bf16)."""
    if fused and grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.bfloat16):
        kernels.relu_backward_(grad, h.contiguous())
    else:
        torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)


def mlp_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    h: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    which: torch.Tensor | None,
    needs: Sequence[bool],
    onednn: bool = True,
    fused_relu: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``relu(rows @ w0.T + b0) @ w1.T`` for (rows, w0, b0, w1); ``h`` is overwritten."""
    g_w1 = weight_grad(grad, h) if needs[3] else None
    gh = linear(grad, w1.t().contiguous(), None, onednn=onednn)
    relu_backward_(gh, h, fused_relu)
    g_rows = linear(gh, w0.t().contiguous(), None, onednn=onednn) if needs[0] else None
    g_w0 = weight_grad(gh, rows) if needs[1] else None
    g_b0 = None
    if needs[2]:
        g_b0 = gh.sum(0) if which is None else torch.zeros_like(b0).index_add_(0, which, gh)
    return g_rows, g_w0, g_b0, g_w1


def chunked_mlp_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    which: torch.Tensor | None,
    needs: Sequence[bool],
    chunk_rows: int,
    onednn: bool = True,
    fused_relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The MLP's backward with the hidden layer recomputed, ``chunk_rows`` rows at a time.

    Returns:
        ``(d rows, d w0, d b0, d w1)`` (None where ``needs`` = (w0, b0, w1) says not needed).
    """
    flags = {"onednn": onednn, "fused_relu": fused_relu}
    n = rows.shape[0]
    if n <= chunk_rows:
        h = hidden(rows, w0, b0, which, onednn)
        g_rows, g_w0, g_b0, g_w1 = mlp_backward(grad, rows, h, w0, b0, w1, which, (True, *needs), **flags)
        assert g_rows is not None
        return g_rows, g_w0, g_b0, g_w1
    g_rows = rows.new_empty(n, w0.shape[1])
    g_w0 = torch.zeros_like(w0) if needs[0] else None
    g_b0 = torch.zeros_like(b0) if needs[1] else None
    g_w1 = torch.zeros_like(w1) if needs[2] else None
    for start in range(0, n, chunk_rows):
        part = slice(start, min(n, start + chunk_rows))
        sel = which[part] if which is not None else None
        h = hidden(rows[part], w0, b0, sel, onednn)
        got = mlp_backward(grad[part], rows[part], h, w0, b0, w1, sel, (True, *needs), **flags)
        del h
        assert got[0] is not None
        g_rows[part] = got[0]
        for acc, g in ((g_w0, got[1]), (g_b0, got[2]), (g_w1, got[3])):
            if acc is not None and g is not None:
                acc.add_(g)
    return g_rows, g_w0, g_b0, g_w1


class CellMLP(torch.autograd.Function):
    """``relu(rows @ w0.T + b0) @ w1.T`` over a ``(cells, features)`` matrix, with its backward.

    ``which`` (conditioning) picks a row of a ``(B, hidden)`` bias for each row; ``onednn`` and
    ``fused_relu`` choose the products' and the ReLU backward's implementation.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        w0: torch.Tensor,
        b0: torch.Tensor,
        w1: torch.Tensor,
        which: torch.Tensor | None,
        onednn: bool,
        fused_relu: bool,
    ) -> torch.Tensor:
        with torch.autocast(rows.device.type, enabled=False):
            h = hidden(rows, w0, b0, which, onednn)
            out = linear(h, w1, None, onednn=onednn)
        ctx.save_for_backward(rows, w0, b0, w1, h)
        ctx.which, ctx.flags = which, {"onednn": onednn, "fused_relu": fused_relu}
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rows, w0, b0, w1, h = ctx.saved_tensors
        grad = grad.contiguous().to(h.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grads = mlp_backward(grad, rows, h, w0, b0, w1, ctx.which, ctx.needs_input_grad[:4], **ctx.flags)
        return (*grads, None, None, None)
