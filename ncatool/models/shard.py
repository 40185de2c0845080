"""Random draws that belong to individual samples, the same however a batch is split.

Under torchrun each rank runs a contiguous share of the global batch (:mod:`ncatool.distributed`). A
per-sample draw such as the fire mask of the stochastic update must then be what that sample gets in
one process with the whole batch: within :func:`batch_shard` a draw is made for the whole batch from
the (identically seeded) global generator and this rank's rows are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch

_SHARD: ContextVar[tuple[int, int] | None] = ContextVar("batch_shard", default=None)


@contextlib.contextmanager
def batch_shard(offset: int, total: int) -> Iterator[None]:
    """Within this block a batch is items ``offset, offset + 1, ...`` of a global batch of ``total``."""
    token = _SHARD.set((offset, total))
    try:
        yield
    finally:
        _SHARD.reset(token)


def per_sample_uniform(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``torch.rand(shape)`` for a batch ``(B, ...)``; inside :func:`batch_shard`, this share's rows of
    the draw for the whole global batch."""
    shard = _SHARD.get()
    if shard is None:
        return torch.rand(tuple(shape), device=device)
    offset, total = shard
    return torch.rand((total, *shape[1:]), device=device)[offset : offset + shape[0]]
