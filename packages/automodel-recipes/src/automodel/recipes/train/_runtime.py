"""The process's place in the run: device, rank, world size; distributed init from torchrun env."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its rank among ``world_size`` processes."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on the rank that prints, logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto") -> Runtime:
    """Returns the Runtime, initializing the process group when launched by torchrun (WORLD_SIZE>1).

    ``device="auto"`` picks this rank's GPU when CUDA is available, else the CPU; the backend is
    nccl on GPU and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Half the cores per local process: intra-op threads that outnumber free cores spin
        # against each other (10x slower steps seen on a shared 2-core box). OMP_NUM_THREADS wins.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local // 2))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(device=dev, rank=rank, world_size=world)


def teardown_runtime() -> None:
    """Destroys the process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Returns ``t`` summed over ranks (in place; a no-op on one process)."""
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
