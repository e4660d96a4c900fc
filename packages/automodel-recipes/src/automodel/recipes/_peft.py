"""LoRA adapters through automodel.core.peft (saved in the Hugging Face peft format)."""

from __future__ import annotations

from typing import Any

from automodel.recipes.config import PeftSection


def apply_lora(model: Any, cfg: PeftSection, world_size: int = 1) -> Any:
    """Returns ``model`` with LoRA adapters on ``cfg.target_modules``; only adapters train.

    With ``quantize_base: nf4`` (QLoRA) the adapted base weights become 4-bit (automodel.core).

    Raises:
        ValueError: QLoRA on several processes (4-bit weights cannot be sharded by FSDP).
    """
    if cfg.quantize_base is not None and world_size > 1:
        raise ValueError(
            f"peft.quantize_base={cfg.quantize_base} (QLoRA) runs on one GPU, this run has "
            f"{world_size} processes; launch with --nproc-per-node 1, or drop quantize_base"
        )
    from automodel.core.peft import LoraConfig, apply_peft

    config = LoraConfig(
        rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        quantize_base=cfg.quantize_base,
    )  # fmt: skip
    return apply_peft(model, config)
