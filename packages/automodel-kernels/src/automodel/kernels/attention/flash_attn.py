"""Attention through the ``flash-attn`` package (Dao-AILab), when it is installed."""

from __future__ import annotations

import importlib.util

import torch

from automodel.kernels.attention.masks import MaskSpec, run_varlen


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
    return run_varlen(
        q, k, v, spec,
        lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, **kwargs),
    )  # fmt: skip
