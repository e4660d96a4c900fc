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
    boolean mask, which SDPA runs with its cuDNN, efficient or math kernel. ``attn_mask`` (a caller's
    own boolean or additive mask) replaces ``spec``'s pattern when given.

    A query that sees no key (a left-padded query under a causal mask) outputs zeros, and its zero
    upstream gradient adds nothing to ``dk``/``dv``, whichever kernel SDPA picks.
    """
    mask = attn_mask
    is_causal = False
    if mask is None:
        if spec.is_top_left_causal:
            is_causal = True
        elif spec.needs_mask:
            mask = spec.dense(q.device)
    sees_a_key = None
    if mask is not None and mask.dtype == torch.bool:
        mask, sees_a_key = _with_one_key_per_row(mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None:
        # enable_gqa with a mask sends CUDA SDPA to its math kernel; expanding keeps it efficient.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=groups > 1 and mask is None,
    )
    if sees_a_key is not None:
        out = torch.where(sees_a_key, out, 0.0)
    return out


def _with_one_key_per_row(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(mask with key 0 opened on rows that see nothing, [..., Sq, 1] rows that see a key)``.

    SDPA kernels disagree on an all-masked row: the math and efficient kernels give zeros, cuDNN
    gives garbage in the output and NaN in the gradients (torch 2.11, H200). No kernel ever sees
    such a row this way; the caller zeroes those rows' output, which also zeroes their gradients.
    """
    sees_a_key = mask.any(dim=-1, keepdim=True)
    # built by a kernel: an indexed write of a Python scalar would copy host -> device (a sync)
    first_key = torch.arange(mask.shape[-1], device=mask.device) == 0
    return mask | (first_key & ~sees_a_key), sees_a_key
