"""``save_pretrained`` for parallel models and models with adapters.

Installed on the model by ``from_pretrained`` / ``from_config`` when it is parallelized or carries
LoRA adapters; every other model keeps transformers' own ``save_pretrained``.

- A model with adapters saves like a ``peft.PeftModel``: ``adapter_model.safetensors`` +
  ``adapter_config.json`` only (gathered across ranks), which ``peft.PeftModel.from_pretrained``
  loads onto the plain transformers base model.
- ``save_pretrained(path, merged=True)`` writes the full model with the adapters folded into the
  base weights instead: a standard checkpoint that transformers (or vLLM) loads with no peft.
  The model itself is left unmerged, ready to keep training.
- A parallel model writes one consolidated Hugging Face folder through ``automodel.ckpt.save``
  (every rank calls it; each writes what it holds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from automodel.core.adapters import checkpoint_tensors, has_adapters

logger = logging.getLogger("automodel.core")

# transformers arguments that change nothing for the sharded writer (it always writes safetensors
# from every rank).
_SHARDED_NOOP_KWARGS = {"safe_serialization", "is_main_process"}


def install_save_pretrained(model: nn.Module, *, sharded: bool) -> None:
    """Replaces ``model.save_pretrained`` by one that handles adapters and (if ``sharded``) ranks.

    Example:
        >>> install_save_pretrained(model, sharded=False)   # doctest: +SKIP
        >>> model.save_pretrained("out/adapter")            # adapter files only
        >>> model.save_pretrained("out/merged", merged=True)  # full weights, adapters folded in
    """
    # The class's method, not the instance attribute: installing twice must not wrap the wrapper.
    hf_save = types.MethodType(type(model).save_pretrained, model)  # type: ignore[attr-defined]

    def save_pretrained(
        self: nn.Module,
        save_directory: str | os.PathLike[str],
        *,
        merged: bool = False,
        **kwargs: Any,
    ) -> None:
        """Writes the adapter (peft format), or the full model when it has none or ``merged``."""
        if has_adapters(self) and not merged:
            from automodel.core.peft import save_pretrained_adapter

            ignored = sorted(set(kwargs) - _SHARDED_NOOP_KWARGS)
            if ignored:
                logger.warning("save_pretrained of a model with adapters ignores %s", ignored)
            save_pretrained_adapter(self, save_directory)
            return
        with _adapters_merged(self):
            if sharded:
                _save_sharded(self, save_directory, kwargs)
            elif has_adapters(self):
                hf_save(save_directory, state_dict=checkpoint_tensors(self), **kwargs)
            else:
                hf_save(save_directory, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)  # type: ignore[method-assign, assignment]


@contextlib.contextmanager
def _adapters_merged(model: nn.Module) -> Iterator[None]:
    """Folds the adapters into the base weights for the duration of a ``with`` block."""
    from automodel.core.peft import adapter_modules, merge_adapters, unmerge_adapters

    modules = adapter_modules(model)
    merge_here = bool(modules) and not all(m.merged for m in modules.values())
    if merge_here:
        merge_adapters(model)
    try:
        yield
    finally:
        if merge_here:
            unmerge_adapters(model)


def _save_sharded(model: nn.Module, save_directory: Any, kwargs: dict[str, Any]) -> None:
    """Writes a consolidated HF folder (weights without adapter tensors, config) from every rank.

    MoE experts, fused ``[E, ...]`` in memory (and sharded over ``ep``), are written in the Hub's
    per-expert layout, as transformers' own ``save_pretrained`` does.
    """
    from automodel.ckpt import save
    from automodel.ckpt.saving import save_configs
    from automodel.core.moe import moe_key_map

    options = {k: kwargs[k] for k in ("max_shard_size",) if k in kwargs}
    ignored = sorted(set(kwargs) - {"max_shard_size"} - _SHARDED_NOOP_KWARGS)
    if ignored:
        logger.warning("save_pretrained of a parallel model ignores %s", ignored)
    key_map = moe_key_map(getattr(model, "config", None))
    path = save(checkpoint_tensors(model), save_directory, key_map=key_map, **options)
    if _is_rank_zero():
        save_configs(model, path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank_zero() -> bool:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not initialized or torch.distributed.get_rank() == 0
