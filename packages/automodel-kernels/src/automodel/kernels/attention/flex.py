"""Attention through FlexAttention: block-sparse masks for packed documents and windows, softcap."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from automodel.kernels.attention.eager import eager_attention
from automodel.kernels.attention.masks import MaskSpec, allowed
from automodel.kernels.attention.sdpa import sdpa_attention

# Compiled variants (sequence lengths, mask patterns, softcap values) kept per process before
# FlexAttention gives way to SDPA: each variant costs a compilation and a guard check per call.
_MAX_COMPILED_VARIANTS = 64

logger = logging.getLogger(__name__)


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only fast (and only memory-light) when compiled: the eager version
    # materializes the full score matrix. Static shapes (dynamic=False): with dynamic shapes torch
    # 2.11 fails to lower flex_attention for a second sequence length (NoValidChoicesError) and
    # turns the softcap and scale floats into unbacked symbols it cannot trace. Each new length
    # compiles once; see _compile_budget for what happens past _MAX_COMPILED_VARIANTS.
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False)


def _compile_budget() -> Any:
    """Returns a context in which dynamo keeps ``_MAX_COMPILED_VARIANTS`` graphs, then raises.

    Past its recompile limit dynamo would otherwise run the function uncompiled, and uncompiled
    FlexAttention materializes the full score matrix; raising lets the caller take SDPA instead.
    """
    return torch._dynamo.config.patch(
        recompile_limit=_MAX_COMPILED_VARIANTS,
        fail_on_recompile_limit_hit=True,
    )


def _recompile_limit_error() -> type[Exception]:
    """Returns the exception dynamo raises past its recompile limit under ``_compile_budget``."""
    return torch._dynamo.exc.FailOnRecompileLimitHit


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

    args = (mask_mod, batch if spec.batch_dependent else None, None, spec.q_len, spec.kv_len)
    if device.type != "cuda" or torch.compiler.is_compiling():
        return create_block_mask(*args, device=device)
    try:
        with _compile_budget():
            return _compiled_create_block_mask()(*args, device=device)
    except _recompile_limit_error():
        # Uncompiled, the mask is built from a dense [B, 1, Sq, Sk] grid: correct, more memory.
        return create_block_mask(*args, device=device)


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

    Compiled on CUDA with static shapes (one compilation per new sequence length or pattern; past
    ``_MAX_COMPILED_VARIANTS`` of them the call goes to SDPA, or to the eager reference for
    softcap, with a warning: never to FlexAttention's unfused fallback). Inside a compiled model it
    is traced into the caller's graph. On CPU it runs uncompiled and forward-only (torch has no CPU
    backward for it). The block mask is cached across calls that share the same mask tensors (all
    layers of a step).
    """
    from torch.nn.attention.flex_attention import flex_attention as flex

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

    kwargs: dict[str, Any] = dict(
        score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex(q, k, v, **kwargs)  # type: ignore[no-any-return]
    # Contiguous [B, H, S, D]: with q in transformers' transposed [B, S, H, D] memory and k/v
    # contiguous, torch 2.11's flex template found no valid kernel config (NoValidChoicesError).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    try:
        with _compile_budget():
            return _compiled_flex()(q, k, v, **kwargs)  # type: ignore[no-any-return]
    except _recompile_limit_error():
        logger.warning(
            "attention: FlexAttention reached %d compiled variants (sequence lengths x mask "
            "patterns); this call runs %s instead. Pad batches to a few fixed lengths to stay on "
            "FlexAttention.",
            _MAX_COMPILED_VARIANTS,
            "the eager reference (softcap)" if softcap is not None else "SDPA with a dense mask",
        )
    if softcap is not None:
        return eager_attention(q, k, v, spec, scale=scale, softcap=softcap)
    return sdpa_attention(q, k, v, spec, scale=scale)
