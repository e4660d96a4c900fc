"""Self-attention with HF parameter names (q/k/v/o_proj, q_norm/k_norm) on the kernels' dispatch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from automodel.core import _ops
from automodel.core.models.common.norm import RMSNorm
from automodel.core.models.common.spec import DecoderSpec


class Attention(nn.Module):
    """GQA self-attention: projections, optional q/k norm, rope, KV cache, masked attention.

    ``backend`` names the automodel.kernels attention backend of this layer (``"auto"``: FlexAttention
    on CUDA when a block mask is needed, SDPA otherwise); ``from_pretrained(kernels={"attention":
    ...})`` or ``attn_implementation=`` set it on every layer of one model. q/k/v reach the kernels
    in transformers' ``[batch, heads, seq, head_dim]`` layout (transposed views, not copies).
    """

    def __init__(self, config: Any, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.window = spec.layer_windows[layer_idx]
        self.scale = spec.attn_scale
        self.softcap = spec.attn_softcap
        self.backend = "auto"
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=spec.o_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if spec.qk_norm:
            eps = config.rms_norm_eps
            self.q_norm = RMSNorm(self.head_dim, eps, offset=spec.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, eps, offset=spec.norm_offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        cache: Any = None,
        document_ids: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _ops.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, -k.shape[-2] :]
        out = _ops.attention(
            q,
            k,
            v,
            window=self.window,
            document_ids=document_ids,
            key_padding_mask=key_padding_mask,
            scale=self.scale,
            softcap=self.softcap,
            backend=self.backend,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
