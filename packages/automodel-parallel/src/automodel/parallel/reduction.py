"""Sums and means over the data-parallel ranks: losses, token counts, metrics."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def reduce_data_parallel(tensor: torch.Tensor, mesh: DeviceMesh, op: str = "sum") -> torch.Tensor:
    """Returns a copy of ``tensor`` reduced over the data-parallel dims (``dp_cp``) of ``mesh``.

    Context-parallel ranks hold different tokens of the same sequences, so they count as data
    parallel here; tensor-parallel and pipeline ranks do not (they hold the same tokens).

    Args:
        tensor: a per-rank value (a loss sum, a token count...).
        mesh: a mesh from ``build_mesh``.
        op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.

    Example:
        >>> tokens = reduce_data_parallel(torch.tensor(local_tokens), mesh)
    """
    if op not in (*_OPS, "mean"):
        raise ValueError(f"op={op!r}: expected one of {[*_OPS, 'mean']}")
    out = tensor.detach().clone()
    group_mesh = mesh["dp_cp"]
    if group_mesh.size() > 1:
        dist.all_reduce(out, op=_OPS.get(op, dist.ReduceOp.SUM), group=group_mesh.get_group())
    if op == "mean":
        out = out / group_mesh.size()
    return out


def global_mean_loss(
    loss_sum: torch.Tensor, num_tokens: torch.Tensor | int, mesh: DeviceMesh
) -> torch.Tensor:
    """Returns the mean loss per token over all data-parallel ranks (sum of sums / sum of counts).

    Averaging per-rank means is wrong when ranks hold different numbers of target tokens
    (padding, packing, masked prompts); this divides the global sum by the global count.

    Args:
        loss_sum: this rank's summed (not averaged) token losses.
        num_tokens: this rank's number of target tokens.
        mesh: a mesh from ``build_mesh``.

    Example:
        >>> loss = global_mean_loss(ce_sum, (labels != -100).sum(), mesh)
    """
    pair = torch.stack(
        [loss_sum.detach().float(), torch.as_tensor(num_tokens, device=loss_sum.device).float()]
    )
    total = reduce_data_parallel(pair, mesh)
    return total[0] / total[1].clamp(min=1)
