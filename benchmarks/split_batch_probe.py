#!/usr/bin/env python3
"""Probe for issue 8: one 2-thread process vs two 1-thread workers on half batches.

ncatool's fast NCA step gains little from a second intra-op thread (its ops are many and small),
so this measures the alternative: split the batch in two, run forward and ``torch.autograd.grad``
of each half on its own Python thread with ``torch.set_num_threads(1)``, and sum the gradients in a
fixed order. Workload as ``ncatool bench``'s ``train2d``: Growing NCA, 64×64, batch 8, 64 steps,
MSE on RGBA, Adam step; median of 5 after one warm-up.

Measured 2026-11-24 on the 2-core CPU machine (alternating runs, GLIBC_TUNABLES as the Makefile):
split vs intra fp32 4.84–5.83 vs 4.48–4.92 M cell-updates/s, bf16 7.54–7.90 vs 5.85–7.28 — between
no gain and 1.3×, varying from run to run: not the lever that would bring training to 4× the naive.

Not wired into training: the fire masks draw from torch's global generator, which two threads
would share in a non-deterministic order (resume would stop being bit-exact); per-worker generators
are needed first.

Usage::

    .venv/bin/python benchmarks/split_batch_probe.py intra|split [fp32|bf16]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch

from ncatool.bench import growing_config
from ncatool.models.nca import NCA
from ncatool.perf import tune_process

BATCH, SIZE, STEPS = 8, 64, 64


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "split"
    dtype = torch.bfloat16 if len(sys.argv) > 2 and sys.argv[2] == "bf16" else None
    if mode not in ("intra", "split"):
        raise SystemExit("usage: split_batch_probe.py intra|split [fp32|bf16]")
    tune_process()
    torch.manual_seed(0)
    model = NCA(growing_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fc1.weight"):  # the zero-initialised last layer would make it trivial
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    x0, target = torch.rand(BATCH, 16, SIZE, SIZE), torch.rand(BATCH, 4, SIZE, SIZE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)

    def loss_of(part: slice) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(x0[part], STEPS)[:, :4].float()
        return (out - target[part]).square().mean() * (part.stop - part.start) / BATCH

    def half(part: slice, grads: list[torch.Tensor]) -> None:
        grads[:] = torch.autograd.grad(loss_of(part), params)

    def step() -> None:
        opt.zero_grad()
        if mode == "intra":
            loss_of(slice(0, BATCH)).backward()
        else:
            grads: list[list[torch.Tensor]] = [[], []]
            parts = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
            workers = [threading.Thread(target=half, args=(p, g)) for p, g in zip(parts, grads, strict=True)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            for p, a, b in zip(params, grads[0], grads[1], strict=True):
                p.grad = a + b
        opt.step()

    torch.set_num_threads(2 if mode == "intra" else 1)
    step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    name = "bf16" if dtype else "fp32"
    print(
        f"{mode} {name}: {BATCH * SIZE * SIZE * STEPS / median / 1e6:.2f} M cell-updates/s ({median:.3f} s)"
    )


if __name__ == "__main__":
    main()
