"""Supervised fine-tuning (full or LoRA) of a causal LM on chat or instruction data.

    automodel finetune                                   # bundled tiny default, CPU or GPU
    automodel run examples/llama3_2_1b_sft.yaml training.max_steps=200
    automodel run examples/qwen3_8b_lora.yaml --nproc-per-node 8

Loss: cross-entropy on assistant tokens only (masks from the chat template), divided by the
number of such tokens in the global batch. The run ends with ``output_dir/model`` (or
``output_dir/adapter`` with a ``peft`` section) and prints its path last.
"""

from __future__ import annotations

from pathlib import Path

from automodel.recipes._lm_training import run_causal_lm
from automodel.recipes.config import ConfigError, RecipeConfig


def run(cfg: RecipeConfig) -> Path:
    """Runs SFT per ``cfg``; returns the saved model (or adapter) folder."""
    if cfg.data.format not in ("chat", "instruction") and cfg.data.dataset is None:
        raise ConfigError(
            f"data.format={cfg.data.format!r}: SFT reads 'chat' or 'instruction' data"
        )
    return run_causal_lm(cfg)
