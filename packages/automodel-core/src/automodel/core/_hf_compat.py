"""The few names that differ between the transformers versions automodel supports (5.17 - 5.x)."""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the KV-cache field/kwarg ``past_key_values`` to ``cache``.
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


def pop_cache(kwargs: dict[str, Any], cache: Any = None, past_key_values: Any = None) -> Any:
    """Returns the KV cache passed under either name (``cache`` or ``past_key_values``)."""
    if cache is None:
        cache = past_key_values
    if cache is None:
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
    return cache
