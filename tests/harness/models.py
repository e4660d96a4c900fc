"""Tiny random-weight Hugging Face checkpoints for every architecture automodel supports.

Shapes are small enough for CPU tests yet keep the features that break implementations: GQA
(kv heads < heads), ``head_dim != hidden_size / num_heads``, tied and untied embeddings, qkv bias,
q/k norms, sliding windows, softcapping, MoE routing, an encoder and a vision-language model.

``save_tiny_model(name, path)`` writes ``config.json`` + safetensors (sharded when asked) + a
locally trained tokenizer with a chat template, exactly what ``from_pretrained`` expects.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.tokenizer import save_tokenizer

VOCAB_SIZE = 384  # the harness tokenizer's size; every text config uses it

_DECODER_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # != 64 / 4: catches code that derives head_dim from hidden_size
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=4,
    initializer_range=0.1,  # big enough that logits differ visibly between implementations
)


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **_DECODER_COMMON, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]
    )


def _qwen2() -> Any:
    from transformers import Qwen2Config

    common = {k: v for k, v in _DECODER_COMMON.items() if k != "head_dim"}  # Qwen2 derives head_dim
    return Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        **_DECODER_COMMON, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]
    )


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        **_DECODER_COMMON,
        sliding_window=16,
        tie_word_embeddings=False,
        architectures=["MistralForCausalLM"],
    )


def _gemma2() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **_DECODER_COMMON,
        sliding_window=16,
        query_pre_attn_scalar=32,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        architectures=["Gemma2ForCausalLM"],
    )


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{**_DECODER_COMMON, "num_hidden_layers": 3},
        sliding_window=16,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        architectures=["Gemma3ForCausalLM"],
    )


def _phi3() -> Any:
    from transformers import Phi3Config

    common = {k: v for k, v in _DECODER_COMMON.items() if k != "head_dim"}
    return Phi3Config(**common, architectures=["Phi3ForCausalLM"])


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **_DECODER_COMMON,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        tie_word_embeddings=False,
        architectures=["MixtralForCausalLM"],
    )


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_DECODER_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
    )


def _bert() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        num_labels=3,
        pad_token_id=0,
        architectures=["BertForSequenceClassification"],
    )


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(**_DECODER_COMMON, tie_word_embeddings=False)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=5,  # "<image>" in the harness tokenizer
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops CLS: 16 features per image,
        image_seq_length=16,  # (32 / 8) ** 2 patches
        architectures=["LlavaForConditionalGeneration"],
    )


# name -> (config factory, Auto class name in transformers)
TINY_MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "llama": (_llama, "AutoModelForCausalLM"),
    "qwen2": (_qwen2, "AutoModelForCausalLM"),
    "qwen3": (_qwen3, "AutoModelForCausalLM"),
    "mistral": (_mistral, "AutoModelForCausalLM"),
    "gemma2": (_gemma2, "AutoModelForCausalLM"),
    "gemma3": (_gemma3, "AutoModelForCausalLM"),
    "phi3": (_phi3, "AutoModelForCausalLM"),
    "mixtral": (_mixtral, "AutoModelForCausalLM"),
    "qwen3_moe": (_qwen3_moe, "AutoModelForCausalLM"),
    "bert": (_bert, "AutoModelForSequenceClassification"),
    "llava": (_llava, "AutoModelForImageTextToText"),
}

DECODER_MODELS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "mixtral", "qwen3_moe"]
DENSE_DECODER_MODELS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]
MOE_MODELS = ["mixtral", "qwen3_moe"]


def tiny_config(name: str) -> Any:
    """Returns a fresh ``transformers.PretrainedConfig`` for the tiny model ``name``."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_MODELS)}")
    return TINY_MODELS[name][0]()


def build_tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """Returns the transformers model for ``name`` with seeded random weights, in eval mode."""
    import transformers

    config = tiny_config(name)
    auto_cls = getattr(transformers, TINY_MODELS[name][1])
    torch.manual_seed(seed)
    model = auto_cls.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny_model(
    name: str,
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Writes a tiny ``name`` checkpoint (config, safetensors, tokenizer) to ``path``; returns it.

    ``max_shard_size`` (e.g. ``"20KB"``) makes ``save_pretrained`` write several shards and a
    ``model.safetensors.index.json``.
    """
    path = Path(path)
    model = build_tiny_model(name, seed=seed, dtype=dtype)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        save_tokenizer(path, vocab_size=VOCAB_SIZE)
    return path


# ------------------------------------------------------------------ appended: more MoE layouts
def _qwen2_moe() -> Any:
    """Qwen2-MoE: routed experts plus a sigmoid-gated shared expert in every layer."""
    from transformers import Qwen2MoeConfig

    common = {k: v for k, v in _DECODER_COMMON.items() if k != "head_dim"}
    return Qwen2MoeConfig(
        **common,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        architectures=["Qwen2MoeForCausalLM"],
    )


def _deepseek_v3() -> Any:
    """DeepSeek-V3 layout: MLA attention, sigmoid routing with a bias correction, grouped top-k
    (4 groups, 2 kept), routed scaling, one shared expert; layer 0 dense, layer 1 MoE."""
    from transformers import DeepseekV3Config

    common = {k: v for k, v in _DECODER_COMMON.items() if k != "head_dim"}
    common["num_key_value_heads"] = common["num_attention_heads"]  # MLA: one latent for all heads
    return DeepseekV3Config(
        **common,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
        tie_word_embeddings=False,
        architectures=["DeepseekV3ForCausalLM"],
    )


TINY_MODELS["qwen2_moe"] = (_qwen2_moe, "AutoModelForCausalLM")
TINY_MODELS["deepseek_v3"] = (_deepseek_v3, "AutoModelForCausalLM")
# MoE layouts beyond MOE_MODELS: shared experts, sigmoid + bias + grouped top-k routing
MORE_MOE_MODELS = ["qwen2_moe", "deepseek_v3"]
