"""This machine's ceilings and the NCA benchmark workloads' place under them (``ncatool bench``).

A speed in cell-updates/s means little across machines; a fraction of what the machine could do at
best means the same everywhere. :func:`measure_ceilings` measures, at the benchmark's thread count:

- the float32 and bf16 matrix-product ceilings: a square ``torch.mm`` large enough to run at the
  library's best rate (CPU 2048, GPU 8192), best of a few runs;
- the memory bandwidth: a large copy (CPU 256 MiB, GPU 2 GiB), counted as read + write.

The work model of one cell-update (:func:`work_per_cell_update`), for the benchmark's NCAs:

- **multiply-adds**: perception (every filter tap of every channel) plus the two MLP layers, for the
  *fired* cells only (fire rate x per-cell work: an implementation need not touch the others); a
  training step counts 3x the forward (forward, and the backward's two products per layer).
  Recomputation (gradient checkpointing) is overhead, not counted work.
- **bytes**: the state read and written once per step (float32, ``C`` channels), in training also
  the saved state re-read and the state gradient read and written: ``2 C 4`` inference, ``5 C 4``
  training. A rough model that assumes every other temporary stays in cache: a lower bound on the
  traffic, so the bandwidth roof is an optimistic one.

The roof of a workload is ``min(compute ceiling / (2 x MACs), bandwidth / bytes)`` cell-updates/s
(the compute ceiling of the variant's matrix-product dtype: bf16 for ``bf16``, float32 otherwise);
``fraction = achieved / roof``. The perception's depthwise filters count against the
matrix-product ceiling although they run on other units: a 7^3 filter bound by memory or by
vector arithmetic shows up as a low fraction, which is what the fraction is for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: Bytes of float32 state moved per cell-update per channel: inference (read, write) and training
#: (forward read and write; backward re-read of the state, read and write of its gradient).
STATE_PASSES = {"infer": 2, "train": 5}
#: A training step's multiply-adds relative to its forward (forward + two backward products per layer).
TRAIN_FACTOR = 3


def _best_time(fn: Callable[[], Any], sync: Callable[[], None], runs: int, budget_s: float) -> float:
    """Best wall time of ``fn`` over up to ``runs`` runs after one warm-up, stopping early once
    ``budget_s`` seconds are spent (at least one timed run)."""
    fn()
    sync()
    best = float("inf")
    spent = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def measure_ceilings(
    device: str = "cpu",
    runs: int = 5,
    budget_s: float = 1.0,
    mm_size: int | None = None,
    copy_numel: int | None = None,
) -> dict[str, Any]:
    """Matrix-product ceilings (float32, bf16) and copy bandwidth of ``device`` at the current threads.

    Args:
        device: ``cpu`` or ``cuda[:N]``.
        runs: Timed runs per measurement (best taken), after one warm-up.
        budget_s: Stop a measurement's repeats once this many seconds are spent (slow bf16 on CPUs
            without bf16 instructions).
        mm_size: Edge of the square products (default: CPU 2048, GPU 8192).
        copy_numel: float32 elements copied (default: CPU 2**26, GPU 2**29).

    Returns:
        ``fp32_flops``, ``bf16_flops`` (FLOP/s, 2 per multiply-add), ``bandwidth`` (bytes/s, read +
        write of the copy), the sizes used and the seconds the measurement took.
    """
    import torch

    start = time.perf_counter()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = mm_size or (8192 if cuda else 2048)
    # GPU kernels take ~1 ms: several per timing so that the synchronisation is noise
    inner = 10 if cuda else 1

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    out: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "mm_size": n}
    gen = torch.Generator().manual_seed(0)  # the global RNG stays untouched (fire masks use it)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.rand(n, n, generator=gen).to(dev, dtype)
        b = torch.rand(n, n, generator=gen).to(dev, dtype)
        c = torch.empty(n, n, device=dev, dtype=dtype)

        def mm(a: Any = a, b: Any = b, c: Any = c) -> None:
            for _ in range(inner):
                torch.mm(a, b, out=c)

        t = _best_time(mm, sync, runs, budget_s)
        out[f"{name}_flops"] = 2.0 * n**3 * inner / t
        del a, b, c
    numel = copy_numel or (2**29 if cuda else 2**26)  # float32: 2 GiB on GPUs, 256 MiB on CPUs
    src = torch.ones(numel, device=dev)
    dst = torch.empty_like(src)

    def copy(src: Any = src, dst: Any = dst) -> None:
        for _ in range(inner):
            dst.copy_(src)

    t = _best_time(copy, sync, runs, budget_s)
    out["copy_bytes"] = numel * 4
    out["bandwidth"] = 2.0 * numel * 4 * inner / t
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
        out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    out["seconds"] = time.perf_counter() - start
    return out


def work_per_cell_update(
    kind: str,
    size: tuple[int, ...],
    batch: int,
    steps: tuple[int, ...],
    fire_rate: float = 0.5,
    channels: int = 16,
    hidden2d: int = 128,
    hidden3d: int = 64,
    kernels3d: tuple[int, ...] = (7, 3),
    n_learned: int = 2,
) -> tuple[float, float]:
    """``(multiply-adds, bytes)`` per cell-update of a benchmark workload (see the module docstring).

    2D is the Growing NCA (identity + Sobel x/y, MLP 3C -> hidden -> C); 3D the two-level seg NCA
    (identity + ``n_learned`` learned depthwise filters of the level's kernel, MLP -> hidden -> C - 1;
    level 0 at half resolution), weighted by the cells each level updates.
    """
    mode = "train" if kind.startswith("train") else "infer"
    factor = TRAIN_FACTOR if mode == "train" else 1
    if len(size) == 2:
        features = channels * 3
        macs = channels * 2 * 9 + features * hidden2d + hidden2d * channels
    else:
        features = channels * (1 + n_learned)
        mlp = features * hidden3d + hidden3d * (channels - 1)
        fine = batch
        coarse = batch
        for s in size:
            fine *= s
            coarse *= s // 2
        cells = (coarse * steps[0], fine * steps[1])
        per_level = [channels * n_learned * k**3 + mlp for k in kernels3d]
        macs = sum(c * m for c, m in zip(cells, per_level, strict=True)) / sum(cells)
    return fire_rate * macs * factor, float(STATE_PASSES[mode] * channels * 4)


def roof(macs: float, nbytes: float, flops: float, bandwidth: float) -> tuple[float, str]:
    """The roof in cell-updates/s for ``macs`` and ``nbytes`` per cell-update, and what bounds it
    (``compute`` or ``memory``)."""
    compute = flops / (2.0 * macs)
    memory = bandwidth / nbytes
    return (compute, "compute") if compute <= memory else (memory, "memory")
