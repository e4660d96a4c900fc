"""Attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash, cuDNN, efficient, math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.kernels.attention.masks import MaskSpec


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns SDPA's attention output ``[B, Hq, Sq, D]`` for the pattern ``spec``.

    Plain causal self-attention uses ``is_causal=True`` and no mask, the only form SDPA's flash and
    cuDNN kernels accept; a single decoding query needs no mask at all. Every other pattern is a dense
    boolean mask, which SDPA runs with its efficient or math kernel. ``attn_mask`` (a caller's own
    boolean or additive mask) replaces ``spec``'s pattern when given.
    """
    mask = attn_mask
    is_causal = False
    if mask is None:
        if spec.is_top_left_causal:
            is_causal = True
        elif spec.needs_mask:
            mask = spec.dense(q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None:
        # enable_gqa with a mask sends CUDA SDPA to its math kernel; expanding keeps it efficient.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=groups > 1 and mask is None,
    )
