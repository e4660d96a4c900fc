"""Typed recipe configs: sections, `_target_` components, loading with overrides and interpolation."""

from automodel.recipes.config._component import Component, import_target
from automodel.recipes.config._load import ConfigError, apply_overrides, interpolate, load_config
from automodel.recipes.config._sections import (
    BenchmarkSection,
    CheckpointSection,
    DataSection,
    DataSource,
    DistillSection,
    Fp8Section,
    LoggingSection,
    LRSchedulerSection,
    ModelSection,
    MoESection,
    OptimizerSection,
    ParallelSection,
    PeftSection,
    RecipeConfig,
    TokenizerSection,
    TrainingSection,
)

__all__ = [
    "BenchmarkSection",
    "CheckpointSection",
    "Component",
    "ConfigError",
    "DataSection",
    "DataSource",
    "DistillSection",
    "Fp8Section",
    "LRSchedulerSection",
    "LoggingSection",
    "MoESection",
    "ModelSection",
    "OptimizerSection",
    "ParallelSection",
    "PeftSection",
    "RecipeConfig",
    "TokenizerSection",
    "TrainingSection",
    "apply_overrides",
    "import_target",
    "interpolate",
    "load_config",
]
