"""The process group a run belongs to: one process, or one rank of a `torchrun` launch.

Under torchrun (WORLD_SIZE > 1 in the environment) the group is created with gloo on CPU and nccl on GPU; each
rank computes a slice of every global batch and DistributedDataParallel averages the gradients, so the same job file
gives the same optimisation whatever the number of processes (up to float summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from surgery.errors import UserError


@dataclass
class World:
    """Rank, size and device of this process.

    Attributes:
        rank: 0 .. size - 1; rank 0 writes events, checkpoints and the output.
        size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: where this rank's models live.
        distributed: a torch.distributed process group is active.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all ranks (the tensor itself in a single process)."""
        if not self.distributed:
            return value
        out = value.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one (used so every rank stops at the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
            self.distributed = False


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is available, else cpu; anything else is checked and used."""
    from surgery.loading import check_device

    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device(f"cuda:{local_rank}")
    return dev


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group when there is one, else describe a single process.

    Raises:
        UserError: torchrun asked for several processes but torch.distributed is unavailable.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if size <= 1:
        return World(0, 1, 0, dev)
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run the job as a single process")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank, size, local_rank, dev, distributed=True)
