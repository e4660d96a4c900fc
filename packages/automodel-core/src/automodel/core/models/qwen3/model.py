"""Qwen3 (q/k norms) on the shared decoder blocks."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GenerationMixin
from transformers.models.qwen3.modeling_qwen3 import Qwen3PreTrainedModel

from automodel.core.models.common.decoder import CausalLMMixin, DecoderModelMixin
from automodel.core.models.common.spec import DecoderSpec, gated_activation_name, layer_windows


def qwen3_spec(config: Any) -> DecoderSpec:
    """Returns the DecoderSpec of a Qwen3Config (per-head RMSNorm on q and k)."""
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderSpec(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm=True,
        norm_offset=0.0,
        sandwich_norms=False,
        activation=gated_activation_name(config.hidden_act),
        embed_scale=None,
        scale_inputs_embeds=False,
        attn_scale=config.head_dim**-0.5,
        attn_softcap=None,
        final_softcap=None,
        layer_windows=layer_windows(config),
        layer_rope=("default",) * config.num_hidden_layers,
        rope_variants={"default": None},
    )


class Qwen3Model(DecoderModelMixin, Qwen3PreTrainedModel):
    """automodel's Qwen3 base model: HF parameter names, fused kernels."""

    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._build(config, qwen3_spec(config))
        self.post_init()


class Qwen3ForCausalLM(CausalLMMixin, Qwen3PreTrainedModel, GenerationMixin):
    """automodel's Qwen3 causal LM: a drop-in ``Qwen3ForCausalLM`` (same names, outputs, API)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = Qwen3Model(config)
        self.spec = self.model.spec
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
