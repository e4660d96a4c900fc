"""Shared by the parallel tests: a single-process reference run and its parallel replay.

Both runs start from the same seeded tiny Hugging Face model, take three AdamW steps on the same
data and record the losses and the first step's gradients, so a parallel run can be compared with
the reference parameter by parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel.parallel import ParallelConfig, build_mesh, parallelize
from harness.models import VOCAB_SIZE, build_tiny_model

BATCH, SEQ, STEPS, LR = 4, 16, 3, 1e-2


def batches(seed: int = 1) -> list[torch.Tensor]:
    """Returns STEPS batches of token ids [BATCH, SEQ], identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB_SIZE, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """Returns the whole tensor of a DTensor (on the mesh's device), else ``t``."""
    if not isinstance(t, DTensor):
        return t
    mesh = t.device_mesh
    local = t.to_local()
    if local.device.type != mesh.device_type:  # a CPU-offloaded shard of a GPU mesh
        t = DTensor.from_local(
            local.to(mesh.device_type), mesh, t.placements, shape=t.shape, stride=t.stride()
        )
    return t.full_tensor()


def reference_run(name: str, device: str = "cpu") -> tuple[list[float], dict[str, torch.Tensor]]:
    """Returns (losses, first-step grads by name, on CPU) of a single-process fp32 run."""
    model = build_tiny_model(name).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses, grads = [], {}
    for step, ids in enumerate(batches()):
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def parallel_run(
    name: str, config: ParallelConfig, device: str = "cpu"
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Returns (global losses, first-step full grads by name, on CPU) of ``config`` here."""
    mesh = build_mesh(config, device_type=torch.device(device).type)
    model = build_tiny_model(name).to(device).train()
    parallelize(model, config, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    dp = mesh["dp"]
    losses, grads = [], {}
    for step, ids in enumerate(batches()):
        # Each data-parallel rank takes its slice of the global batch; tp ranks share one.
        local = ids.chunk(dp.size())[dp.get_local_rank()].to(device)
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        if step == 0:
            grads = {
                n: _full(p.grad).detach().float().cpu().clone() for n, p in model.named_parameters()
            }
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss, group=dp.get_group())
        losses.append(global_loss.item() / dp.size())
    return losses, grads


def compare(
    name: str,
    config: dict[str, Any],
    reference: tuple[list[float], dict[str, torch.Tensor]],
    device: str = "cpu",
) -> dict[str, Any]:
    """Returns {"loss_diff", "grad_diff", "worst", "missing"} of ``config`` against ``reference``."""
    losses, grads = parallel_run(name, ParallelConfig(**config), device)
    ref_losses, ref_grads = reference
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    worst, grad_diff = "", 0.0
    for n, g in ref_grads.items():
        if n in grads:
            d = (grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-6)
            if d > grad_diff:
                worst, grad_diff = n, d
    missing = sorted(set(ref_grads) - set(grads))
    return {"loss_diff": loss_diff, "grad_diff": grad_diff, "worst": worst, "missing": missing,
            "losses": losses, "ref_losses": ref_losses}  # fmt: skip
