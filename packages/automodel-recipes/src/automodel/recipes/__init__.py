"""automodel.recipes — the `automodel` CLI, typed YAML recipes, data pipeline and training loop.

from automodel.recipes import load_config, run_recipe

cfg = load_config("examples/llama3_2_1b_sft.yaml", ["training.max_steps=10"])
output_folder = run_recipe(cfg)   # same as `automodel run CONFIG training.max_steps=10`
"""

from __future__ import annotations

from pathlib import Path

from automodel.recipes._bundled import BUNDLED_DIR, default_config
from automodel.recipes.config import ConfigError, RecipeConfig, load_config

__version__ = "0.1.0"


def run_recipe(cfg: RecipeConfig) -> Path:
    """Returns the output folder after running the recipe ``cfg.recipe`` in this process.

    Under torchrun every rank calls it; without torchrun it runs on one process (CPU or GPU).

    Example:
        >>> run_recipe(load_config(default_config("finetune"), ["training.max_steps=5"]))
    """
    from automodel.recipes._registry import RECIPES

    return RECIPES[cfg.recipe].runner()(cfg)


__all__ = [
    "BUNDLED_DIR",
    "ConfigError",
    "RecipeConfig",
    "__version__",
    "default_config",
    "load_config",
    "run_recipe",
]
