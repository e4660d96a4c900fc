"""The shared dense decoder: layer, base model and causal-LM head, configured by a DecoderSpec.

Family folders subclass the HF family's ``PreTrainedModel`` together with these mixins, so the
result *is* a ``transformers.PreTrainedModel`` (``generate``, ``save_pretrained``, Trainer) with
HF parameter names: checkpoints load and save with no conversion.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from automodel.core import _ops
from automodel.core._hf_compat import CACHE_FIELD, pop_cache
from automodel.core.models.common.attention import Attention
from automodel.core.models.common.mlp import GatedMLP
from automodel.core.models.common.norm import RMSNorm
from automodel.core.models.common.rope import RotaryTables
from automodel.core.models.common.spec import DecoderSpec


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); Gemma adds post-norms (sandwich)."""

    def __init__(self, config: Any, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        eps, offset = config.rms_norm_eps, spec.norm_offset
        self.self_attn = Attention(config, spec, layer_idx)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            activation=spec.activation,
            bias=spec.mlp_bias,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset=offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset=offset)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=offset)
        self.rope_variant = spec.layer_rope[layer_idx]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Any = None,
        document_ids: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            cache=cache,
            document_ids=document_ids,
            key_padding_mask=key_padding_mask,
        )
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        norm = self.post_attention_layernorm
        normed, x = _ops.add_rms_norm(attn, x, norm.weight, norm.eps, offset=norm.offset)
        return x + self.mlp(normed)


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Returns [B, S] document indices: a new document starts where positions do not step by 1.

    Example: positions [[0, 1, 0, 1, 2]] -> [[0, 0, 1, 1, 1]]. No host sync (pure tensor ops).
    """
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


class _InitMixin:
    """Initializes what transformers' ``_init_weights`` does not know: the rope tables.

    transformers builds models on the meta device and then fills non-persistent buffers through
    ``_init_weights``; automodel's ``RotaryTables`` recompute theirs here.
    """

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # type: ignore[misc]
        if isinstance(module, RotaryTables):
            module.reset_parameters()


class DecoderModelMixin(_InitMixin):
    """The base model (``model.*`` in HF checkpoints): embeddings, layers, final norm, rope.

    Mixed in before a family's ``PreTrainedModel``; the family class names only its spec
    function (``spec_of = staticmethod(llama_spec)``) and the rest is built here.
    """

    # transformers' class attributes (typed Any: the family's PreTrainedModel declares them too)
    _no_split_modules: Any = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: Any = {}  # noqa: RUF012

    config: Any
    spec: DecoderSpec
    gradient_checkpointing: bool
    training: bool
    layers: nn.ModuleList

    @staticmethod
    def spec_of(config: Any) -> DecoderSpec:
        """Returns the family's DecoderSpec for ``config`` (each family sets its function)."""
        raise NotImplementedError("a DecoderModelMixin subclass sets spec_of")

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]  # the family's PreTrainedModel
        self._build(config, self.spec_of(config))
        self.post_init()  # type: ignore[attr-defined]

    def _build(self, config: Any, spec: DecoderSpec) -> None:
        self.spec = spec
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            DecoderLayer(config, spec, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=spec.norm_offset)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.rotary = RotaryTables(config, head_dim, spec.rope_variants)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = pop_cache(kwargs, cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "pass exactly one of input_ids or inputs_embeds (got "
                f"{'both' if input_ids is not None else 'neither'})"
            )
        if output_attentions:
            warnings.warn(
                "output_attentions=True is not supported by automodel's fused attention; "
                "attentions are returned as None (load with force_hf=True to get them)",
                stacklevel=2,
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            scale_embeds = self.spec.embed_scale is not None
        else:
            scale_embeds = self.spec.embed_scale is not None and self.spec.scale_inputs_embeds
        h = inputs_embeds
        if scale_embeds:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        document_ids = None
        if position_ids is None:
            position_ids = torch.arange(past, past + h.shape[1], device=h.device).unsqueeze(0)
        elif attention_mask is None and past == 0:
            # Packed sequences: positions restart per document, documents never attend to each
            # other (transformers applies the same rule when no attention_mask is given).
            document_ids = document_ids_from_positions(position_ids.expand(h.shape[0], -1))
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"attention_mask must be a 2D [batch, seq] padding mask, got shape "
                    f"{tuple(attention_mask.shape)}; pass position_ids for packed sequences instead"
                )
            key_padding_mask = attention_mask.bool()

        tables = {
            v: self.rotary(position_ids, v, h.dtype) for v in dict.fromkeys(self.spec.layer_rope)
        }
        hidden_states: list[torch.Tensor] = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            if output_hidden_states:
                hidden_states.append(h)
            cos, sin = tables[layer.rope_variant]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(  # type: ignore[attr-defined]
                    layer.__call__, h, cos, sin, None, document_ids, key_padding_mask
                )
            else:
                h = layer(h, cos, sin, cache, document_ids, key_padding_mask)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            **{CACHE_FIELD: cache},
        )


class CausalLMMixin(_InitMixin):
    """``lm_head`` on top of the base model; ``labels`` go through the fused linear cross-entropy.

    The loss follows transformers exactly: labels are shifted left by one (or ``shift_labels`` is
    used as given), ``-100`` is ignored, and ``num_items_in_batch`` (as Trainer passes it) turns
    the mean into ``sum / num_items_in_batch``. Full logits are never materialized for the loss.

    Logits are still returned alongside the loss unless the caller opts out, per call with
    ``return_logits=False`` or for every call with ``model.logits_with_loss = False`` (training
    loops that only need the loss: this saves the [tokens, vocab] activation and its gradient).
    Without labels, ``logits_to_keep`` works as in transformers (``generate`` keeps only the last).

    Mixed in before a family's ``PreTrainedModel``; the family class names its base model class
    (``base_model_class = LlamaModel``).
    """

    _tied_weights_keys: Any = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _no_split_modules: Any = ["DecoderLayer"]  # noqa: RUF012
    _can_record_outputs: Any = {}  # noqa: RUF012
    base_model_class: ClassVar[type[nn.Module]]  # the family's DecoderModelMixin class

    config: Any
    spec: DecoderSpec
    model: Any
    lm_head: nn.Linear
    logits_with_loss: bool = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]  # the family's PreTrainedModel
        self.model = self.base_model_class(config)
        self.spec = self.model.spec
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # type: ignore[attr-defined]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Any = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pop_cache(kwargs, cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=kwargs.pop("output_attentions", None),
        )
        hidden = outputs.last_hidden_state
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self._loss(hidden, labels, shift_labels, num_items_in_batch)
            if return_logits is None:
                return_logits = self.logits_with_loss
        logits = None
        if return_logits is None or return_logits:
            if isinstance(logits_to_keep, int):
                kept = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
            else:
                kept = hidden[:, logits_to_keep, :]
            logits = self.lm_head(kept)
            if self.spec.final_softcap is not None:
                cap = self.spec.final_softcap
                logits = torch.tanh(logits / cap) * cap
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        if return_dict is False:
            return result.to_tuple()
        return result

    def _loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        if shift_labels is None:
            assert labels is not None
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss, _ = _ops.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.lm_head.weight,
            shift_labels.reshape(-1).to(hidden.device),
            bias=self.lm_head.bias,
            softcap=self.spec.final_softcap,
            reduction=reduction,
        )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss
