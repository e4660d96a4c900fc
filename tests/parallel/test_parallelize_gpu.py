"""parallelize() with NCCL on 2 GPUs: the CPU equivalence checks, plus CPU offload (GPU only)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel._equivalence import compare, reference_run

from automodel.parallel import init_distributed
from harness.distributed import run_distributed

GPU_CASES: dict[str, dict[str, Any]] = {
    "fsdp": {"dp_shard": 2},
    "tp": {"tp": 2},
    "tp_sp_selective_ac": {
        "tp": 2,
        "sequence_parallel": True,
        "activation_checkpointing": "selective",
    },
    "fsdp_cpu_offload": {"dp_shard": 2, "cpu_offload": True},
    "fsdp_compile": {"dp_shard": 2, "compile": True},
}


def _nccl_worker(rank: int, world_size: int) -> dict[str, Any]:
    init_distributed()  # NCCL for CUDA tensors, gloo for CPU ones (offloaded params)
    device = f"cuda:{torch.cuda.current_device()}"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {}
    for name in ("llama", "qwen3"):
        reference = reference_run(name, device)
        for case, config in GPU_CASES.items():
            out[f"{name} {case}"] = compare(name, config, reference, device)
    dist.barrier()
    dist.destroy_process_group()
    return out


@pytest.mark.gpu
@pytest.mark.slow
def test_nccl_strategies_match_single_gpu() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_distributed(
        _nccl_worker,
        world_size=2,
        timeout=900,
        init_process_group=False,
        env={"CUDA_VISIBLE_DEVICES": "0,1"},
    )
    for name, r in results[0].items():
        assert r["missing"] == [], name
        # GPU kernels reorder reductions: allow a little more than on CPU.
        assert r["loss_diff"] < 1e-4, (name, r)
        assert r["grad_diff"] < 1e-3, (name, r)
