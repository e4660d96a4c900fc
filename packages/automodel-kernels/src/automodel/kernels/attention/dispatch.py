"""``attention``: one signature over SDPA, FlexAttention, flash-attn, Transformer Engine and the
eager reference."""

from __future__ import annotations

import torch

from automodel.kernels._backend import resolve_backend
from automodel.kernels.attention.eager import eager_attention
from automodel.kernels.attention.flash_attn import flash_attention
from automodel.kernels.attention.flex import flex_attention
from automodel.kernels.attention.masks import MaskSpec, document_ids_from_cu_seqlens
from automodel.kernels.attention.sdpa import sdpa_attention
from automodel.kernels.attention.te import te_attention

ATTENTION_BACKENDS = ("sdpa", "flex", "flash_attn", "te", "eager")
# FlexAttention's block size: "auto" sends calls with fewer queries to SDPA (or eager for softcap).
_FLEX_MIN_QUERIES = 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Returns the attention output ``[B, Hq, Sq, D]`` of ``q`` over ``k``/``v``.

    Args:
        q: queries ``[B, Hq, Sq, D]``.
        k: keys ``[B, Hkv, Sk, D]``; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
        v: values ``[B, Hkv, Sk, D]``.
        causal: a query sees only keys at or before its position. With ``Sq < Sk`` (decoding with a
            KV cache) the queries are the last ``Sq`` positions: the diagonal is bottom-right aligned.
        window: transformers' sliding window: a query sees itself and the ``window - 1`` keys
            before it (``kv_idx > q_idx - window``). Needs ``causal=True``.
        document_ids: ``[B, Sk]`` integer ids of packed sequences; a token sees only tokens with
            the same id, so packed documents never attend to each other.
        cu_seqlens: flash-attn style offsets ``[num_docs + 1]`` (``B`` must be 1): the same as
            ``document_ids``. Give one of the two.
        key_padding_mask: ``[B, Sk]`` bool, True for real tokens; padded keys are never seen.
        scale: the score scale, ``D ** -0.5`` when None.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
        backend: ``"auto"``, ``"sdpa"``, ``"flex"``, ``"flash_attn"``, ``"te"`` (Transformer
            Engine's fused attention, the ``te`` extra) or ``"eager"`` (the explicit masked-softmax
            reference). ``"auto"`` picks, on CUDA, FlexAttention when documents, a
            window or softcap need a block mask and there are at least 128 queries, and SDPA
            (flash/cuDNN) otherwise (eager for softcap with fewer queries); on CPU, SDPA, or eager
            when softcap is set.

    Returns:
        ``[B, Hq, Sq, D]`` in ``q``'s dtype. A query that can see no key outputs zeros.

    Raises:
        ValueError: shapes disagree, ``window`` without ``causal``, both ``document_ids`` and
            ``cu_seqlens``, or a backend that cannot run this call (named in the message).

    Example:
        >>> q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        >>> attention(q, k, v, document_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])).shape
        torch.Size([1, 4, 8, 16])
    """
    _check_shapes(q, k, v)
    batch, _, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if window is not None:
        if not causal:
            raise ValueError(
                f"attention: window={window} needs causal=True (transformers' sliding window is a "
                "causal pattern); drop window or set causal=True"
            )
        if window < 1:
            raise ValueError(
                f"attention: window must be >= 1 (got {window}); use None for no window"
            )
    if cu_seqlens is not None:
        if document_ids is not None:
            raise ValueError(
                "attention: give document_ids or cu_seqlens, not both (they describe the same thing)"
            )
        if batch != 1:
            raise ValueError(
                f"attention: cu_seqlens needs the packed batch to be 1 row (got B={batch}); pass "
                "document_ids [B, S] instead"
            )
        document_ids = document_ids_from_cu_seqlens(cu_seqlens, kv_len)
    if document_ids is not None and (document_ids.dim() != 2 or document_ids.shape[1] != kv_len):
        raise ValueError(
            f"attention: document_ids must be [B, Sk] = [{batch}, {kv_len}], got "
            f"{tuple(document_ids.shape)}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, kv_len):
            raise ValueError(
                f"attention: key_padding_mask must be [B, Sk] = [{batch}, {kv_len}], got "
                f"{tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.bool()
    spec = MaskSpec(
        q_len=q_len,
        kv_len=kv_len,
        causal=causal,
        window=window,
        document_ids=document_ids,
        key_padding_mask=key_padding_mask,
    )
    scale = head_dim**-0.5 if scale is None else scale
    choice = _resolve(backend, spec, q, softcap)
    if choice == "eager":
        return eager_attention(q, k, v, spec, scale=scale, softcap=softcap)
    if choice == "sdpa":
        if softcap is not None:
            raise ValueError(
                "attention: backend='sdpa' does not support softcap; use backend='flex' (CUDA), "
                "'eager', or 'auto'"
            )
        return sdpa_attention(q, k, v, spec, scale=scale)
    if choice == "flex":
        if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                "attention: backend='flex' has no backward on CPU in torch; use backend='sdpa' or "
                "'eager' (or 'auto') for CPU training"
            )
        return flex_attention(q, k, v, spec, scale=scale, softcap=softcap)
    if choice == "te":
        return te_attention(q, k, v, spec, scale=scale, softcap=softcap)
    return flash_attention(q, k, v, spec, scale=scale, softcap=softcap)


def _resolve(backend: str, spec: MaskSpec, q: torch.Tensor, softcap: float | None) -> str:
    if backend == "auto":
        if q.device.type == "cuda":
            block_sparse = spec.document_ids is not None or (
                spec.window is not None and spec.window < spec.kv_len
            )
            if spec.q_len < _FLEX_MIN_QUERIES:
                # Decoding and short calls: no query block to skip, and FlexAttention (compiled
                # with static shapes) would compile again for every new cache length.
                backend = "eager" if softcap is not None else "sdpa"
            else:
                backend = "flex" if block_sparse or softcap is not None else "sdpa"
        else:
            backend = "eager" if softcap is not None else "sdpa"
    if torch.compiler.is_compiling() and backend in ATTENTION_BACKENDS:
        # resolve_backend logs the choice, which torch.compile cannot trace without a graph break;
        # the same choice was validated and logged by any eager call.
        return backend
    return resolve_backend("attention", backend, q.device, choices=ATTENTION_BACKENDS)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention: q, k and v must be 4-D [B, H, S, D] (transformers' layout after the "
            f"transpose), got {q.dim()}-D, {k.dim()}-D and {v.dim()}-D"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape, got {k.shape} and {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention: query heads ({q.shape[1]}) must be a multiple of key/value heads "
            f"({k.shape[1]}) for grouped-query attention"
        )
