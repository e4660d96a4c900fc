"""Data parallelism for the loop: FSDP2 through automodel.parallel when present, else replicas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from automodel.recipes.train._runtime import Runtime


def replicate(model: torch.nn.Module, rt: Runtime) -> Callable[[], None] | None:
    """Makes every rank start from rank 0's weights; returns the gradient sum-all-reduce to call.

    Returns None on one process. Gradients are summed (not averaged) because the loop already
    divides each rank's loss by the global token count.
    """
    if not rt.distributed:
        return None
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
        for b in model.buffers():
            dist.broadcast(b.data, src=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def sync_grads() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    return sync_grads


def describe(model: Any) -> str:
    """Returns a one-line summary: total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)"
