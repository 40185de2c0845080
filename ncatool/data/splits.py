"""Seeded splits: which cases are held out, drawn in one place for every caller.

``prepare --test-fraction`` (imagesTs), the validation split of ``train`` (seg2d/seg3d) and the
digits task's held-out images all come from :func:`split_indices`, so one seed means the same thing
everywhere:

* the draw is ``numpy.random.default_rng(seed).permutation(n)``; the first ``n_held`` positions of
  that order are held out (case names are sorted first, so the result does not depend on the order in
  which files were listed);
* ``n_held`` is ``round(n * fraction)`` (Python's ``round``: ties go to the even count), at least one
  for a positive fraction and at most ``n - 1``, so both sides are non-empty whenever ``n >= 2``.

The validation split of ``train`` and the digits split are the ones ncatool has always drawn (same
seed, same cases); ``prepare``'s test split used Python's ``random.sample`` before and now draws the
same way as the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ncatool.errors import NcaError


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` items a fraction holds out (see the module docstring).

    Args:
        n: Number of items.
        fraction: Share to hold out, in ``[0, 1)``.

    Returns:
        ``0`` for ``fraction == 0`` or ``n < 2``, else ``round(n * fraction)`` clipped to ``[1, n - 1]``.

    Raises:
        NcaError: ``fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise NcaError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if n < 2 or fraction == 0.0:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def split_indices(
    n: int, fraction: float, seed: int, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The one seeded draw: split ``range(n)`` into kept and held-out indices.

    Args:
        n: Number of items.
        fraction: Share held out, in ``[0, 1)`` (see :func:`held_out_count`).
        seed: Seed of the permutation.
        limit: Use only the first ``limit`` items of the seeded order (a random subset of that size);
            None or 0 uses all.

    Returns:
        ``(kept, held)``: int64 index arrays ``(n - n_held,)`` and ``(n_held,)`` in the seeded order.
    """
    order = np.random.default_rng(seed).permutation(n)
    if limit:
        order = order[:limit]
    n_held = held_out_count(len(order), fraction)
    return order[n_held:], order[:n_held]


def split_cases(names: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split case names into kept and held-out cases, reproducibly.

    The result depends only on the set of names, ``fraction`` and ``seed`` (not on input order).

    Args:
        names: Case names (duplicates are ignored).
        fraction: Share held out, in ``[0, 1)``; 0 holds out nothing.
        seed: Seed of the draw.

    Returns:
        ``(kept, held)``, each sorted, disjoint, together all names.
    """
    unique = sorted(set(names))
    kept, held = split_indices(len(unique), fraction, seed)
    return sorted(unique[i] for i in kept), sorted(unique[i] for i in held)
