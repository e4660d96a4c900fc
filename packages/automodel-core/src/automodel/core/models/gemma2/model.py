"""Gemma 2: (1 + w) norms, sandwich norms, local/global layers, logit softcapping."""

from __future__ import annotations

from typing import Any

from transformers import GenerationMixin
from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, gated_activation_name, layer_windows


def gemma2_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Gemma2Config: (1 + w) norms, sandwich norms, softcaps."""
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderSpec(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm=False,
        norm_offset=1.0,
        sandwich_norms=True,
        activation=gated_activation_name(config.hidden_activation),
        embed_scale=config.hidden_size**0.5,
        scale_inputs_embeds=True,
        attn_scale=config.query_pre_attn_scalar**-0.5,
        attn_softcap=config.attn_logit_softcapping,
        final_softcap=config.final_logit_softcapping,
        layer_windows=layer_windows(config),
        layer_rope=("default",) * config.num_hidden_layers,
        rope_variants={"default": None},
    )


class Gemma2Model(DecoderModelMixin, Gemma2PreTrainedModel):
    """automodel's Gemma2 base model: HF parameter names, fused kernels."""

    spec_of = staticmethod(gemma2_spec)


class Gemma2ForCausalLM(CausalLMMixin, Gemma2PreTrainedModel, GenerationMixin):
    """automodel's Gemma2 causal LM: a drop-in ``Gemma2ForCausalLM`` (same names, outputs, API)."""

    base_model_class = Gemma2Model
