"""Which optimized class serves which ``config.model_type`` and head.

Selection is by ``config.model_type`` (what ``config.json`` says), for two heads: ``"causal_lm"``
and ``"base"``. Anything not listed here goes through the transformers fallback with kernel
patches. Mixture-of-experts families (Mixtral, Qwen3-MoE: issue 8) register here the same way once
their folders exist; until then they load through the fallback.
"""

from __future__ import annotations

import importlib
from typing import Any

# model_type -> head -> "module:Class" (imported lazily: only the family in use is imported)
_OPTIMIZED: dict[str, dict[str, str]] = {
    "llama": {
        "causal_lm": "llama.model:LlamaForCausalLM",
        "base": "llama.model:LlamaModel",
    },
    "mistral": {
        "causal_lm": "llama.model:MistralForCausalLM",
        "base": "llama.model:MistralModel",
    },
    "qwen2": {"causal_lm": "qwen2.model:Qwen2ForCausalLM", "base": "qwen2.model:Qwen2Model"},
    "qwen3": {"causal_lm": "qwen3.model:Qwen3ForCausalLM", "base": "qwen3.model:Qwen3Model"},
    "gemma2": {"causal_lm": "gemma2.model:Gemma2ForCausalLM", "base": "gemma2.model:Gemma2Model"},
    "gemma3_text": {
        "causal_lm": "gemma3.model:Gemma3ForCausalLM",
        "base": "gemma3.model:Gemma3Model",
    },
}


def optimized_model_types() -> list[str]:
    """Returns the ``model_type`` values that have an optimized implementation."""
    return sorted(_OPTIMIZED)


def optimized_class(config: Any, head: str) -> type | None:
    """Returns automodel's class for ``config`` and ``head``, or None when the fallback applies.

    A config whose features the optimized blocks do not cover (an activation without a fused
    gated kernel, remote code) also returns None, so it is served by transformers instead.
    """
    target = _OPTIMIZED.get(getattr(config, "model_type", ""), {}).get(head)
    if target is None or getattr(config, "auto_map", None):
        return None
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish", "gelu_pytorch_tanh", "gelu"):
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(f"automodel.core.models.{module}"), name)  # type: ignore[no-any-return]
