"""Fused CPU kernels for the memory-bound parts of the fast NCA step, compiled on first use.

The fast step (:mod:`ncatool.models.nca`) feeds the MLP only the cells that fire. In PyTorch that
takes one depthwise convolution per filter over *every* cell, a concatenation, a row gather and a
dtype cast; backward, a zero-filled scatter of the rows' gradient and one convolution backward per
filter; then a clone, an index-add, two dilated alive masks and a multiply for the update. On 2 cores
these passes took about a third of a bf16 training step. ``_kernels.c`` does each in one pass:

- :func:`perceive_rows` / :func:`perceive_rows_backward`: ``rows[r] = [x | filter_1(x) | ...]`` at
  the fired cells only, written in the MLP's dtype (float32, or bfloat16 rounded to nearest even as
  ``Tensor.to`` rounds), and the adjoint into ``d x`` and the learned filters' ``d weight``/``d bias``;
  any odd kernel size, 2D and 3D, all four padding modes;
- :func:`update_rows` / :func:`update_rows_backward`: ``x`` plus the fired rows' update, Growing-NCA
  alive masking (3^dim dilation of ``alpha > threshold`` before and after), and the adjoint;
- :func:`relu_backward_` (ReLU's backward in place) and :func:`mask_indices` (``nonzero`` of the
  fire mask in one sequential pass).

The C source is compiled with the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native
-fopenmp``) into ``$NCATOOL_CACHE_DIR`` (default ``~/.cache/ncatool``), keyed by a hash of the
source, flags and CPU, written under a temporary name and renamed; it links against the OpenMP
runtime PyTorch has already loaded, so both share one thread pool. Where there is no compiler, the
build fails, or a numeric self-check against PyTorch fails, :func:`library` returns None and the
step runs on PyTorch ops (same results to float32 rounding). ``NCATOOL_KERNELS=0`` turns the kernels
off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")
PADDING_CODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
MAX_TAPS = 1331  # MAX_TAPS in _kernels.c: kernels up to 11^3

_LIB: Any = None  # None: not tried yet; False: unavailable


def cache_dir() -> Path:
    """Where compiled kernels are kept (``NCATOOL_CACHE_DIR``, else ``~/.cache/ncatool``)."""
    env = os.environ.get("NCATOOL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ncatool"


def _cpu_signature() -> str:
    """CPU model and flags (``-march=native`` code is only valid on the CPU that built it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _build(compiler: str) -> Path | None:
    """Compile ``_kernels.c`` into the cache (once per source, flags and CPU); None if it fails."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / f"nca_kernels-{key}.so"
    if target.is_file():
        return target
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nca_kernels-", suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            return None
        os.replace(tmp, target)
        tmp = None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


def _declare(lib: Any) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    head = [ptr, i64, i64, i64, i64, i64]  # x, B, D, H, W, C
    radii = [i32, i32, i32, i32, i32, i32]  # nf, identity, rd, rh, rw, mode
    rows = [ptr, i64, ptr, i64, i64, i32]  # idx, n, rows, ld, col, bf16
    lib.perceive_rows.argtypes = [*head, ptr, ptr, *radii, *rows, i32]
    lib.perceive_rows.restype = i32
    lib.perceive_rows_bwd.argtypes = [*head, ptr, *radii, *rows, ptr, ptr, ptr, i32]
    lib.perceive_rows_bwd.restype = i32
    lib.relu_backward.argtypes = [ptr, ptr, i64, i32, i32]
    lib.relu_backward.restype = None
    lib.mask_indices.argtypes = [ptr, i64, ptr]
    lib.mask_indices.restype = i64
    lib.update_rows.argtypes = [ptr, i64, i64, ptr, i64, i32, ptr, i64, i64, ptr, i32]
    lib.update_rows.restype = None
    lib.alive_mask.argtypes = [*head, i64, ctypes.c_float, ptr, i32]
    lib.alive_mask.restype = None
    lib.apply_life.argtypes = [ptr, ptr, ptr, i64, i64, i32]
    lib.apply_life.restype = None
    lib.update_rows_bwd.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, i32, i32]
    lib.update_rows_bwd.restype = None


def library() -> Any | None:
    """The compiled kernels (a ``ctypes.CDLL``), or None where they are unavailable or disabled."""
    global _LIB
    if _LIB is None:
        _LIB = False
        compiler = os.environ.get("CC", "cc")
        if os.environ.get("NCATOOL_KERNELS", "1") != "0" and shutil.which(compiler):
            path = _build(compiler)
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                    _declare(lib)
                    _LIB = lib
                    # the caller may be inside autocast or no_grad: the check needs neither
                    with torch.autocast("cpu", enabled=False), torch.enable_grad():
                        ok = _self_check()
                    if not ok:
                        _LIB = False
                except (OSError, AttributeError, RuntimeError):
                    _LIB = False
    return _LIB or None


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(B, D, H, W, C)`` of a channels-last ``(B, C, *S)`` state (2D: D = 1)."""
    b, c, *spatial = x.shape
    d, h, w = ([1, *spatial] if len(spatial) == 2 else spatial)[-3:]
    return b, d, h, w, c


def _radii(weight: torch.Tensor) -> tuple[int, int, int]:
    """``(rd, rh, rw)`` of a depthwise weight ``(C, 1, *k)`` (2D: rd = 0)."""
    k = [1] * (5 - weight.dim()) + list(weight.shape[2:])
    return k[0] // 2, k[1] // 2, k[2] // 2


Filter = tuple[torch.Tensor, "torch.Tensor | None"]


class _Group:
    """Consecutive filters of one kernel size, packed as the kernels read them (may be empty).

    Attributes:
        first: Index of the group's first filter.
        members: The filters ``(weight (C, 1, *k), bias or None)``.
        radii: ``(rd, rh, rw)`` (zeros for an empty group).
        taps: float32 ``(nf, K, C)``, or None for an empty group.
        bias: float32 ``(nf, C)`` (zeros for filters without a bias), or None if none has one.
    """

    def __init__(self, first: int, members: list[Filter]) -> None:
        self.first, self.members = first, members
        self.radii = _radii(members[0][0]) if members else (0, 0, 0)
        self.taps: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if members:
            c = members[0][0].shape[0]
            self.taps = torch.stack([w.detach().reshape(c, -1).t().float() for w, _ in members]).contiguous()
            if any(b is not None for _, b in members):
                self.bias = torch.stack(
                    [b.detach().float() if b is not None else torch.zeros(c) for _, b in members]
                )


def _groups(filters: Sequence[Filter]) -> list[_Group]:
    """Runs of consecutive filters with the same kernel size: one kernel call each, the first of
    which also handles the identity block (an empty group when there are no filters)."""
    runs: list[tuple[int, list[Filter]]] = []
    for i, f in enumerate(filters):
        if runs and _radii(f[0]) == _radii(runs[-1][1][0][0]):
            runs[-1][1].append(f)
        else:
            runs.append((i, [f]))
    return [_Group(first, members) for first, members in runs] or [_Group(0, [])]


def _check(err: int, name: str) -> None:
    if err:
        raise RuntimeError(f"{name} failed (code {err}: too many taps, or out of memory)")


def perceive_rows(
    x: torch.Tensor,
    filters: Sequence[Filter],
    padding: str,
    idx: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The MLP's input rows ``[x | filter_1(x) | ...]`` of the cells ``idx``.

    Args:
        x: State ``(B, C, *S)``, float32, channels-last in memory.
        filters: ``(weight (C, 1, *k), bias (C,) or None)`` per depthwise filter.
        padding: zeros, reflect, replicate or circular.
        idx: Cell indices ``(n,)`` (int64, row-major over ``(B, *S)``), or None for every cell.
        dtype: float32 or bfloat16.

    Returns:
        ``(n, C * (1 + len(filters)))`` in ``dtype``.
    """
    lib = library()
    assert lib is not None
    b, d, h, w, c = _geometry(x)
    n = idx.numel() if idx is not None else x.numel() // c
    width = c * (1 + len(filters))
    out = torch.empty(n, width, dtype=dtype)
    tail = (PADDING_CODES[padding], _ptr(idx), n, out.data_ptr(), width)
    bf16, threads = int(dtype == torch.bfloat16), torch.get_num_threads()
    for i, g in enumerate(_groups(filters)):
        col = 0 if i == 0 else c * (1 + g.first)
        err = lib.perceive_rows(
            x.data_ptr(), b, d, h, w, c, _ptr(g.taps), _ptr(g.bias), len(g.members), int(i == 0),
            *g.radii, *tail, col, bf16, threads,
        )  # fmt: skip
        _check(err, "perceive_rows")
    return out


def perceive_rows_backward(
    x: torch.Tensor,
    filters: Sequence[Filter],
    padding: str,
    idx: torch.Tensor | None,
    grad: torch.Tensor,
    grad_x: torch.Tensor | None,
    needs: Sequence[tuple[bool, bool]],
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The adjoint of :func:`perceive_rows`: accumulate ``d x`` and return ``d weight``/``d bias``.

    Args:
        x: The state :func:`perceive_rows` read, ``(B, C, *S)`` float32 channels-last.
        filters: As for :func:`perceive_rows`.
        padding: As for :func:`perceive_rows`.
        idx: The rows' cells, sorted ascending and unique (None: every cell).
        grad: ``d rows`` ``(n, C * (1 + len(filters)))``, float32 or bfloat16.
        grad_x: ``(cells, C)`` float32 buffer that ``d x`` is added to, or None when not needed.
        needs: ``(weight, bias)`` flags per filter: which parameter gradients to compute.

    Returns:
        ``(d weight (C, 1, *k) or None, d bias (C,) or None)`` per filter.
    """
    lib = library()
    assert lib is not None
    b, d, h, w, c = _geometry(x)
    n = idx.numel() if idx is not None else x.numel() // c
    grad = grad.contiguous()
    bf16, threads = int(grad.dtype == torch.bfloat16), torch.get_num_threads()
    tail = (PADDING_CODES[padding], _ptr(idx), n, grad.data_ptr(), grad.shape[1])
    out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(filters)
    for i, g in enumerate(_groups(filters)):
        members = range(g.first, g.first + len(g.members))
        need_w = any(needs[j][0] for j in members)
        need_b = g.bias is not None and any(needs[j][1] for j in members)
        if grad_x is None and not need_w and not need_b:
            continue
        gw = torch.zeros_like(g.taps) if need_w and g.taps is not None else None
        gb = torch.zeros(len(g.members), c) if need_b else None
        col = 0 if i == 0 else c * (1 + g.first)
        err = lib.perceive_rows_bwd(
            x.data_ptr(), b, d, h, w, c, _ptr(g.taps), len(g.members), int(i == 0), *g.radii, *tail,
            col, bf16, _ptr(grad_x), _ptr(gw), _ptr(gb), threads,
        )  # fmt: skip
        _check(err, "perceive_rows_bwd")
        for k, j in enumerate(members):
            weight, bias = filters[j]
            g_w = gw[k].t().reshape(weight.shape).to(weight.dtype) if gw is not None and needs[j][0] else None
            g_b = gb[k].to(bias.dtype) if gb is not None and bias is not None and needs[j][1] else None
            out[j] = (g_w, g_b)
    return out


def relu_backward_(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``grad`` zeroed in place where ``h <= 0`` (ReLU's backward; as ``aten.threshold_backward``).

    Args:
        grad: Contiguous float32 or bfloat16 tensor.
        h: The ReLU's output, same shape and dtype, contiguous.
    """
    lib = library()
    assert lib is not None and grad.is_contiguous() and h.is_contiguous() and grad.dtype == h.dtype
    lib.relu_backward(
        grad.data_ptr(),
        h.data_ptr(),
        grad.numel(),
        int(grad.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return grad


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """``mask.reshape(-1).nonzero().squeeze(1)`` for a contiguous bool tensor, in one pass."""
    lib = library()
    assert lib is not None and mask.dtype == torch.bool and mask.is_contiguous()
    out = torch.empty(mask.numel(), dtype=torch.long)
    count = lib.mask_indices(mask.data_ptr(), mask.numel(), out.data_ptr())
    return out[:count]


def _self_check() -> bool:
    """The kernels against PyTorch's convolution on a small 3D case (reflect, learned bias, bf16)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, 1, 3, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(3, generator=gen, requires_grad=True)
    idx = torch.tensor([0, 7, 8, 100, 239])
    xr = x.detach().requires_grad_(True)
    ref = torch.cat([xr, F.conv3d(F.pad(xr, [1] * 6, mode="reflect"), weight, bias, groups=3)], 1)
    ref_rows = ref.permute(0, 2, 3, 4, 1).reshape(-1, 6)[idx]
    rows = perceive_rows(x, [(weight, bias)], "reflect", idx, torch.float32)
    rows16 = perceive_rows(x, [(weight, bias)], "reflect", idx, torch.bfloat16)
    g = torch.randn(rows.shape, generator=gen)
    ref_rows.backward(g)
    gx = torch.zeros(x.numel() // 3, 3)
    ((gw, gb),) = perceive_rows_backward(x, [(weight, bias)], "reflect", idx, g, gx, [(True, True)])
    gx_ref = xr.grad.permute(0, 2, 3, 4, 1).reshape(-1, 3)  # type: ignore[union-attr]
    return bool(
        torch.allclose(rows, ref_rows, atol=1e-5)
        and torch.equal(rows16, rows.to(torch.bfloat16))
        and torch.allclose(gx, gx_ref, atol=1e-4)
        and gw is not None
        and torch.allclose(gw, weight.grad, atol=1e-4)  # type: ignore[arg-type]
        and gb is not None
        and torch.allclose(gb, bias.grad, atol=1e-4)  # type: ignore[arg-type]
    )


def update_rows(
    x: torch.Tensor,
    dx: torch.Tensor,
    idx: torch.Tensor | None,
    fired: int,
    fixed: int,
    alive: tuple[int, float] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` plus the update of the fired cells, then Growing-NCA alive masking, in three passes.

    Args:
        x: State ``(B, C, *S)``, float32, channels-last.
        dx: Updates ``(rows, C - fixed)`` (float32 or bfloat16); rows past ``fired`` are ignored.
        idx: The fired cells ``(fired,)`` (None: row r is cell r).
        fired: Rows of ``dx`` to apply.
        fixed: Leading channels the update leaves alone.
        alive: ``(channel, threshold)`` for alive masking, or None.

    Returns:
        The new state (same shape and layout as ``x``) and the ``(cells,)`` bool mask of cells alive
        before and after (None without alive masking).
    """
    lib = library()
    assert lib is not None
    b, d, h, w, c = _geometry(x)
    cells, threads = x.numel() // c, torch.get_num_threads()
    dx = dx.contiguous()
    new = torch.empty_like(x)
    lib.update_rows(
        x.data_ptr(),
        cells,
        c,
        dx.data_ptr(),
        dx.shape[1],
        int(dx.dtype == torch.bfloat16),
        _ptr(idx),
        fired,
        fixed,
        new.data_ptr(),
        threads,
    )
    if alive is None:
        return new, None
    pre, life = torch.empty(cells, dtype=torch.bool), torch.empty(cells, dtype=torch.bool)
    channel, threshold = alive
    lib.alive_mask(x.data_ptr(), b, d, h, w, c, channel, threshold, pre.data_ptr(), threads)
    lib.alive_mask(new.data_ptr(), b, d, h, w, c, channel, threshold, life.data_ptr(), threads)
    lib.apply_life(new.data_ptr(), pre.data_ptr(), life.data_ptr(), cells, c, threads)
    return new, life


def update_rows_backward(
    grad: torch.Tensor,
    life: torch.Tensor | None,
    idx: torch.Tensor | None,
    fired: int,
    rows: int,
    fixed: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjoint of :func:`update_rows`.

    Args:
        grad: ``d new`` ``(B, C, *S)`` float32, channels-last.
        life: The mask :func:`update_rows` returned, or None.
        idx: As for :func:`update_rows`.
        fired: As for :func:`update_rows`.
        rows: Rows of ``d dx`` to return (the padded row count).
        fixed: As for :func:`update_rows`.
        dtype: dtype of ``d dx``.

    Returns:
        ``d x`` as ``(cells, C)`` float32 (the state's own path) and ``d dx`` ``(rows, C - fixed)``.
    """
    lib = library()
    assert lib is not None
    c = grad.shape[1]
    cells = grad.numel() // c
    g_x = torch.empty(cells, c)
    g_dx = torch.empty(rows, c - fixed, dtype=dtype)
    lib.update_rows_bwd(
        grad.data_ptr(),
        _ptr(life),
        cells,
        c,
        _ptr(idx),
        fired,
        rows,
        fixed,
        g_x.data_ptr(),
        g_dx.data_ptr(),
        int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return g_x, g_dx
