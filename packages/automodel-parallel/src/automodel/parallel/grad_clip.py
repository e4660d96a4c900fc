"""``clip_grad_norm_``: gradient-norm clipping across DTensor meshes and pipeline stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


def _local_norm_pow(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Returns sum(|g|^p) of this rank's piece, reduced over the dims the grad is split on."""
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        # Pending sums: the norm of a sum is not a sum of norms, so finish them first.
        grad = grad.redistribute(
            placements=[Replicate() if p.is_partial() else p for p in grad.placements]
        )
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    local = local.detach().float()
    if math.isinf(norm_type):
        value = local.abs().max() if local.numel() else local.new_zeros(())
    else:
        value = local.abs().pow(norm_type).sum()
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        for dim, placement in enumerate(grad.placements):
            # Shard (incl. FSDP's strided shard over TP): each rank holds a different piece.
            if not placement.is_replicate() and mesh.size(dim) > 1:
                dist.all_reduce(value, op=op, group=mesh.get_group(dim))
    return value


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    *,
    norm_type: float = 2.0,
    pp_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """Returns the total gradient norm, after scaling the grads in place to at most ``max_norm``.

    Unlike ``torch.nn.utils.clip_grad_norm_`` it accepts gradients on different meshes in one
    call (FSDP-only params next to FSDP x TP ones, experts over ``ep``, plain tensors): each
    gradient's local piece is reduced over the mesh dims it is sharded on, so every element is
    counted once. With pipeline parallelism pass ``pp_mesh=mesh["pp"]``: the stages' norms are
    combined so all stages clip by the same global factor.

    Args:
        parameters: parameters (or one tensor) whose ``.grad`` is clipped.
        max_norm: the largest allowed total norm.
        norm_type: p of the p-norm; ``float("inf")`` for the max norm.
        pp_mesh: the pipeline dim, when stages hold different parameters.

    Returns:
        The total norm before clipping, a scalar float32 tensor, equal on all ranks.

    Example:
        >>> norm = clip_grad_norm_(model.parameters(), 1.0, pp_mesh=mesh["pp"])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    inf = math.isinf(norm_type)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        piece = _local_norm_pow(g, norm_type).to(device)
        total = torch.maximum(total, piece) if inf else total + piece
    if pp_mesh is not None and pp_mesh.size() > 1:
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=pp_mesh.get_group())
    norm = total if inf else total.pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.device, local.dtype))
    return norm
