"""The process group a run belongs to: one process, or one rank of a `torchrun` launch.

Under torchrun (WORLD_SIZE > 1 in the environment) the group is created with gloo on CPU and nccl on GPU; each
rank computes a slice of every global batch and DistributedDataParallel averages the gradients, so the same job file
gives the same optimisation whatever the number of processes (up to float summation order). A job with `fsdp`
started without torchrun gets a process group of one rank, so FSDP runs the same code at every world size.
"""

from __future__ import annotations

import os
import sys
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

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's `text` on every rank (sent as UTF-8 bytes in a tensor: no pickled objects)."""
        if not self.distributed:
            return text or ""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        raw = (text or "").encode("utf-8") if self.is_main else b""
        size[0] = len(raw)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.is_main and raw:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode("utf-8")

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


def check_world_size(batch_size: int, grad_accum: int, size: int) -> None:
    """Refuse a world size that cannot split the global batch evenly (before any job process starts).

    Raises:
        UserError: batch_size is not a multiple of grad_accum x size.
    """
    if batch_size % (grad_accum * size):
        raise UserError(f"batch_size {batch_size} must be a multiple of grad_accum x processes ({grad_accum} x "
                        f"{size}): change --batch-size, --grad-accum or --nproc")


def check_resume_world_size(saved: int, size: int, sharded: bool) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    Raises:
        UserError: `saved` != `size` (with what to run instead).
    """
    if saved != size:
        why = " (its FSDP shards and per-rank RNG states belong to that many ranks)" if sharded else ""
        raise UserError(f"the checkpoint was written by {saved} process(es) and this run has {size}{why}: resume "
                        f"with --nproc {saved} (torchrun --nproc-per-node {saved}); another number cannot repeat "
                        "the run bit for bit")


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL to the job's process group (or the OOM
    killer taking torchrun) would leave the ranks running, unseen by the job's lock: ask Linux to SIGKILL this
    rank when its launcher dies, so a job dies whole however it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_world(device: str = "auto", *, fsdp: bool = False) -> World:
    """Join the torchrun process group when there is one, else describe a single process (with `fsdp`: a process
    group of one rank, which FSDP needs for its device mesh).

    Raises:
        UserError: torchrun asked for several processes but torch.distributed is unavailable.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun
        _die_with_launcher()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if size <= 1 and not fsdp:
        return World(0, 1, 0, dev)
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run the job as a single process"
                        + (" without fsdp" if fsdp else ""))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if size <= 1:  # no torchrun: an in-process store, nothing listens on a port
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
    return World(rank, max(size, 1), local_rank, dev, distributed=True)
