"""Attention through Transformer Engine's fused ``DotProductAttention`` (the ``te`` extra)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from automodel.kernels.attention.masks import MaskSpec, run_varlen


def te_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns TE's attention output ``[B, Hq, Sq, D]`` for the pattern ``spec``.

    Causal (bottom-right aligned when ``Sq < Sk``) and sliding windows map onto TE's mask types
    and ``window_size``; documents go through TE's packed ``"thd"`` layout (one sequence per
    document, from :func:`~automodel.kernels.attention.masks.run_varlen`).

    Raises:
        ValueError: tensors not on CUDA, ``softcap`` or ``key_padding_mask`` (TE has neither
            here), or documents with a KV cache.
        ImportError: Transformer Engine cannot be imported.
    """
    if softcap is not None:
        raise ValueError(
            "attention(backend='te') does not support softcap; use backend='flex' or 'flash_attn'"
        )
    if spec.key_padding_mask is not None:
        raise ValueError(
            "attention(backend='te') does not take key_padding_mask; use backend='sdpa' or 'flex', "
            "or pack the batch (document_ids) instead of padding it"
        )
    if q.device.type != "cuda":
        raise ValueError(
            f"attention(backend='te') needs CUDA tensors (got {q.device.type}); use backend='sdpa' "
            "or 'auto'"
        )
    from automodel.kernels.te import import_te

    import_te()
    # TE's window_size=(left, right) counts the keys before the query; transformers' window W
    # includes the query itself.
    window = (spec.window - 1, 0) if spec.window is not None else None
    batch, n_q, q_len, head_dim = q.shape
    n_kv = k.shape[1]
    if spec.document_ids is None:
        mask = "no_mask"
        if spec.causal:
            mask = "causal" if spec.q_len == spec.kv_len else "causal_bottom_right"
        module = _module(n_q, n_kv, head_dim, scale, "bshd", mask, window, q.device)
        out = module(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        return out.view(batch, q_len, n_q, head_dim).transpose(1, 2)
    if spec.q_len != spec.kv_len:
        raise ValueError(
            "attention(backend='te') supports document_ids only without a KV cache (got "
            f"{spec.q_len} queries for {spec.kv_len} keys); use backend='sdpa' or 'flex'"
        )
    mask = "padding_causal" if spec.causal else "padding"
    module = _module(n_q, n_kv, head_dim, scale, "thd", mask, window, q.device)
    return run_varlen(
        q, k, v, spec,
        lambda q, k, v, cu, max_len: module(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
        ),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _module(
    n_q: int,
    n_kv: int,
    head_dim: int,
    scale: float,
    qkv_format: str,
    mask: str,
    window: tuple[int, int] | None,
    device: torch.device,
) -> Any:
    """Returns one ``DotProductAttention`` per configuration and device (it holds no trainable
    weights, only its backend choice and FP8 state)."""
    from automodel.kernels.te import import_te

    te = import_te()
    with torch.cuda.device(device):
        return te.DotProductAttention(
            n_q,
            head_dim,
            num_gqa_groups=n_kv,
            attention_dropout=0.0,
            qkv_format=qkv_format,
            attn_mask_type=mask,
            window_size=window,
            softmax_scale=scale,
        )
