"""Parallelizes the model for training (automodel.parallel: FSDP2, TP, AC...) and says how."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from automodel.recipes.config import ParallelSection
from automodel.recipes.train._runtime import Runtime


@dataclasses.dataclass
class Parallelized:
    """The parallel model and what the loop needs to treat it right.

    ``grad_scale``: FSDP averages gradients over the data-parallel ranks; the loop divides each
    rank's loss by the *global* token count, so it multiplies by the dp size to get a true sum.
    """

    model: Any
    runtime: Runtime
    grad_scale: float
    clip: Callable[[float], torch.Tensor]


def parallelize_for_training(model: Any, cfg: ParallelSection, rt: Runtime) -> Parallelized:
    """Returns the model parallelized per ``cfg`` over all ranks (unchanged on one process)."""

    def plain_clip(max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    if not rt.distributed:
        return Parallelized(model, rt, 1.0, plain_clip)
    from automodel.parallel import ParallelConfig, build_mesh, clip_grad_norm_, parallelize

    config = ParallelConfig(**cfg.model_dump())
    mesh = build_mesh(config, device_type=rt.device.type)
    model = parallelize(model, config, mesh)
    dp = mesh["dp_cp"]
    runtime = dataclasses.replace(
        rt, dp_rank=mesh["dp"].get_local_rank(), dp_size=mesh["dp"].size(), dp_group=dp.get_group()
    )

    def clip(max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(list(model.parameters()), max_norm)

    return Parallelized(model, runtime, float(dp.size()), clip)


def describe(model: Any) -> str:
    """Returns a one-line summary: total and trainable parameter counts (local shards), dtype."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "no parameters"
    return f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), {dtype}"
