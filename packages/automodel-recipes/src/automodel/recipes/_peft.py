"""LoRA adapters: automodel.core.peft when it exists, else the `peft` library."""

from __future__ import annotations

from typing import Any

from automodel.recipes.config import PeftSection


def apply_lora(model: Any, cfg: PeftSection) -> Any:
    """Returns ``model`` with LoRA adapters on ``cfg.target_modules``; only adapters train.

    Raises:
        ValueError: neither automodel.core.peft nor peft is installed.
    """
    try:
        from automodel.core import peft as core_peft  # type: ignore[attr-defined]

        config = core_peft.LoraConfig(
            r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules
        )
        return core_peft.apply_peft(model, config)
    except (ImportError, AttributeError, TypeError):
        pass
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("the peft section needs LoRA support: `pip install peft`") from None
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)
