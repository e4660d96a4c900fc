"""Load-balance statistics of MoE layers for the training loop: tokens per expert and imbalance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoELoadStats:
    """Tokens routed to each expert in the last forward, per MoE layer.

    ``tokens_per_expert`` is ``[layers, E]`` (on the model's device, no host sync until read);
    ``imbalance`` is ``max / mean`` tokens per expert per layer (1.0 is perfectly balanced).
    """

    layers: list[str]
    tokens_per_expert: torch.Tensor
    imbalance: torch.Tensor

    def to_metrics(self) -> dict[str, float]:
        """Returns flat scalar metrics for a logger: mean and max imbalance over layers (host sync)."""
        return {
            "moe/imbalance_mean": float(self.imbalance.mean()),
            "moe/imbalance_max": float(self.imbalance.max()),
        }


def moe_load_stats(model: nn.Module) -> MoELoadStats | None:
    """Returns the load statistics recorded by the grouped experts in the last forward, or None.

    Only expert modules patched by :func:`automodel.core.moe.patch_moe_experts` record them. Under
    expert parallelism each rank sees its local experts.

    Example:
        >>> model(input_ids)
        >>> stats = moe_load_stats(model)
        >>> stats.to_metrics()
        {'moe/imbalance_mean': 1.31, 'moe/imbalance_max': 1.87}
    """
    names, counts = [], []
    for name, module in model.named_modules():
        recorded = getattr(module, "_automodel_tokens_per_expert", None)
        if recorded is not None:
            names.append(name)
            counts.append(recorded)
    if not counts:
        return None
    tokens = torch.stack(counts).float()
    imbalance = tokens.max(dim=1).values / tokens.mean(dim=1).clamp(min=1e-9)
    return MoELoadStats(layers=names, tokens_per_expert=tokens, imbalance=imbalance)
