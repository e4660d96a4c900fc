"""FSDP2 (and HSDP) over the data-parallel dims of the mesh: per block, then the root."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from automodel.parallel.config import ParallelConfig


def _expert_modules(block: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Modules whose own params are DTensors over the ep mesh (sharded by expert parallelism)."""
    found = []
    for module in block.modules():
        params = list(module.parameters(recurse=False))
        if params and all(isinstance(p, DTensor) and p.device_mesh == ep_mesh for p in params):
            found.append(module)
    return found


def apply_fsdp(
    model: nn.Module, blocks: list[nn.Module], config: ParallelConfig, mesh: DeviceMesh
) -> nn.Module:
    """Returns ``model`` wrapped in place with FSDP2: each block, then the root.

    Parameters are sharded over ``dp_shard x cp``; with ``dp_replicate > 1`` the groups are also
    replicated over ``dp_replicate`` (HSDP). Experts sharded by expert parallelism are FSDP-
    sharded over ``dp_shard_mod_ep`` only, and their gradients are divided by the full data-
    parallel size like every other gradient. The last block and the root keep their parameters
    gathered after forward, since backward needs them first.
    """
    if config.dp_replicate > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard_cp"]
    else:
        dp_mesh = mesh["dp_shard_cp"]
    mp_policy = MixedPrecisionPolicy(
        param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype or config.param_dtype
    )
    offload: OffloadPolicy = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()

    def shard(module: nn.Module, on: DeviceMesh, reshard: bool) -> FSDPModule:
        return fully_shard(
            module,
            mesh=on,
            reshard_after_forward=reshard,
            mp_policy=mp_policy,
            offload_policy=offload,
        )

    if config.ep > 1:
        ep_mesh = mesh["ep"]
        expert_dp = (
            mesh["dp_replicate", "dp_shard_mod_ep"]
            if config.dp_replicate > 1
            else mesh["dp_shard_mod_ep"]
        )
        for block in blocks:
            for experts in _expert_modules(block, ep_mesh):
                sharded = shard(experts, expert_dp, config.reshard_after_forward)
                # Experts already summed their tokens over ep (all-to-all); average over all dp.
                sharded.set_gradient_divide_factor(float(mesh["dp_cp"].size()))
                if mesh.device_type == "cpu" and mesh["dp_shard_mod_ep"].size() > 1:
                    # A divide factor other than the group size makes FSDP reduce with NCCL's
                    # PREMUL_SUM, which gloo lacks: reduce with SUM and divide afterwards. Not
                    # with one rank to shard over: FSDP then copies the gradient divided by the
                    # factor and, forced to SUM, divides it a second time (torch 2.11-2.15).
                    sharded.set_force_sum_reduction_for_comms(True)
    fsdp_blocks = [
        shard(block, dp_mesh, config.reshard_after_forward and i < len(blocks) - 1)
        for i, block in enumerate(blocks)
    ]
    shard(model, dp_mesh, False)
    if config.prefetch > 0:
        for i, fsdp_block in enumerate(fsdp_blocks):
            fsdp_block.set_modules_to_forward_prefetch(fsdp_blocks[i + 1 : i + 1 + config.prefetch])
            fsdp_block.set_modules_to_backward_prefetch(
                list(reversed(fsdp_blocks[max(0, i - config.prefetch) : i]))
            )
    return model
