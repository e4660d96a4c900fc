"""Shared by the parallel GPU tests: launch the CPU tests' workers on NCCL ranks, one GPU each.

The GPU tests reuse the gloo tests' worker functions with ``device="cuda"`` so that the only code
they add is the launch: ``run_nccl`` starts one process per GPU through
``harness.distributed.run_distributed`` (free port, every rank killed on failure or timeout, logs
in the failure message), and the worker calls ``init_nccl`` first.

``AUTOMODEL_GPU_TESTS_ON_CPU=1`` runs the same launch on gloo CPU ranks (``device`` becomes
``"cpu"``), to check a GPU test's plumbing on a machine without GPUs (call the test function
directly: the ``gpu`` marker skips it under pytest there).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from harness.distributed import run_distributed

ON_CPU = os.environ.get("AUTOMODEL_GPU_TESTS_ON_CPU") == "1"

# fp32 on GPU: reductions run in other orders than in the single-GPU reference, and three AdamW
# steps amplify that where gradients are near zero; a sharding bug is off by O(1) instead.
LOSS_ATOL = 5e-3
GRAD_RTOL = 2e-2


def gpu_world(*, needs: int = 2, prefers: int = 4) -> int:
    """Returns the number of ranks to launch: ``prefers`` when that many GPUs exist, else ``needs``.

    Skips the test (with the reason) when fewer than ``needs`` GPUs are visible.
    """
    if ON_CPU:
        return prefers
    count = torch.cuda.device_count()
    if count >= prefers:
        return prefers
    if count < needs:
        pytest.skip(f"needs {needs} GPUs, found {count}")
    return needs


def run_nccl(
    fn: Callable[..., Any], world_size: int, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Returns ``fn(rank, world_size, **kwargs)`` of each rank, one GPU per rank (NCCL)."""
    env = {
        "CUDA_VISIBLE_DEVICES": "" if ON_CPU else ",".join(_visible_gpus()[:world_size]),
        "NCCL_NVLS_ENABLE": "0",  # NVLink multicast is off on the lent machines
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if ON_CPU:
        timeout = 1200.0  # gloo ranks on a few shared cores, not a GPU's speed
    return run_distributed(
        fn, world_size, timeout=timeout, init_process_group=False, env=env, **kwargs
    )


def _visible_gpus() -> list[str]:
    """Returns the GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def init_nccl() -> str:
    """Returns this rank's device type (``"cuda"``, set to the local rank's GPU) after joining NCCL.

    The default group serves CUDA tensors with NCCL and CPU tensors with gloo (FSDP CPU offload);
    TF32 is off so fp32 runs compare with the fp32 reference.
    """
    from automodel.parallel import init_distributed

    init_distributed(timeout_s=100.0)
    if not torch.cuda.is_available():
        return "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda"
