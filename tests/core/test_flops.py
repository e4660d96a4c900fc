"""flops_per_token follows BENCHMARKS.md: the published Llama figures and a hand count."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MixtralConfig

from automodel.core import flops_per_token, matmul_params_per_token


def test_llama_shapes_match_benchmarks_md() -> None:
    llama_1b = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    assert matmul_params_per_token(llama_1b) == 1_235_746_816  # "about 1.236 B parameters"
    assert flops_per_token(llama_1b, 2048) / 1e9 == pytest.approx(8.22, abs=0.005)
    llama_8b = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    assert flops_per_token(llama_8b, 8192) / 1e9 == pytest.approx(57.9, abs=0.05)


def test_moe_counts_active_experts_and_router() -> None:
    cfg = MixtralConfig(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    attention = 8 * 4 * (2 * 2 + 2 * 1)
    mlp = 2 * 3 * 8 * 16 + 8 * 4  # two active experts + the router
    assert matmul_params_per_token(cfg) == attention + mlp + 100 * 8
    assert flops_per_token(cfg, 10) == 6 * (attention + mlp + 800) + 12 * 1 * 8 * 10
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)
