"""Attention dispatch: SDPA, FlexAttention, flash-attn, Transformer Engine and an explicit
masked-softmax reference."""

from automodel.kernels.attention.dispatch import ATTENTION_BACKENDS, attention
from automodel.kernels.attention.hf import hf_attention_forward
from automodel.kernels.attention.masks import (
    document_ids_from_cu_seqlens,
    document_ids_from_position_ids,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "attention",
    "document_ids_from_cu_seqlens",
    "document_ids_from_position_ids",
    "hf_attention_forward",
]
