"""Gemma 3 text: Gemma 2 layout plus q/k norms and a separate rope for local layers."""

from __future__ import annotations

from typing import Any

from transformers import GenerationMixin
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, gated_activation_name, layer_windows


def gemma3_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Gemma3TextConfig: Gemma 2 plus q/k norms, rope per layer type."""
    bias = bool(getattr(config, "attention_bias", False))
    types = tuple(config.layer_types[: config.num_hidden_layers])
    return DecoderSpec(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        activation=gated_activation_name(config.hidden_activation),
        embed_scale=config.hidden_size**0.5,
        scale_inputs_embeds=False,
        attn_scale=config.query_pre_attn_scalar**-0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        layer_windows=layer_windows(config),
        layer_rope=types,
        rope_variants={t: t for t in dict.fromkeys(types)},
    )


class Gemma3Model(DecoderModelMixin, Gemma3PreTrainedModel):
    """automodel's Gemma3 base model: HF parameter names, fused kernels."""

    config_class = Gemma3TextConfig
    spec_of = staticmethod(gemma3_spec)


class Gemma3ForCausalLM(CausalLMMixin, Gemma3PreTrainedModel, GenerationMixin):
    """automodel's Gemma3 causal LM: a drop-in ``Gemma3ForCausalLM`` (same names, outputs, API)."""

    config_class = Gemma3TextConfig
    base_model_class = Gemma3Model
