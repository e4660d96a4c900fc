"""Qwen3 (q/k norms) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from transformers import GenerationMixin
from transformers.models.qwen3.modeling_qwen3 import Qwen3PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, llama_layout_spec


def qwen3_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Qwen3Config (per-head RMSNorm on q and k)."""
    bias = bool(getattr(config, "attention_bias", False))
    return llama_layout_spec(config, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)


class Qwen3Model(DecoderModelMixin, Qwen3PreTrainedModel):
    """automodel's Qwen3 base model: HF parameter names, fused kernels."""

    spec_of = staticmethod(qwen3_spec)


class Qwen3ForCausalLM(CausalLMMixin, Qwen3PreTrainedModel, GenerationMixin):
    """automodel's Qwen3 causal LM: a drop-in ``Qwen3ForCausalLM`` (same names, outputs, API)."""

    base_model_class = Qwen3Model
