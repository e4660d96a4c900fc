"""Builds the optimizer and the token-level loss from config (defaults or `_target_`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from automodel.recipes.config import RecipeConfig
from automodel.recipes.data import IGNORE_INDEX


def build_optimizer(
    cfg: RecipeConfig, model: torch.nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    """Returns the optimizer over trainable parameters; AdamW runs fused on CUDA unless told not to."""
    params = [p for p in model.parameters() if p.requires_grad]
    runtime: dict[str, Any] = {}
    if cfg.optimizer.target == "torch.optim.AdamW" and "fused" not in cfg.optimizer.kwargs:
        runtime["fused"] = device.type == "cuda"
    return cfg.optimizer.build(params, **runtime)  # type: ignore[no-any-return]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Returns the summed cross-entropy of pre-shifted ``labels`` (-100 ignored), in fp32."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def build_loss(cfg: RecipeConfig) -> Any:
    """Returns the loss function (logits, labels) -> summed loss: default CE or `_target_`."""
    if cfg.training.loss is None:
        return token_loss_sum
    custom = cfg.training.loss

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return custom.build(logits, labels)  # type: ignore[no-any-return]

    return loss


def lm_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Returns the forward kwargs of a language-model batch (attention mask or packed positions).

    ``use_cache=False`` matters beyond memory: transformers only derives the per-document mask
    from restarting ``position_ids`` when no KV cache is in play.
    """
    keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "image_sizes",
        "image_grid_thw",
    )
    return {**{k: v for k, v in batch.items() if k in keys}, "use_cache": False}
