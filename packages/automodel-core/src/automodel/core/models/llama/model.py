"""Llama (2, 3.x) and Mistral (sliding window on every layer) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, llama_layout_spec


def llama_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a LlamaConfig or MistralConfig."""
    bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    return llama_layout_spec(config, qkv_bias=bias, o_bias=bias, mlp_bias=mlp_bias, qk_norm=False)


class LlamaModel(DecoderModelMixin, LlamaPreTrainedModel):
    """automodel's Llama base model: HF ``LlamaModel`` parameter names, fused kernels."""

    spec_of = staticmethod(llama_spec)


class LlamaForCausalLM(CausalLMMixin, LlamaPreTrainedModel, GenerationMixin):
    """automodel's Llama causal LM: a drop-in ``LlamaForCausalLM`` (same names, outputs, API)."""

    base_model_class = LlamaModel


class MistralModel(DecoderModelMixin, MistralPreTrainedModel):
    """automodel's Mistral base model (Llama layout, sliding-window attention)."""

    spec_of = staticmethod(llama_spec)


class MistralForCausalLM(CausalLMMixin, MistralPreTrainedModel, GenerationMixin):
    """automodel's Mistral causal LM: a drop-in ``MistralForCausalLM``."""

    base_model_class = MistralModel
