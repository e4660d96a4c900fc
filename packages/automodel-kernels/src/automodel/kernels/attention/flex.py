"""Attention through FlexAttention: block-sparse masks for packed documents and windows, softcap."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from automodel.kernels.attention.masks import MaskSpec, allowed


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only fast (and only memory-light) when compiled: the eager version
    # materializes the full score matrix. Default dynamic-shape handling: a second sequence length
    # compiles one dynamic graph instead of recompiling per length (and hitting the recompile limit).
    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


class _BlockMaskCache:
    """Remembers the last block mask: every layer of a forward pass asks for the same one."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._tensors: tuple[torch.Tensor | None, ...] = ()
        self._mask: Any = None

    def get(self, spec: MaskSpec, batch: int, device: torch.device) -> Any:
        tensors = (spec.document_ids, spec.key_padding_mask)
        key = (
            spec.q_len,
            spec.kv_len,
            spec.causal,
            spec.window,
            batch,
            str(device),
            tuple(None if t is None else t._version for t in tensors),
        )
        same_tensors = len(self._tensors) == 2 and all(
            a is b for a, b in zip(self._tensors, tensors, strict=True)
        )
        if key == self._key and same_tensors:
            return self._mask
        self._mask = _create_block_mask(spec, batch, device)
        self._key, self._tensors = key, tensors
        return self._mask


def _create_block_mask(spec: MaskSpec, batch: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    offset, causal, window = spec.offset, spec.causal, spec.window
    document_ids, key_padding_mask = spec.document_ids, spec.key_padding_mask

    # A closure over plain values and tensors (not a bound method) so that torch.compile reuses its
    # graph across calls instead of guarding on a new object each time.
    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return allowed(
            b,
            q_idx,
            kv_idx,
            offset=offset,
            causal=causal,
            window=window,
            document_ids=document_ids,
            key_padding_mask=key_padding_mask,
        )

    make = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return make(
        mask_mod,
        batch if spec.batch_dependent else None,
        None,
        spec.q_len,
        spec.kv_len,
        device=device,
    )


_CACHE = _BlockMaskCache()


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns FlexAttention's output ``[B, Hq, Sq, D]`` for the pattern ``spec``.

    Compiled on CUDA. On CPU it runs uncompiled and forward-only (torch has no CPU backward for it).
    The block mask is cached across calls that share the same mask tensors (all layers of a step).
    """
    block_mask = None
    if spec.needs_mask:
        if torch.compiler.is_compiling():
            # Inside a compiled model the mask is built in the graph; the cache is Python state.
            block_mask = _create_block_mask(spec, q.shape[0], q.device)
        else:
            block_mask = _CACHE.get(spec, q.shape[0], q.device)
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def score_mod(
            score: torch.Tensor,
            b: torch.Tensor,
            h: torch.Tensor,
            q_idx: torch.Tensor,
            kv_idx: torch.Tensor,
        ) -> torch.Tensor:
            return torch.tanh(score / cap) * cap

    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    out = fn(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out
