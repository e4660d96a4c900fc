"""The causal-LM loss of the recipes: summed over label tokens, computed by the model itself."""

from __future__ import annotations

from typing import Any

import torch

from automodel.recipes._components import build_loss, lm_inputs
from automodel.recipes._moe import RouterLosses
from automodel.recipes.config import RecipeConfig
from automodel.recipes.data import IGNORE_INDEX


def _local(loss: torch.Tensor) -> torch.Tensor:
    """Returns a plain tensor: under tensor parallelism the model's loss can be a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    return loss.full_tensor() if isinstance(loss, DTensor) else loss


class CausalLMLoss:
    """(model, batch) -> summed token cross-entropy, plus the router terms of MoE models.

    By default the model computes the loss itself (``labels`` + ``num_items_in_batch=1`` = a sum):
    automodel's families then run the fused linear cross-entropy and never hold the
    [tokens, vocab] logits, nor return them. A ``training.loss`` `_target_` gets the logits.
    """

    def __init__(self, cfg: RecipeConfig, model: Any) -> None:
        self.router = RouterLosses.for_model(model, cfg.moe)
        self.extra = self.router.forward_kwargs() if self.router is not None else {}
        self.custom = build_loss(cfg) if cfg.training.loss is not None else None
        if self.custom is None and hasattr(model, "logits_with_loss"):
            model.logits_with_loss = False
        self.metrics = self.router.metrics if self.router is not None else None

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.custom is not None:
            out = model(**lm_inputs(batch), **self.extra)
            total = self.custom(out.logits, labels)
        else:
            # labels are already shifted: shift_labels says so (labels= makes HF compute a loss).
            out = model(
                **lm_inputs(batch), labels=labels, shift_labels=labels, num_items_in_batch=1,
                **self.extra,
            )  # fmt: skip
            total = _local(out.loss)
        if self.router is not None:
            total = total + self.router.term(out, batch, (labels != IGNORE_INDEX).sum())
        return total  # type: ignore[no-any-return]
