"""Activation checkpointing of blocks, full or selective (per op), keeping module FQNs intact."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

_aten = torch.ops.aten
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _saved_ops() -> set[Any]:
    """Ops whose outputs selective checkpointing keeps: matmuls, attention, collectives."""
    names = [
        (_aten, "mm"),
        (_aten, "addmm"),
        (_aten, "bmm"),
        (_aten, "_scaled_dot_product_flash_attention"),
        (_aten, "_scaled_dot_product_efficient_attention"),
        (_aten, "_scaled_dot_product_cudnn_attention"),
        (_aten, "_scaled_dot_product_flash_attention_for_cpu"),
        (torch.ops._c10d_functional, "reduce_scatter_tensor"),
        (torch.ops._c10d_functional, "all_reduce"),
    ]
    return {getattr(ns, name).default for ns, name in names if hasattr(ns, name)}


def _selective_policy(saved: set[Any]) -> Any:
    def policy(_ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        # A DTensor op dispatches local ops that pass through this policy too: save those, not
        # the DTensor-level result, so one copy is kept.
        if op in saved and not any(isinstance(a, DTensor) for a in args):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> None:
    """Makes each block recompute its activations in backward (in place; returns nothing).

    The block's ``forward`` is wrapped (the module itself is not replaced), so parameter names,
    state dicts and hooks are unchanged. ``"full"`` keeps only the block input; ``"selective"``
    also keeps the outputs of matmuls, attention and collectives, and recomputes the cheap
    elementwise ops and norms. While gradients are enabled, a KV cache passed to a block is
    dropped (as transformers does under gradient checkpointing): recompute would fill it twice.

    Args:
        blocks: the modules to checkpoint (usually the decoder layers).
        mode: ``"none"``, ``"full"`` or ``"selective"``.

    Example:
        >>> apply_activation_checkpointing(list(hf_llama.model.layers), "selective")
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(
            f"activation checkpointing mode {mode!r}: expected 'none', 'full' or 'selective'"
        )
    context_fn = None
    if mode == "selective":
        context_fn = functools.partial(
            create_selective_checkpoint_contexts, _selective_policy(_saved_ops())
        )
    for block in blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                # A KV cache is global state that recompute would update a second time.
                for name in _CACHE_KWARGS:
                    if kwargs.get(name) is not None:
                        kwargs[name] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
            if context_fn is None:
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]
