"""The process's place in the run: device, rank, data-parallel group; init from torchrun's env."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, global rank, and its data-parallel coordinates.

    ``dp_rank``/``dp_size`` pick this rank's data shard and ``dp_group`` sums token counts and
    losses; they differ from ``rank``/``world_size`` under tensor or pipeline parallelism, where
    several ranks share the same tokens.
    """

    device: torch.device
    rank: int
    world_size: int
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None

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
    nccl on GPU (gloo for CPU tensors) and gloo on CPU (``automodel.parallel.init_distributed``).
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
        from automodel.parallel import init_distributed

        init_distributed(backend=None if use_cuda else "gloo")
    return Runtime(device=dev, rank=rank, world_size=world, dp_rank=rank, dp_size=world)


def teardown_runtime() -> None:
    """Destroys the process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Returns ``t`` summed over the data-parallel ranks (in place; a no-op on one process)."""
    if rt.dp_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=rt.dp_group)
    return t
