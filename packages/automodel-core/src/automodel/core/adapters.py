"""``peft=`` in ``from_pretrained`` / ``from_config``: adapters added before parallelize, seeded init.

Adapters must exist before the model is parallelized, so that FSDP2 and tensor parallelism shard
each ``lora_A`` / ``lora_B`` together with its base layer. On the meta-device path
(``from_pretrained(..., parallel=...)``) they are added to the empty model, left out of the
checkpoint read (``checkpoint_tensors``) and initialized once the base weights are loaded
(``init_adapters``).

Initialization is drawn from one seed (``draw_seed`` as the call starts, then ``shared_seed``): a
draw from the global RNG, rank 0's under ``torch.distributed``. So every rank holds slices of the same adapters whatever the ranks' RNG
states, and ``torch.manual_seed(s)`` before ``from_pretrained`` gives the same adapters in a single
process and on any mesh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER_KEY_MARK = ".lora_"  # lora_A, lora_B, lora_magnitude_vector: never in a base checkpoint


def add_adapters(model: nn.Module, peft: Any, *, parallel: bool) -> nn.Module:
    """Returns ``model`` with the LoRA / DoRA adapters of ``peft`` added and the base frozen.

    Adapters of a model on the meta device stay empty until ``init_adapters`` runs after loading.

    Args:
        model: a model not yet parallelized (possibly on the meta device).
        peft: a ``LoraConfig``, a dict of its fields, or a peft ``LoraConfig`` / its dict.
        parallel: whether the model is parallelized next (FSDP2 / TP).

    Raises:
        ValueError: QLoRA (``quantize_base``) on a model parallelized next: 4-bit base weights
            cannot be sharded by FSDP2 / TP.
    """
    from automodel.core.peft import apply_peft
    from automodel.core.peft.config import as_lora_config

    config = as_lora_config(peft)
    if config.quantize_base is not None and parallel:
        raise ValueError(
            f"peft quantize_base={config.quantize_base!r} (QLoRA) cannot be combined with "
            "parallel= / device_mesh=: 4-bit base weights are quantized after loading and cannot "
            "be sharded; load on one GPU (no parallel=) for QLoRA, or drop quantize_base"
        )
    return apply_peft(model, config)


def init_adapters(model: nn.Module, seed: int) -> nn.Module:
    """Returns ``model`` with every adapter initialized from ``seed`` (A Kaiming-uniform, B zeros).

    Each rank draws the full-shape values from the same ``torch.Generator`` and keeps its slice,
    so sharded adapters equal the single-process ones initialized from the same seed.
    """
    from automodel.core.peft import reset_adapters

    return reset_adapters(model, seed=seed)


def draw_seed() -> int:
    """Returns a seed drawn from the global torch RNG (call it before anything else draws)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def shared_seed(seed: int) -> int:
    """Returns rank 0's ``seed`` on every rank under ``torch.distributed``, else ``seed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the model's state-dict tensors (parameters as themselves) minus the adapters'.

    What a base checkpoint holds: load these from it, then ``init_adapters``.
    """
    return {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if torch.is_tensor(tensor) and ADAPTER_KEY_MARK not in name
    }


def has_adapters(model: nn.Module) -> bool:
    """Returns whether ``model`` carries LoRA / DoRA adapters."""
    from automodel.core.peft import adapter_modules

    return bool(adapter_modules(model))
