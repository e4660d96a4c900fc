"""Learning-rate schedules as multipliers of the base LR: warmup, then cosine/linear/constant/WSD."""

from __future__ import annotations

import math

import torch

from automodel.recipes.config import LRSchedulerSection


def lr_multiplier(step: int, max_steps: int, cfg: LRSchedulerSection) -> float:
    """Returns the LR multiplier (0..1] for optimizer step ``step`` (0-based) of ``max_steps``.

    Warmup rises linearly from 1/(warmup+1) to 1. Then: ``cosine`` and ``linear`` decay to
    ``min_lr_ratio`` at the last step; ``constant`` stays at 1; ``wsd`` (warmup-stable-decay) stays
    at 1 until the last ``decay_fraction`` of steps, then decays linearly to ``min_lr_ratio``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.kind == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - 1 - decay_start)
        return 1.0 - (1.0 - lo) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.kind == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, cfg: LRSchedulerSection
) -> torch.optim.lr_scheduler.LambdaLR:
    """Returns a LambdaLR applying :func:`lr_multiplier`; call ``step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, max_steps, cfg))
