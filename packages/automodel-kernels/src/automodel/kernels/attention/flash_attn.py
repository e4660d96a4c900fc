"""Attention through the ``flash-attn`` package (Dao-AILab), when it is installed."""

from __future__ import annotations

import importlib.util

import torch

from automodel.kernels.attention.masks import MaskSpec


def flash_attn_available() -> bool:
    """Returns True when the ``flash_attn`` package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns flash-attn's output ``[B, Hq, Sq, D]`` for the pattern ``spec``.

    Causal (bottom-right aligned, as flash-attn >= 2.1 does), windows and softcap map onto
    ``flash_attn_func``. Documents and key padding go through ``flash_attn_varlen_func``: the batch is
    flattened, padding tokens are dropped and each (contiguous) document becomes one varlen sequence. Padded
    query positions output zeros there (the other backends let them attend to the real keys).
    """
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "attention(backend='flash_attn') needs the flash-attn package: pip install flash-attn "
            "--no-build-isolation, or use backend='sdpa' or 'flex'"
        ) from err
    # flash-attn's window_size=(left, right) counts the keys before the query; transformers' window W
    # includes the query itself.
    window = (spec.window - 1, 0) if spec.window is not None else (-1, -1)
    kwargs = dict(
        softmax_scale=scale, causal=spec.causal, window_size=window, softcap=softcap or 0.0
    )
    if not spec.batch_dependent:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        return out.transpose(1, 2)
    if spec.q_len != spec.kv_len:
        raise ValueError(
            "attention(backend='flash_attn') supports document_ids/key_padding_mask only without a "
            f"KV cache (got {spec.q_len} queries for {spec.kv_len} keys); use backend='sdpa' or 'flex'"
        )
    batch, seq = q.shape[0], q.shape[2]
    segments = _segment_ids(spec, batch, seq, q.device)  # [B*S], -1 = dropped padding
    keep = torch.nonzero(segments >= 0).squeeze(1)
    kept = segments[keep]
    starts = torch.ones_like(kept, dtype=torch.bool)
    starts[1:] = kept[1:] != kept[:-1]
    start_idx = torch.nonzero(starts).squeeze(1)
    cu = torch.cat([start_idx, start_idx.new_tensor([kept.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # host sync: flash-attn's varlen API needs it
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3])[keep] for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, **kwargs)
    full = out.new_zeros(batch * seq, q.shape[1], q.shape[3])
    full[keep] = out
    return full.view(batch, seq, q.shape[1], q.shape[3]).transpose(1, 2)


def _segment_ids(spec: MaskSpec, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Returns one id per flattened token: equal ids = same sequence; -1 = a padding token to drop."""
    docs = (
        spec.document_ids
        if spec.document_ids is not None
        else torch.zeros(batch, seq, dtype=torch.long, device=device)
    ).long()
    docs = docs.expand(batch, seq)
    # Make ids unique across batch rows, so a document never continues into the next row.
    span = docs.max(dim=1, keepdim=True).values - docs.min(dim=1, keepdim=True).values + 1
    row_base = torch.cumsum(span, dim=0) - span
    ids = docs - docs.min(dim=1, keepdim=True).values + row_base
    if spec.key_padding_mask is not None:
        ids = torch.where(spec.key_padding_mask.expand(batch, seq), ids, -1)
    return ids.reshape(-1)
