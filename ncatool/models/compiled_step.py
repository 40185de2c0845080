"""The NCA step compiled by ``torch.compile``: the backend ``"compiled"``, an explicit setting.

What is compiled is :meth:`ncatool.models.nca.NCA.reference_step` itself, the definition, so the
compiled step computes the same function. Only the fire mask is drawn outside the compiled region,
with :func:`~ncatool.models.nca.fire_mask`, so the same seed fires the same cells as the reference
and fast steps (Inductor's in-kernel random numbers would differ), and gradient checkpointing
(``checkpoint_every``, torch's checkpoint replaying the RNG state) recomputes the same cells.

On CUDA, Inductor generates Triton kernels for the pointwise parts (the fire and alive masks, the
update, the concatenation of the features) around cuDNN/cuBLAS for the convolutions and products;
on CPU it generates C++. It is meant for GPUs, where the eager step is many small memory-bound
kernels; on CPU the fast backend (fused kernels, only the fired cells through the MLP) is faster.
Not measured on a GPU yet: ``benchmarks/gpu_check.sh`` times it as the ``+compile`` variants of
``ncatool bench``. Shapes are static: every new size compiles again (seconds to a minute, cold;
``TORCHINDUCTOR_CACHE_DIR`` keeps the cache between processes).

Settings (:class:`~ncatool.models.fast_step.FastOptions`): ``compiler`` (``torch.compile``'s
backend: ``"inductor"``; ``"aot_eager"`` traces the same graphs without generating code, which is
what the CPU tests use) and ``compile_mode`` (e.g. ``"max-autotune-no-cudagraphs"``). CUDA graphs
(``"reduce-overhead"``) are not used by default and untested: at GPU-sized work (millions of cells)
a step's kernels run far longer than their launches, and a replay reuses its output buffers, which
the next step reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch

from ncatool.models.nca import fire_mask

if TYPE_CHECKING:
    from ncatool.models.nca import NCA

#: Compiled steps per NCA and (compiler, mode); dropped with the NCA.
_COMPILED: WeakKeyDictionary[NCA, dict[tuple[str, str | None], Callable[..., Any]]] = WeakKeyDictionary()
#: Every NCA, level and size is a compiled variant of the same function: more than dynamo's default 8.
RECOMPILE_LIMIT = 64


def compiled(nca: NCA, compiler: str = "inductor", mode: str | None = None) -> Callable[..., Any]:
    """``nca.reference_step`` compiled (once per NCA, compiler and mode)."""
    per_nca = _COMPILED.setdefault(nca, {})
    key = (compiler, mode)
    if key not in per_nca:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # renamed across PyTorch versions
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
        per_nca[key] = torch.compile(nca.reference_step, backend=compiler, mode=mode, dynamic=False)
    return per_nca[key]


def compiled_step(
    nca: NCA, x: torch.Tensor, cond: torch.Tensor | None = None, fire: torch.Tensor | None = None
) -> torch.Tensor:
    """One step of ``nca`` (``(B, C, *S)`` → ``(B, C, *S)``) through the compiled reference step.

    ``fire`` ``(B, 1, *S)``: the cells that update; None draws them as the reference step does.
    """
    from ncatool.models.fast_step import FastOptions

    cfg = nca.cfg
    if fire is None and cfg.fire_rate < 1.0:
        fire = fire_mask((x.shape[0], 1, *x.shape[2:]), cfg.fire_rate, x.device, torch.bool)
    options = nca.fast_options or FastOptions()
    return compiled(nca, options.compiler, options.compile_mode)(x, cond, fire)
