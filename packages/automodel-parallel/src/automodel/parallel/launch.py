"""``init_distributed``: start the default process group from the torchrun environment."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(*, backend: str | None = None, timeout_s: float = 1800.0) -> int:
    """Returns this process's rank after starting the default process group (once).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) it joins the job: NCCL when CUDA is available
    (and selects ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun it starts an in-process world
    of 1, so the same script runs unchanged on a laptop. Calling it again is a no-op.

    Args:
        backend: force ``"nccl"``, ``"gloo"`` or ``"cpu:gloo,cuda:nccl"``; None picks as above.
        timeout_s: collective timeout in seconds.

    Returns:
        The global rank (0 in a world of 1).

    Example:
        >>> from automodel.parallel import init_distributed
        >>> rank = init_distributed()  # under torchrun, or alone
    """
    if dist.is_initialized():
        return dist.get_rank()
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        # A world of 1 needs no rendezvous: an in-memory store is enough.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return dist.get_rank()
