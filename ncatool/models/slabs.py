"""Low-memory inference: an NCA step run in slabs along the first spatial axis.

A step's temporaries (padding, perception, hidden layer, update) take several times the state's
memory; for a 256³ volume at native size that is tens of GB. :func:`slab_step` runs the step on
slabs of the first spatial axis, each with a halo of :func:`halo` cells on either side, and keeps
only the slab's interior: the result equals a whole step (the padding at the true borders is the
same, and the fire mask is drawn once for the whole state, exactly as a whole step draws it, then
cut into slabs). :func:`run_in_slabs` steps into two alternating state buffers, so a run holds two
states plus one slab's temporaries. ``NCA.forward(..., step_budget=...)`` and
``SegmentationNCA.forward(..., step_budget=...)`` are the entry points.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ncatool.models.nca import NCA


def step_bytes_per_cell(nca: NCA) -> int:
    """Rough bytes per cell of one step's temporaries (padding, perception, MLP, update; float32)."""
    return (2 * nca.perception.out_channels + 2 * nca.cfg.hidden + 4 * nca.cfg.channels) * 4


def halo(nca: NCA) -> int:
    """How far (cells) a cell's next value depends on its neighbours in one step: the perception's
    reach, plus one with alive masking (the mask after the step looks at the new neighbours)."""
    perception = nca.perception
    radius = max(perception.learned_radius if len(perception.learned) else 0, 1 if perception.n_fixed else 0)
    return radius + (1 if nca.cfg.alive_channel is not None else 0)


def slab_depth(nca: NCA, x: torch.Tensor, budget: int) -> int:
    """Planes of the first spatial axis per slab so that one slab's temporaries fit ``budget`` bytes."""
    plane = x.shape[0] * math.prod(x.shape[3:]) * step_bytes_per_cell(nca)
    return max(1, budget // max(plane, 1))


def slab_step(
    nca: NCA,
    x: torch.Tensor,
    cond: torch.Tensor | None,
    budget: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of ``x`` ``(B, C, *S)``, in slabs when the whole step would exceed ``budget`` bytes.

    Args:
        nca: The automaton.
        x: State ``(B, C, *S)``.
        cond: Conditioning ``(B, cond_channels)`` of a conditional NCA.
        budget: Bytes allowed for one slab's temporaries.
        out: Where to write the new state (shape and layout of ``x``; not ``x``); None allocates.

    Returns:
        The next state (``out`` when given). Circular padding has no true border to cut at: those
        states take the whole step.
    """
    from ncatool.models.nca import fire_mask  # imported late: nca.py imports this module

    depth = x.shape[2]
    slab = slab_depth(nca, x, budget)
    if slab >= depth or nca.cfg.padding == "circular":
        new = nca.step(x, cond)
        return out.copy_(new) if out is not None else new
    out = torch.empty_like(x) if out is None else out
    fire = None
    if nca.cfg.fire_rate < 1.0:  # one draw for the whole state, as a whole step draws it
        fire = fire_mask((x.shape[0], 1, *x.shape[2:]), nca.cfg.fire_rate, x.device, torch.bool)
    reach = halo(nca)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(0, z0 - reach), min(depth, z1 + reach)
        part = fire[:, :, lo:hi] if fire is not None else None
        out[:, :, z0:z1] = nca.step(x[:, :, lo:hi], cond, fire=part)[:, :, z0 - lo : z1 - lo]
    return out


def run_in_slabs(
    nca: NCA, x: torch.Tensor, steps: int, cond: torch.Tensor | None, budget: int
) -> torch.Tensor:
    """``steps`` steps of :func:`slab_step` into two alternating buffers (inference only).

    Raises:
        ValueError: Gradients are on (the buffers are written in place; call under ``torch.no_grad()``).
    """
    if torch.is_grad_enabled():
        raise ValueError("step_budget is for inference: call it under torch.no_grad()")
    if steps == 0:
        return x
    state, spare = slab_step(nca, x, cond, budget), torch.empty_like(x)
    for _ in range(steps - 1):
        state, spare = slab_step(nca, state, cond, budget, out=spare), state
    return state
