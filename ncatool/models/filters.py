"""Fixed perception kernels for 2D and 3D NCAs.

Every kernel is 3 wide along each axis. Derivative kernels (``sobel``, ``scharr``) come as one kernel
per axis and sum to 0; ``laplacian`` sums to 0; smoothing kernels (``gaussian``, ``mean``) sum to 1.
Derivative kernels are normalised so the smoothing part sums to 1 (Sobel/8 in 2D, as Growing NCA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FIXED_FILTERS: tuple[str, ...] = ("sobel", "scharr", "gaussian", "laplacian", "mean")

_DERIV = torch.tensor([-1.0, 0.0, 1.0])
_SMOOTH = {"sobel": torch.tensor([1.0, 2.0, 1.0]), "scharr": torch.tensor([3.0, 10.0, 3.0])}


def _outer(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of 1D vectors → a ``len(vectors)``-D kernel."""
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v
    return out


def derivative_kernels(name: str, dim: int) -> torch.Tensor:
    """Sobel or Scharr gradient kernels, one per spatial axis.

    Args:
        name: ``"sobel"`` or ``"scharr"``.
        dim: 2 or 3.

    Returns:
        ``(dim, 3, ..., 3)``; kernel ``i`` differentiates along tensor axis ``i`` (``y, x`` in 2D).
    """
    smooth = _SMOOTH[name] / _SMOOTH[name].sum()
    kernels = []
    for axis in range(dim):
        vecs = [_DERIV / 2 if a == axis else smooth for a in range(dim)]
        kernels.append(_outer(vecs))
    return torch.stack(kernels)


def laplacian_kernel(dim: int) -> torch.Tensor:
    """Nearest-neighbour Laplacian, ``(3,)*dim``: centre ``-2*dim``, face neighbours 1."""
    k = torch.zeros((3,) * dim)
    centre = (1,) * dim
    k[centre] = -2.0 * dim
    for axis in range(dim):
        for off in (0, 2):
            idx = list(centre)
            idx[axis] = off
            k[tuple(idx)] = 1.0
    return k


def filter_bank(names: Sequence[str], dim: int) -> torch.Tensor:
    """Stack the named fixed kernels.

    Args:
        names: Filter names from :data:`FIXED_FILTERS` (order kept).
        dim: 2 or 3.

    Returns:
        ``(K, 3, ..., 3)`` with K = ``dim`` per derivative filter and 1 per other filter.

    Raises:
        ValueError: For an unknown name.
    """
    kernels: list[torch.Tensor] = []
    for name in names:
        if name in _SMOOTH:
            kernels.extend(derivative_kernels(name, dim))
        elif name == "gaussian":
            g = torch.tensor([1.0, 2.0, 1.0]) / 4.0
            kernels.append(_outer([g] * dim))
        elif name == "laplacian":
            kernels.append(laplacian_kernel(dim))
        elif name == "mean":
            kernels.append(torch.full((3,) * dim, 1.0 / 3**dim))
        else:
            raise ValueError(f"unknown filter {name!r}; choose from {FIXED_FILTERS}")
    return torch.stack(kernels)
