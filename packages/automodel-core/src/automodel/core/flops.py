"""Model FLOPs per token for MFU, by the convention of ../shared/BENCHMARKS.md.

    flops/token = 6 * N_matmul + 12 * layers * attn_width * seq_len

``N_matmul`` counts the parameters of every matrix multiply a token goes through: attention
projections, the MLP (for mixture-of-experts only the ``top_k`` active experts plus the router),
and the LM head; the input embedding is a lookup and is excluded (with tied embeddings the shared
matrix is counted once, as the LM head). The 6 is 2 FLOPs per multiply-add times 3 (forward, and
backward's two products). The second term is attention's QK^T and PV products: 2 matmuls x 2
FLOPs x 3 passes = 12 per layer, per attention-width element, per key; no causal discount, no
recompute. ``attn_width`` is ``num_attention_heads * head_dim`` (the hidden size for Llama).
"""

from __future__ import annotations

from typing import Any

from automodel.core.moe.config import num_routed_experts


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def matmul_params_per_token(config: Any) -> int:
    """Returns the number of matmul parameters one token uses (active experts only for MoE).

    Example:
        >>> from transformers import LlamaConfig
        >>> matmul_params_per_token(LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        80128
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = num_routed_experts(config)
    if experts:
        top_k = _get(config, "num_experts_per_tok", "moe_top_k")
        ffn = _get(config, "moe_intermediate_size", "intermediate_size")
        shared = _get(config, "n_shared_experts", default=0) or 0
        shared_ffn = _get(config, "shared_expert_intermediate_size", default=0) or shared * ffn
        mlp = 3 * hidden * ffn * top_k + hidden * experts + 3 * hidden * shared_ffn
    else:
        mlp = 3 * hidden * config.intermediate_size
    lm_head = config.vocab_size * hidden
    return int(config.num_hidden_layers * (attention + mlp) + lm_head)


def flops_per_token(config: Any, seq_len: int) -> float:
    """Returns training FLOPs per token (forward + backward) at ``seq_len``, for MFU.

    Args:
        config: a transformers config (a VLM's text config is used for VLMs).
        seq_len: tokens per sequence.

    Returns:
        ``6 * matmul_params_per_token(config) + 12 * layers * heads * head_dim * seq_len``.

    Raises:
        ValueError: ``seq_len`` is not positive.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        ...     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
        >>> round(flops_per_token(cfg, 2048) / 1e9, 2)
        8.22
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = _get(text, "head_dim", default=text.hidden_size // heads)
    attention = 12 * text.num_hidden_layers * heads * head_dim * seq_len
    return float(6 * matmul_params_per_token(text) + attention)
