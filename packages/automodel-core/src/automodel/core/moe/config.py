"""Reading a transformers config's mixture-of-experts fields, whatever each family calls them."""

from __future__ import annotations

from typing import Any

_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def num_routed_experts(config: Any) -> int:
    """Returns the number of routed experts per MoE layer, or 0 for a dense model.

    Mixtral calls it ``num_local_experts``, Qwen-MoE ``num_experts``, DeepSeek ``n_routed_experts``.

    Example:
        >>> from transformers import MixtralConfig, LlamaConfig
        >>> num_routed_experts(MixtralConfig(num_local_experts=8)), num_routed_experts(LlamaConfig())
        (8, 0)
    """
    for name in _EXPERT_COUNT_FIELDS:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 0
