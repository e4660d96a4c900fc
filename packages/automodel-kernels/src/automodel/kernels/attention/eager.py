"""The reference attention: an explicit masked softmax that every other backend is tested against."""

from __future__ import annotations

import torch

from automodel.kernels.attention.masks import MaskSpec


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns ``softmax(mask(softcap(q @ k^T * scale))) @ v`` as ``[B, Hq, Sq, D]``.

    Scores and the softmax are in fp32 whatever the input dtype; the probabilities are cast back to
    ``v``'s dtype before the product with ``v`` (as transformers' eager attention does). A query that
    may see no key at all (e.g. a padded query under a causal mask) outputs zeros, not NaN.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        # An additive mask (transformers' eager masks use finfo.min): add it and trust it.
        probs = torch.softmax(scores + attn_mask.float(), dim=-1)
    elif attn_mask is not None or spec.needs_mask:
        allowed = attn_mask if attn_mask is not None else spec.dense(q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Rows with no visible key are all -inf: softmax gives NaN there; define them as zero.
        probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)
