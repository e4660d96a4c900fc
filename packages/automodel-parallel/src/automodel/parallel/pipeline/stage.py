"""One pipeline stage of a Hugging Face decoder: some of its blocks, plus embedding or head.

The stage keeps the original module objects and their fully qualified names (the blocks sit in a
``ModuleDict`` keyed by their original index), so ``stage.state_dict()`` keys are a subset of the
whole model's and checkpoints load by name. Its forward reproduces the decoder body's forward for
training (no cache, no padding mask): the first stage embeds ``input_ids``; every stage derives the
positions ``0..T-1`` and runs the rotary embedding itself (cheap, and nothing but hidden states
crosses stage boundaries); the last stage applies the final norm, the head and the optional final
logit softcapping (Gemma 2).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from automodel.parallel.pipeline.split import DecoderLayout


class DecoderStage(nn.Module):
    """Returns hidden states (logits on the last stage) for the blocks it holds.

    Args:
        layout: the whole model's layout (``find_decoder_layout``); modules are shared, not copied.
        layer_indices: the consecutive block indices this stage runs.
        is_first: holds the token embedding (input: ``input_ids [B, T]``).
        is_last: holds the final norm and LM head (output: ``logits [B, T, V]``).
    """

    def __init__(
        self, layout: DecoderLayout, layer_indices: list[int], *, is_first: bool, is_last: bool
    ) -> None:
        super().__init__()
        body = layout.body
        part = nn.Module()
        part.layers = nn.ModuleDict({str(i): layout.layers[i] for i in layer_indices})
        part.rotary_emb = body.rotary_emb
        if is_first:
            part.embed_tokens = body.embed_tokens
        if is_last:
            part.norm = body.norm
        self.add_module(layout.body_name, part)
        if is_last:
            self.add_module(layout.head_name, layout.head)
        self._body_name = layout.body_name
        self._head_name = layout.head_name
        self.layer_indices = list(layer_indices)
        self.is_first = is_first
        self.is_last = is_last
        config = layout.config
        self._layer_types = [_layer_type(config, i) for i in layer_indices]
        self._sliding_window: int | None = getattr(config, "sliding_window", None)
        self._softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self._attn_implementation: str = getattr(config, "_attn_implementation", None) or "sdpa"
        if self._attn_implementation.startswith("flex"):
            raise ValueError(
                "pipeline stages build their own attention masks and do not support "
                f"attn_implementation={self._attn_implementation!r}. Fix: load the model with "
                "attn_implementation='sdpa' (or 'eager' / 'flash_attention_2')."
            )
        rotary_params = inspect.signature(body.get_submodule("rotary_emb").forward).parameters
        self._rotary_per_layer_type = "layer_type" in rotary_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = getattr(self, self._body_name)
        hidden = body.embed_tokens(x) if self.is_first else x
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        rotary: dict[str, Any] = {}
        masks: dict[str, torch.Tensor | None] = {}
        for layer_type in set(self._layer_types):
            if self._rotary_per_layer_type:
                rotary[layer_type] = body.rotary_emb(hidden, position_ids, layer_type)
            else:
                rotary.setdefault("shared", body.rotary_emb(hidden, position_ids))
            masks[layer_type] = self._mask(layer_type, seq_len, hidden)
        for index, layer_type in zip(self.layer_indices, self._layer_types):
            out = body.layers[str(index)](
                hidden,
                attention_mask=masks[layer_type],
                position_embeddings=rotary[layer_type if self._rotary_per_layer_type else "shared"],
                position_ids=position_ids,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return hidden
        logits = getattr(self, self._head_name)(body.norm(hidden))
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _mask(self, layer_type: str, seq_len: int, like: torch.Tensor) -> torch.Tensor | None:
        """Returns the additive ``[1, 1, T, T]`` mask of ``layer_type``, or None for plain causal.

        SDPA and flash attention apply plain causal masking themselves when given no mask (and
        flash attention reads the sliding window from the attention module), so only eager
        attention and SDPA with a sliding window need an explicit mask.
        """
        sliding = layer_type == "sliding_attention" and self._sliding_window is not None
        if self._attn_implementation.startswith("flash"):
            return None
        if self._attn_implementation != "eager" and not sliding:
            return None
        q = torch.arange(seq_len, device=like.device)[:, None]
        k = torch.arange(seq_len, device=like.device)[None, :]
        allowed = k <= q
        if sliding:
            assert self._sliding_window is not None
            allowed &= k > q - self._sliding_window
        mask = torch.zeros(seq_len, seq_len, dtype=like.dtype, device=like.device)
        mask.masked_fill_(~allowed, torch.finfo(like.dtype).min)
        return mask[None, None]


def _layer_type(config: Any, index: int) -> str:
    """Returns ``"full_attention"`` or ``"sliding_attention"`` for block ``index``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return str(layer_types[index])
    if getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    ):
        return "sliding_attention"
    return "full_attention"
