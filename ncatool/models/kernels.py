"""Fused CPU kernels for the memory-bound parts of the fast NCA step, as PyTorch operators.

The fast step (:mod:`ncatool.models.fast_step`) feeds the MLP only the cells that fire. In PyTorch
that takes one depthwise convolution per filter over *every* cell, a concatenation, a row gather and
a dtype cast; backward, a zero-filled scatter of the rows' gradient and one convolution backward per
filter; then a clone, an index-add, two dilated alive masks and a multiply for the update. On 2 cores
these passes took about a third of a bf16 training step. ``_kernels.c`` does each in one pass:

- :func:`perceive_rows` / :func:`perceive_rows_backward`: ``rows[r] = [x | filter_1(x) | ...]`` at
  the fired cells only, written in the MLP's dtype (float32, or bfloat16 rounded to nearest even as
  ``Tensor.to`` rounds), and the adjoint into ``d x`` and the learned filters' ``d weight``/``d bias``
  (summed per batch item, then in item order: the same bits whatever the thread count or timing);
  any odd kernel size, 2D and 3D, all four padding modes;
- :func:`update_rows` / :func:`update_rows_backward`: ``x`` plus the fired rows' update, Growing-NCA
  alive masking (3^dim dilation of ``alpha > threshold`` before and after), and the adjoint;
- :func:`relu_backward_` (ReLU's backward in place) and :func:`mask_indices` (``nonzero`` of the
  fire mask in one sequential pass).

**Operators.** ``_ops.cpp`` registers each kernel with ``TORCH_LIBRARY(ncatool, ...)`` under a typed
schema (``torch.ops.ncatool.perceive_rows`` ...) and checks every argument (dtype, layout, sizes,
index ranges) with ``TORCH_CHECK`` before calling C, so a wrong call raises a ``RuntimeError``
instead of corrupting memory; both files include ``_kernels.h``, so the C++ wrappers and the C
functions cannot disagree on a signature. :func:`register_fakes` gives every operator a fake
(shape-only) implementation, so ``torch.compile`` and ``torch.library.opcheck`` can trace them.
Autograd is not registered per operator: the fast step's backward needs its step plan (the fired
cells, the padded row count) and recomputes several operators inside one autograd node, so it keeps
its own ``torch.autograd.Function`` s that call these operators.

**Build.** ``_kernels.c`` is compiled with the system C compiler (``$CC`` or ``cc``, ``-O3
-march=native -fopenmp``), ``_ops.cpp`` with the C++ compiler (``$CXX`` or ``c++``) against PyTorch's
headers (``torch.utils.cpp_extension.include_paths()``, no ninja needed), linked into one library in
``$NCATOOL_CACHE_DIR`` (default ``~/.cache/ncatool``), keyed by a hash of the sources, flags, PyTorch
version and CPU, written under a temporary name and renamed (a failed build leaves nothing behind),
and loaded with ``torch.ops.load_library``. The OpenMP runtime is the one PyTorch has loaded, so
both share one thread pool. Where there is no compiler, the build fails, or a numeric self-check
against PyTorch fails, :func:`library` returns None and the step runs on PyTorch ops (same results
to float32 rounding). ``NCATOOL_KERNELS=0`` turns the kernels off for the process; a model can turn
them off for itself (``FastOptions(kernels=False)`` in :mod:`ncatool.models.fast_step`).
"""

