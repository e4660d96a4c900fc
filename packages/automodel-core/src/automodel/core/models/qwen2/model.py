"""Qwen2 / Qwen2.5 (bias on q/k/v projections) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GenerationMixin
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, gated_activation_name, layer_windows


def qwen2_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Qwen2Config (bias on q/k/v only, optional sliding layers)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
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


class Qwen2Model(DecoderModelMixin, Qwen2PreTrainedModel):
    """automodel's Qwen2 base model: HF parameter names, fused kernels."""

    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._build(config, qwen2_spec(config))
        self.post_init()


class Qwen2ForCausalLM(CausalLMMixin, Qwen2PreTrainedModel, GenerationMixin):
    """automodel's Qwen2 causal LM: a drop-in ``Qwen2ForCausalLM`` (same names, outputs, API)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.spec = self.model.spec
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
