"""Many processes, one run: torch.distributed under ``torchrun`` (or ``ncatool train --nproc N``).

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment;
:func:`setup` joins the process group (gloo on CPU, NCCL on CUDA with one device per local rank) and
returns a :class:`World`. Without those variables the world is one process and every helper here
is a no-op, so the single-process path is the same code.

The rules a distributed run follows (as nnU-Net's DDP trainer):

* ``batch_size`` is the *global* batch: every rank draws the same global batch from the per-epoch
  seed and keeps its contiguous share (:meth:`World.shard`), so a config means the same run at any
  world size, and a resumed run replays exactly.
* Random draws inside the model that belong to individual samples (the fire masks of the stochastic
  update) are drawn for the whole global batch and sliced (:func:`ncatool.models.nca.batch_shard`),
  so 2 ranks with batch B compute what 1 process with batch B computes, up to float reduction order.
* Every branching decision is taken together: a flag is reduced over ranks (:meth:`World.any`) or
  decided on rank 0 and broadcast (:meth:`World.broadcast`).
* Only rank 0 writes the run folder and prints progress; the others print only errors.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ncatool.errors import NcaError

if TYPE_CHECKING:
    import torch

#: Environment variables ``torchrun`` sets for each process.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """The processes of one run.

    Attributes:
        rank: This process's index in ``[0, size)``.
        size: Number of processes.
        local_rank: Index on this node (picks the CUDA device).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1

    def shard_size(self, batch: int) -> int:
        """This rank's share of a global batch.

        Raises:
            NcaError: The batch cannot be split evenly over the ranks.
        """
        if batch % self.size:
            raise NcaError(
                f"batch_size {batch} cannot be split evenly over {self.size} ranks: batch_size is the "
                f"global batch (as in nnU-Net), use a multiple of {self.size}"
            )
        return batch // self.size

    def shard(self, batch: Any, size: int) -> Any:
        """This rank's contiguous share of a global ``batch`` of ``size`` items.

        Tensors (and sequences of tensors, named tuples) are cut along their first dimension; plain
        numbers (e.g. a step count for the whole batch) are kept.
        """
        import torch

        if not self.distributed:
            return batch
        # contiguous shares, equal when the global batch divides (checked at the start of training);
        # a short last batch of an epoch is shared as evenly as it goes
        lo, hi = self.rank * size // self.size, (self.rank + 1) * size // self.size
        if isinstance(batch, torch.Tensor):
            return batch[lo:hi] if batch.dim() and batch.shape[0] == size else batch
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*(self.shard(item, size) for item in batch))
        if isinstance(batch, tuple | list):
            return type(batch)(self.shard(item, size) for item in batch)
        return batch

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped ``tensor`` concatenated along dim 0, in rank order."""
        if not self.distributed:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @property
    def device(self) -> torch.device:
        """Where collectives put their tensors: this rank's CUDA device under NCCL, else the CPU."""
        import torch
        import torch.distributed as dist

        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


_WORLD = World()


def world() -> World:
    """The current world (one process unless :func:`setup` joined a process group)."""
    return _WORLD


def launched_by_torchrun() -> bool:
    """``torchrun`` (or ``torch.distributed.run``) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def setup(device: str = "auto") -> World:
    """Join the process group when started by ``torchrun``; pick this rank's device name.

    Args:
        device: The requested device (``auto``, ``cpu``, ``cuda`` ...).

    Returns:
        The world (one process when not launched by torchrun).

    Raises:
        NcaError: The environment is inconsistent or the group cannot be joined.
    """
    global _WORLD
    if _WORLD.distributed or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return _WORLD
    import torch
    import torch.distributed as dist

    rank, size, local = (int(os.environ[v]) for v in TORCHRUN_VARS)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except Exception as err:  # rendezvous failures come in many types
            raise NcaError(f"cannot join the process group of rank {rank}/{size}: {err}") from err
    _WORLD = World(rank=rank, size=size, local_rank=local)
    atexit.register(teardown)
    if not _WORLD.is_main:
        from ncatool.console import state

        state.quiet = True  # rank 0 reports; the others print only errors
    return _WORLD


def rank_device(device: str, w: World) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run, else ``device`` unchanged."""
    if w.distributed and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{w.local_rank}"
    return device


def teardown() -> None:
    """Leave the process group (end of a distributed command)."""
    global _WORLD
    if _WORLD.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()
