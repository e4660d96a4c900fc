"""The recipes the CLI knows: name -> module with ``run(cfg)``, the shortcut that runs it, a summary."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RecipeInfo:
    """One recipe: its config name, module, CLI shortcut (if any) and a one-line summary."""

    name: str
    module: str
    shortcut: str | None
    summary: str

    def runner(self) -> Callable[[Any], Path]:
        """Returns the recipe's ``run(cfg)`` function."""
        return importlib.import_module(self.module).run  # type: ignore[no-any-return]


RECIPES: dict[str, RecipeInfo] = {
    r.name: r
    for r in [
        RecipeInfo(
            "sft", "automodel.recipes.sft", "finetune", "LLM supervised fine-tuning, full or LoRA"
        ),
        RecipeInfo(
            "pretrain",
            "automodel.recipes.pretrain",
            "pretrain",
            "pretraining from scratch or continued, packed text",
        ),
        RecipeInfo(
            "distill",
            "automodel.recipes.distill",
            "distill",
            "knowledge distillation: teacher -> student, KL + CE",
        ),
        RecipeInfo(
            "vlm_sft",
            "automodel.recipes.vlm_sft",
            None,
            "vision-language SFT on image + text chats",
        ),
        RecipeInfo(
            "classification", "automodel.recipes.classification", None, "sequence classification"
        ),
        RecipeInfo(
            "benchmark",
            "automodel.recipes.benchmark",
            "benchmark",
            "synthetic-token speed: tokens/s, TFLOP/s, MFU, memory",
        ),
    ]
}


def recipe_for_shortcut(shortcut: str) -> RecipeInfo:
    """Returns the recipe run by a CLI shortcut such as ``finetune``."""
    return next(r for r in RECIPES.values() if r.shortcut == shortcut)
