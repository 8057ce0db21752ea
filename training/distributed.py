"""Process-group helpers for training under ``torchrun`` (PyTorch DDP); a no-op in a plain process.

``torchrun --nproc_per_node=N`` (and ``--nnodes``) starts one process per GPU (or CPU worker) and
describes it in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
:func:`from_env` reads that; :func:`init` joins the process group (NCCL on CUDA, gloo on CPU).
Everything a trainer needs is a method of :class:`Context`, and every method works unchanged with
one process, so the training code has a single path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from SimpleSliceNetLib.errors import UserError

T = TypeVar("T")

# Rank 0 validates, calibrates and writes files while the other ranks wait in the next collective;
# torch's default of 30 minutes is too short for validating hundreds of volumes.
TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and the model file."""
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th one starting at ``rank``."""
        return items[self.rank :: self.world_size]

    def all_reduce(self, tensor: Any, op: str = "sum") -> Any:
        """``tensor`` summed (or maximised, ``op="max"``) over all ranks, in place; returned for chaining."""
        if self.active:
            import torch.distributed as dist

            # NCCL reduces GPU tensors only; the trainer's bookkeeping tensors live on the CPU.
            work = tensor.cuda() if dist.get_backend() == "nccl" else tensor
            dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if work is not tensor:
                tensor.copy_(work)
        return tensor

    def broadcast(self, value: T, src: int = 0) -> T:
        """Rank ``src``'s ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def from_env(environ: dict | None = None) -> Context:
    """The context ``torchrun`` describes in the environment (rank 0 of 1 without it)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); start the job with torchrun") from exc
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not within WORLD_SIZE={world}; start the job with torchrun")
    return Context(rank, world, local)


def is_distributed(environ: dict | None = None) -> bool:
    """True when this process is one of several started by ``torchrun``."""
    return from_env(environ).active


def init(context: Context, device: str) -> str:
    """Join the process group for ``context`` (NCCL when ``device`` is CUDA, else gloo); returns the backend.

    On CUDA every process takes the GPU numbered by its ``local_rank``; call this before moving
    anything to the GPU.
    """
    if not context.active:
        return ""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=context.rank, world_size=context.world_size, timeout=TIMEOUT)
    return backend


def cleanup(context: Context) -> None:
    """Leave the process group (safe to call when none was joined)."""
    if context.active:
        import torch.distributed as dist

        if dist.is_initialized():
            # A rank that tears gloo down while its peer is still sending aborts the peer
            # ("terminate called without an active exception"): leave together.
            dist.barrier()
            dist.destroy_process_group()
