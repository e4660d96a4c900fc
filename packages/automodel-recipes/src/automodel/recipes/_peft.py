"""LoRA adapters through automodel.core.peft (saved in the Hugging Face peft format)."""

from __future__ import annotations

from typing import Any

from automodel.recipes.config import PeftSection


def apply_lora(model: Any, cfg: PeftSection) -> Any:
    """Returns ``model`` with LoRA adapters on ``cfg.target_modules``; only adapters train."""
    from automodel.core.peft import LoraConfig, apply_peft

    config = LoraConfig(
        rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )
    return apply_peft(model, config)