from __future__ import annotations

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

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "_kernels.h", _HERE / "_kernels.c", _HERE / "_ops.cpp")
_C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c99")
# -std=c++20 silences warnings in PyTorch's headers; the wrappers need no optimisation beyond -O2
_CXX_FLAGS = (
    "-O2",
    "-fPIC",
    "-std=c++20",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
MAX_TAPS = 1331  # NCA_MAX_TAPS in _kernels.h: kernels up to 11^3

_UNSET = "not tried"
_status: str | None = _UNSET  # None: loaded and checked; else why the kernels are off
_fakes_registered = False


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


def _compilers() -> tuple[str, str]:
    """The C and C++ compilers: ``$CC``/``$CXX``, else ``cc``/``c++``."""
    return os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")


def library_path(cache: Path | None = None) -> Path:
    """The library's path in the cache: one file per sources, flags, PyTorch version and CPU."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join((*_C_FLAGS, *_CXX_FLAGS, torch.__version__)).encode())
    digest.update(_cpu_signature().encode())
    return (cache or cache_dir()) / f"ncatool_ops-{digest.hexdigest()[:16]}.so"


def build(cc: str | None = None, cxx: str | None = None, cache: Path | None = None) -> Path | None:
    """Compile and link the operators into the cache, once per key (see :func:`library_path`).

    Args:
        cc: C compiler (default ``$CC`` or ``cc``).
        cxx: C++ compiler (default ``$CXX`` or ``c++``).
        cache: Cache folder (default :func:`cache_dir`).

    Returns:
        The library's path, or None when a compiler is missing or the build fails (then nothing is
        left in the cache).
    """
    target = library_path(cache)
    if target.is_file():
        return target
    default_cc, default_cxx = _compilers()
    cc, cxx = cc or default_cc, cxx or default_cxx
    if not (shutil.which(cc) and shutil.which(cxx)):
        return None
    from torch.utils.cpp_extension import include_paths, library_paths

    includes = [f"-I{p}" for p in include_paths()]
    libs = [arg for p in library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ncatool_ops-", dir=target.parent) as tmp:
            c_obj, cpp_obj, lib = Path(tmp, "kernels.o"), Path(tmp, "ops.o"), Path(tmp, "ops.so")
            steps = [
                [cc, *_C_FLAGS, "-c", str(_HERE / "_kernels.c"), "-o", str(c_obj)],
                [cxx, *_CXX_FLAGS, *includes, "-c", str(_HERE / "_ops.cpp"), "-o", str(cpp_obj)],
                [
                    cxx,
                    "-shared",
                    "-fopenmp",
                    str(c_obj),
                    str(cpp_obj),
                    *libs,
                    "-lc10",
                    "-ltorch_cpu",
                    "-o",
                    str(lib),
                ],
            ]
            for cmd in steps:
                if subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode != 0:
                    return None
            os.replace(lib, target)  # atomic: another process never sees half a library
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _ops_registered() -> bool:
    try:
        torch.ops.ncatool.perceive_rows  # noqa: B018 - the lookup is the test
    except (AttributeError, RuntimeError):
        return False
    return True


def probe() -> str | None:
    """Decide afresh whether the kernels can run here: build, load, self-check (nothing cached).

    Returns:
        None when they run, else the reason they are off.
    """
    if os.environ.get("NCATOOL_KERNELS", "1") == "0":
        return "disabled by NCATOOL_KERNELS=0"
    path = build()
    if path is None:
        cc, cxx = _compilers()
        return f"no working C/C++ compiler ({cc}, {cxx}) or the build failed"
    if not _ops_registered():  # a second copy of the library would register the namespace twice
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as err:
            return f"could not load {path} ({err})"
    register_fakes()
    # the caller may be inside autocast or no_grad: the check needs neither
    with torch.autocast("cpu", enabled=False), torch.enable_grad():
        ok = _self_check()
    return None if ok else "the self-check against PyTorch failed"


def library() -> Any | None:
    """``torch.ops.ncatool`` when the kernels run here (decided once per process), else None."""
    global _status
    if _status == _UNSET:
        _status = probe()
    return torch.ops.ncatool if _status is None else None


def status() -> str:
    """``"on"``, or why the fused kernels are off (decides, as :func:`library` does)."""
    library()
    return "on" if _status is None else str(_status)


def register_fakes() -> None:
    """Shape-only implementations of the operators (for ``torch.compile`` and ``opcheck``), once."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("ncatool::perceive_rows")
    def _perceive(x, taps, bias, padding, idx, dtype):  # type: ignore[no-untyped-def]
        n = idx.shape[0] if idx is not None else x.numel() // x.shape[1]
        return x.new_empty(n, x.shape[1] * (1 + sum(t.shape[0] for t in taps)), dtype=dtype)

    @torch.library.register_fake("ncatool::perceive_rows_backward")
    def _perceive_bwd(x, taps, padding, idx, grad, grad_x, need_taps, need_bias):  # type: ignore[no-untyped-def]
        g_taps = [t.new_empty(t.shape if need else (0,)) for t, need in zip(taps, need_taps, strict=True)]
        g_bias = [
            t.new_empty((t.shape[0], t.shape[-1]) if need else (0,))
            for t, need in zip(taps, need_bias, strict=True)
        ]
        return g_taps, g_bias

    @torch.library.register_fake("ncatool::update_rows")
    def _update(x, dx, idx, fired, fixed, alive_channel, alive_threshold):  # type: ignore[no-untyped-def]
        cells = x.numel() // x.shape[1] if alive_channel is not None else 0
        return torch.empty_like(x), x.new_empty(cells, dtype=torch.bool)

    @torch.library.register_fake("ncatool::update_rows_backward")
    def _update_bwd(grad, life, idx, fired, rows, fixed, dtype):  # type: ignore[no-untyped-def]
        c = grad.shape[1]
        return grad.new_empty(grad.numel() // c, c), grad.new_empty(rows, c - fixed, dtype=dtype)

    @torch.library.register_fake("ncatool::relu_backward_")
    def _relu(grad, h):  # type: ignore[no-untyped-def]
        return grad

    @torch.library.register_fake("ncatool::mask_indices")
    def _mask(mask):  # type: ignore[no-untyped-def]
        return mask.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


Filter = tuple[torch.Tensor, "torch.Tensor | None"]


class _Group:
    """Consecutive filters of one kernel size, packed as the kernels read them.

    Attributes:
        first: Index of the group's first filter.
        members: The filters ``(weight (C, 1, *k), bias or None)``.
        taps: float32 ``(nf, *k, C)``.
        bias: float32 ``(nf, C)`` (zeros for filters without a bias), or None if none has one.
    """

    def __init__(self, first: int, members: list[Filter]) -> None:
        self.first, self.members = first, members
        weight = members[0][0]
        c, k = weight.shape[0], weight.shape[2:]
        self.taps = torch.stack([w.detach().reshape(c, -1).t().reshape(*k, c).float() for w, _ in members])
        self.bias: torch.Tensor | None = None
        if any(b is not None for _, b in members):
            self.bias = torch.stack(
                [b.detach().float() if b is not None else torch.zeros(c) for _, b in members]
            )


def _groups(filters: Sequence[Filter]) -> list[_Group]:
    """Runs of consecutive filters with the same kernel size: one C call each."""
    runs: list[tuple[int, list[Filter]]] = []
    for i, f in enumerate(filters):
        if runs and f[0].shape[2:] == runs[-1][1][0][0].shape[2:]:
            runs[-1][1].append(f)
        else:
            runs.append((i, [f]))
    return [_Group(first, members) for first, members in runs]


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
    groups = _groups(filters)
    return torch.ops.ncatool.perceive_rows(
        x, [g.taps for g in groups], [g.bias for g in groups], padding, idx, dtype
    )


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
    groups = _groups(filters)
    spans = [range(g.first, g.first + len(g.members)) for g in groups]
    need_taps = [any(needs[j][0] for j in span) for span in spans]
    need_bias = [
        g.bias is not None and any(needs[j][1] for j in span) for g, span in zip(groups, spans, strict=True)
    ]
    g_taps, g_bias = torch.ops.ncatool.perceive_rows_backward(
        x, [g.taps for g in groups], padding, idx, grad.contiguous(), grad_x, need_taps, need_bias
    )
    out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(filters)
    for g, span, gw, gb in zip(groups, spans, g_taps, g_bias, strict=True):
        c = g.taps.shape[-1]
        for k, j in enumerate(span):
            weight, bias = filters[j]
            w_grad = (
                gw[k].reshape(-1, c).t().reshape(weight.shape).to(weight.dtype)
                if gw.numel() and needs[j][0]
                else None
            )
            b_grad = gb[k].to(bias.dtype) if gb.numel() and bias is not None and needs[j][1] else None
            out[j] = (w_grad, b_grad)
    return out


def relu_backward_(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``grad`` zeroed in place where ``h <= 0`` (ReLU's backward; as ``aten.threshold_backward``).

    Args:
        grad: Contiguous float32 or bfloat16 tensor.
        h: The ReLU's output, same shape and dtype, contiguous.
    """
    return torch.ops.ncatool.relu_backward_(grad, h)


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """``mask.reshape(-1).nonzero().squeeze(1)`` for a contiguous bool tensor, in one pass."""
    return torch.ops.ncatool.mask_indices(mask)


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
        idx: The fired cells ``(fired,)``, sorted and unique (None: row r is cell r).
        fired: Rows of ``dx`` to apply.
        fixed: Leading channels the update leaves alone.
        alive: ``(channel, threshold)`` for alive masking, or None.

    Returns:
        The new state (same shape and layout as ``x``) and the ``(cells,)`` bool mask of cells alive
        before and after (None without alive masking).
    """
    channel, threshold = alive if alive is not None else (None, 0.0)
    new, life = torch.ops.ncatool.update_rows(x, dx.contiguous(), idx, fired, fixed, channel, threshold)
    return new, (life if alive is not None else None)


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
    return torch.ops.ncatool.update_rows_backward(grad, life, idx, fired, rows, fixed, dtype)


def _self_check() -> bool:
    """The kernels against PyTorch's convolution on a small 3D case (reflect, learned bias, bf16).

    Its inputs come from a private generator: the check runs in whichever process first uses the
    kernels, and must not move the global RNG that the fire masks draw from.
    """
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
