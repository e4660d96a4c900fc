"""DecoderSpec: everything that distinguishes one dense decoder family from another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """The architecture knobs of a dense decoder-only transformer, read from an HF config.

    A new dense family is mostly a function ``config -> DecoderSpec``; the blocks in this folder
    read nothing else from the family.
    """

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k before rope (Qwen3, Gemma 3)
    norm_offset: float  # 0.0: Llama-style weight; 1.0: Gemma-style (1 + weight)
    sandwich_norms: bool  # Gemma 2/3: norms after attention and around the MLP
    activation: str  # "silu" (SwiGLU) | "gelu_tanh" | "gelu" (GeGLU)
    embed_scale: float | None  # Gemma: embeddings times sqrt(hidden_size)
    scale_inputs_embeds: bool  # Gemma 2 scales user-given inputs_embeds too, Gemma 3 does not
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    layer_windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    layer_rope: tuple[str, ...]  # rope variant per layer, a key of rope_variants
    rope_variants: dict[str, str | None]  # variant -> layer type in config.rope_parameters


def layer_windows(config: object) -> tuple[int | None, ...]:
    """Returns the sliding window of each layer from ``config.layer_types``/``sliding_window``."""
    n = config.num_hidden_layers  # type: ignore[attr-defined]
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: one window for every layer when set
        return tuple(window for _ in range(n))
    return tuple(window if t == "sliding_attention" else None for t in types[:n])


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gated_activation_name(hidden_act: str) -> str:
    """Returns the fused gated activation for an HF ``hidden_act`` name.

    Raises:
        ValueError: the activation has no fused gated kernel (the fallback path handles it).
    """
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"hidden_act={hidden_act!r} has no optimized gated MLP; expected one of "
            f"{sorted(_ACTIVATIONS)} (load with force_hf=True to use the transformers class)"
        )
    return _ACTIVATIONS[hidden_act]


def llama_layout_spec(
    config: Any, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool
) -> DecoderSpec:
    """Returns the DecoderSpec of a Llama-layout family (Llama, Mistral, Qwen2, Qwen3).

    These families differ only in their biases and q/k norms: pre-norm blocks with a plain
    RMSNorm weight, a gated MLP, scaled dot-product attention at ``head_dim ** -0.5``, one rope,
    no softcaps, and sliding windows only where the config sets them.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        norm_offset=0.0,
        sandwich_norms=False,
        activation=gated_activation_name(config.hidden_act),
        embed_scale=None,
        scale_inputs_embeds=False,
        attn_scale=head_dim**-0.5,
        attn_softcap=None,
        final_softcap=None,
        layer_windows=layer_windows(config),
        layer_rope=("default",) * config.num_hidden_layers,
        rope_variants={"default": None},
    )
