"""automodel.core — Hugging Face-compatible AutoModel classes with optimized implementations.

from automodel.core import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B", dtype="bfloat16")
"""

from automodel.core.auto import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
)
from automodel.core.flops import flops_per_token, matmul_params_per_token
from automodel.core.models.registry import optimized_model_types
from automodel.core.patching import PatchReport, patch_model
from automodel.core.peft import LoraConfig

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForSequenceClassification",
    "LoraConfig",
    "PatchReport",
    "__version__",
    "flops_per_token",
    "matmul_params_per_token",
    "optimized_model_types",
    "patch_model",
]


def __getattr__(name: str) -> type:
    """Returns an automodel Auto class for any other transformers ``AutoModelFor*`` name."""
    from automodel.core import auto

    return auto.__getattr__(name)
