"""Llama (2, 3.x) and Mistral (sliding window on every layer) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, gated_activation_name, layer_windows


def llama_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a LlamaConfig or MistralConfig."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderSpec(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=False,
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


class LlamaModel(DecoderModelMixin, LlamaPreTrainedModel):
    """automodel's Llama base model: HF ``LlamaModel`` parameter names, fused kernels."""

    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._build(config, llama_spec(config))
        self.post_init()


class LlamaForCausalLM(CausalLMMixin, LlamaPreTrainedModel, GenerationMixin):
    """automodel's Llama causal LM: a drop-in ``LlamaForCausalLM`` (same names, outputs, API)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.spec = self.model.spec
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class MistralModel(DecoderModelMixin, MistralPreTrainedModel):
    """automodel's Mistral base model (Llama layout, sliding-window attention)."""

    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._build(config, llama_spec(config))
        self.post_init()


class MistralForCausalLM(CausalLMMixin, MistralPreTrainedModel, GenerationMixin):
    """automodel's Mistral causal LM: a drop-in ``MistralForCausalLM``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = MistralModel(config)
        self.spec = self.model.spec
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
