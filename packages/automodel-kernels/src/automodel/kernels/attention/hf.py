"""``hf_attention_forward``: ``attention`` behind transformers' ``AttentionInterface`` contract.

automodel-core registers it (``AttentionInterface.register(name, hf_attention_forward)``); this
module never imports transformers. The contract is the one of transformers'
``sdpa_attention_forward``: ``query`` ``[B, Hq, Sq, D]``, ``key``/``value`` ``[B, Hkv, Sk, D]``,
returns ``(attn_output [B, Sq, Hq, D], None)``.
"""

from __future__ import annotations

from typing import Any

import torch

from automodel.kernels.attention.dispatch import attention
from automodel.kernels.attention.eager import eager_attention
from automodel.kernels.attention.masks import MaskSpec, document_ids_from_cu_seqlens
from automodel.kernels.attention.sdpa import sdpa_attention


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Returns ``(attn_output [B, Sq, Hq, D], None)`` like transformers' attention functions.

    ``attention_mask`` may be what transformers hands to an attention function:

    - ``None``: the pattern comes from ``module.is_causal`` (or an ``is_causal`` kwarg),
      ``sliding_window``, and the packing kwargs ``document_ids`` ``[B, Sk]`` or ``cu_seq_lens_q``
      (transformers' flash-attention kwarg for packed batches of one row);
    - ``[B, Sk]`` padding (1 = real token; its last ``Sk`` columns are used): key padding on top of
      the pattern above. This is what transformers' ``flash_attention_mask`` builds, so register
      that as the mask function of the same name (``AttentionMaskInterface.register``); with no
      mask function registered, transformers passes ``None`` and padding is lost;
    - ``[B, 1, Sq, Sk]`` boolean (True = attend) or additive float: used as is, through SDPA (or the
      eager reference when ``softcap`` is set).

    Args:
        module: the attention module (``is_causal`` is read from it).
        query: ``[B, Hq, Sq, D]``.
        key: ``[B, Hkv, Sk, D]``.
        value: ``[B, Hkv, Sk, D]``.
        attention_mask: see above.
        scaling: the score scale (``D ** -0.5`` when None).
        dropout: must be 0.0 (attention dropout is not supported).
        sliding_window: transformers' window size for this layer, or None.
        softcap: Gemma 2's attention logit softcapping, or None.
        backend: forwarded to :func:`attention` (``functools.partial`` it to pin one).
        kwargs: other transformers kwargs; ``is_causal``, ``document_ids`` and ``cu_seq_lens_q``
            are read, the rest ignored.

    Example:
        >>> m = torch.nn.Module()
        >>> q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
        >>> hf_attention_forward(m, q, k, k, None)[0].shape
        torch.Size([1, 6, 4, 8])
    """
    if dropout:
        raise ValueError(
            f"hf_attention_forward: attention dropout={dropout} is not supported; set the model "
            "config's attention_dropout to 0.0 or use attn_implementation='sdpa'"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len]
        spec = MaskSpec(q_len=q_len, kv_len=kv_len, causal=False)
        if softcap is not None:
            out = eager_attention(
                query, key, value, spec, scale=scale, softcap=softcap, attn_mask=mask
            )
        else:
            out = sdpa_attention(query, key, value, spec, scale=scale, attn_mask=mask)
        return out.transpose(1, 2).contiguous(), None
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "hf_attention_forward: attention_mask must be None, [B, Sk] padding or "
                f"[B, 1, Sq, Sk], got shape {tuple(attention_mask.shape)}"
            )
        key_padding_mask = _PADDING.key_padding_mask(attention_mask, kv_len)
    document_ids = kwargs.get("document_ids")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if document_ids is None and cu_seqlens is not None and query.shape[0] == 1 and q_len == kv_len:
        document_ids = document_ids_from_cu_seqlens(cu_seqlens, kv_len)
    window = sliding_window if is_causal else None
    out = attention(
        query,
        key,
        value,
        causal=bool(is_causal),
        window=window,
        document_ids=document_ids,
        key_padding_mask=key_padding_mask,
        scale=scale,
        softcap=softcap,
        backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None


class _PaddingCache:
    """Converts the last padding mask once: every layer of a forward pass passes the same tensor."""

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, int, int] | None = None
        self._result: torch.Tensor | None = None

    def key_padding_mask(self, mask: torch.Tensor, kv_len: int) -> torch.Tensor | None:
        """Returns the last ``kv_len`` columns of ``mask`` as bool, or None when they hide nothing.

        The last columns: a sliding-window cache keeps only the most recent keys.
        """
        if torch.compiler.is_compiling():
            # No host sync and no Python-side cache inside a compiled graph: always a mask.
            return mask[:, -kv_len:].bool()
        key = (mask, mask._version, kv_len)
        if self._key is None or self._key[0] is not mask or self._key[1:] != key[1:]:
            if mask.shape[1] < kv_len:
                raise ValueError(
                    f"hf_attention_forward: the [B, Sk] attention_mask covers {mask.shape[1]} "
                    f"positions but there are {kv_len} keys; pass a mask over every key"
                )
            padding = mask[:, -kv_len:].bool()
            # One host sync per new mask, not one per layer.
            self._result = None if bool(padding.all()) else padding
            self._key = key
        return self._result


_PADDING = _PaddingCache()
