"""Qwen2 / Qwen2.5 (bias on q/k/v projections) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from transformers import GenerationMixin
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, llama_layout_spec


def qwen2_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Qwen2Config (bias on q/k/v only, optional sliding layers)."""
    return llama_layout_spec(config, qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


class Qwen2Model(DecoderModelMixin, Qwen2PreTrainedModel):
    """automodel's Qwen2 base model: HF parameter names, fused kernels."""

    spec_of = staticmethod(qwen2_spec)


class Qwen2ForCausalLM(CausalLMMixin, Qwen2PreTrainedModel, GenerationMixin):
    """automodel's Qwen2 causal LM: a drop-in ``Qwen2ForCausalLM`` (same names, outputs, API)."""

    base_model_class = Qwen2Model
