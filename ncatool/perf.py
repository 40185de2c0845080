"""Process-wide performance settings for the heavy commands (train, bench, ...).

**Allocator.** An NCA step allocates and frees the same few large tensors every step. glibc's
``malloc`` serves blocks above its mmap threshold (128 KiB, adapted at run time) with ``mmap`` and
returns them to the OS on ``free``, and trims the top of the heap, so every step faults the same
memory in again: in a plain PyTorch NCA most of the run is page faults (measured on 2 cores, 1
thread: 9,200 minor faults and 27 ms per 64x64x8 inference step; 0 faults and 12 ms without them).
:func:`tune_malloc` sets, through ``ctypes``:

- ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (glibc's maximum on 64-bit): blocks up to 32 MiB come from
  the heap, which is never trimmed (``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``), so they are reused
  without page faults;
- ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator at its first allocation, so it only
  takes effect before ``import torch``): larger blocks are mmapped on 2 MiB transparent huge pages
  (where the kernel allows ``madvise``), 512x fewer faults.

``M_MMAP_MAX=0`` (every block from the heap) is as fast, but the heap then fragments: training the
two-level 3D NCA at 64^3 with checkpointing peaked at 1.5 GB instead of 0.9 GB. The process keeps its
peak heap until it exits, which is what a training process wants. Where glibc is absent (macOS,
Windows, musl) :func:`tune_malloc` does nothing and returns False. The same through the environment
(set before the process starts; the Makefile exports the glibc part)::

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296
    THP_MEM_ALLOC_ENABLE=1

``NCATOOL_MALLOPT=0`` disables :func:`tune_malloc`.

**Threads.** PyTorch's intra-op pool defaults to the number of cores; :func:`tune_process` sets it
when asked (``--threads``) and leaves it alone otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit

_applied: bool | None = None


def _glibc() -> Any | None:
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def tune_malloc(force: bool = False) -> bool:
    """Keep freed heap memory in the process, huge pages for the largest blocks (glibc only).

    Idempotent. Call it before ``import torch`` for the huge-page part to take effect.

    Args:
        force: Apply again even if already applied in this process.

    Returns:
        True if both ``mallopt`` calls succeeded; False where glibc is absent, when disabled with
        ``NCATOOL_MALLOPT=0``, or when glibc refused a setting.
    """
    global _applied
    if _applied is not None and not force:
        return _applied
    _applied = False
    if os.environ.get("NCATOOL_MALLOPT", "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok


def glibc_version() -> str | None:
    """glibc's version string, or None where it is absent."""
    libc = _glibc()
    if libc is None:
        return None
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    return str(libc.gnu_get_libc_version().decode())


def tune_process(threads: int | None = None) -> dict[str, Any]:
    """Apply ncatool's process-wide settings at the start of a heavy command.

    Args:
        threads: Intra-op threads for PyTorch (None: leave PyTorch's default, the core count).

    Returns:
        What is in effect: ``malloc_tuned``, ``threads``, ``glibc``.
    """
    tuned = tune_malloc()
    import torch

    if threads is not None and threads > 0:
        torch.set_num_threads(threads)
    return {"malloc_tuned": tuned, "threads": torch.get_num_threads(), "glibc": glibc_version()}
