"""parallelize() with NCCL on 4 GPUs (or 2): the CPU equivalence checks, CPU offload and compile.

Run this module's launch plumbing without GPUs: ``AUTOMODEL_GPU_TESTS_ON_CPU=1`` (parallel/_gpu.py).

Each test is one launch of one process per GPU running the gloo tests' ``compare`` on CUDA in
fp32 (TF32 off) against a single-GPU reference, with tolerances for reordered GPU reductions.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist
from parallel._equivalence import compare, reference_run
from parallel._gpu import GRAD_RTOL, LOSS_ATOL, gpu_world, init_nccl, run_nccl

CASES_4: dict[str, dict[str, Any]] = {
    "fsdp": {"dp_shard": 4},
    "hsdp_2x2": {"dp_replicate": 2, "dp_shard": 2},
    "tp_x_replicate": {"dp_replicate": 2, "dp_shard": 1, "tp": 2},
    "fsdp_tp_2x2": {"dp_shard": 2, "tp": 2},
    "fsdp_tp_sp_2x2": {"dp_shard": 2, "tp": 2, "sequence_parallel": True},
    "ac_selective_tp_sp": {
        "dp_shard": 2,
        "tp": 2,
        "sequence_parallel": True,
        "activation_checkpointing": "selective",
    },
    "ac_full": {"dp_shard": 4, "activation_checkpointing": "full"},
}
CASES_2: dict[str, dict[str, Any]] = {
    "fsdp": {"dp_shard": 2},
    "tp": {"tp": 2},
    "tp_sp_selective_ac": {
        "tp": 2,
        "sequence_parallel": True,
        "activation_checkpointing": "selective",
    },
}
# CPU offload (sharded params, grads and AdamW on the CPU) must equal the no-offload run.
OFFLOAD_4: dict[str, dict[str, Any]] = {
    "fsdp_cpu_offload": {"dp_shard": 4, "cpu_offload": True},
    "hsdp_cpu_offload": {"dp_replicate": 2, "dp_shard": 2, "cpu_offload": True},
}
OFFLOAD_2: dict[str, dict[str, Any]] = {"fsdp_cpu_offload": {"dp_shard": 2, "cpu_offload": True}}
BF16 = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}


def _strategies_worker(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    device = init_nccl()
    cases = CASES_4 if world_size == 4 else CASES_2
    out: dict[str, Any] = {}
    for name in names:
        reference = reference_run(name, device)
        for case, config in cases.items():
            out[f"{name} {case}"] = compare(name, config, reference, device)
        sizes = cases["fsdp_tp_sp_2x2" if world_size == 4 else "tp"]
        out[f"{name} bf16"] = compare(name, {**sizes, **BF16}, reference, device)
    dist.barrier()
    dist.destroy_process_group()
    return out


def _offload_worker(rank: int, world_size: int) -> dict[str, Any]:
    device = init_nccl()
    reference = reference_run("llama", device)
    cases = OFFLOAD_4 if world_size == 4 else OFFLOAD_2
    out = {f"llama {case}": compare("llama", config, reference, device)
           for case, config in cases.items()}  # fmt: skip
    out["llama no_offload"] = compare("llama", {"dp_shard": world_size}, reference, device)
    for case in cases:  # offload moves the optimizer to the CPU: same trajectory as on GPU
        out[f"llama {case}"]["vs_no_offload"] = max(
            abs(a - b)
            for a, b in zip(out[f"llama {case}"]["losses"], out["llama no_offload"]["losses"])
        )
    dist.barrier()
    dist.destroy_process_group()
    return out


def _compile_worker(rank: int, world_size: int) -> dict[str, Any]:
    device = init_nccl()
    reference = reference_run("llama", device)
    out = {"llama fsdp_compile": compare("llama", {"dp_shard": world_size, "compile": True},
                                         reference, device)}  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return out


def _check(results: dict[str, Any]) -> None:
    for name, r in results.items():
        assert r["missing"] == [], name
        if name.endswith("bf16"):  # bf16 compute: within bf16 resolution of the fp32 reference
            assert r["loss_diff"] < 0.05 * max(r["ref_losses"]) / 6, (name, r)
            assert r["grad_diff"] < 0.1, (name, r)
            continue
        assert r["loss_diff"] < LOSS_ATOL, (name, r)
        assert r["grad_diff"] < GRAD_RTOL, (name, r)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_nccl_strategies_match_single_gpu(name: str) -> None:
    # 4 GPUs: FSDP, HSDP 2x2, TP x replicate, FSDP x TP (+SP), AC full/selective, bf16
    results = run_nccl(_strategies_worker, gpu_world(), timeout=120, names=[name])
    _check(results[0])


@pytest.mark.gpu
@pytest.mark.slow
def test_nccl_fsdp_cpu_offload_trains_like_no_offload() -> None:
    results = run_nccl(_offload_worker, gpu_world(), timeout=120)
    _check(results[0])
    for name, r in results[0].items():
        if "offload" in name and "no_offload" not in name:
            assert r["vs_no_offload"] < LOSS_ATOL, (name, r)


@pytest.mark.gpu
@pytest.mark.slow
def test_nccl_fsdp_with_compiled_blocks_matches_single_gpu() -> None:
    results = run_nccl(_compile_worker, gpu_world(needs=2, prefers=2), timeout=120)
    _check(results[0])
