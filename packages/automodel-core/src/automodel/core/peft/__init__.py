"""LoRA / DoRA / QLoRA adapters for any transformers model, compatible with Hugging Face peft.

No dependency on the peft library: adapters are computed here, bit-compatible with peft in fp32,
and saved / loaded in peft's file format (``adapter_model.safetensors`` + ``adapter_config.json``).

    from automodel.core.peft import LoraConfig, apply_peft, save_adapter

    model = apply_peft(model, LoraConfig(rank=16, alpha=32, target_modules="all-linear"))
    ...  # train: only adapter parameters require grad; FSDP2 / TP after apply_peft
    save_adapter(model, "out/adapter")  # peft.PeftModel.from_pretrained(base, "out/adapter") loads it
"""

from automodel.core.peft.apply import (
    adapter_modules,
    adapter_parameters,
    apply_peft,
    expert_adapters,
    merge_adapters,
    reset_adapters,
    unmerge_adapters,
)
from automodel.core.peft.config import LoraConfig
from automodel.core.peft.experts import ExpertsLora
from automodel.core.peft.hf_format import load_adapter, save_adapter, save_pretrained_adapter
from automodel.core.peft.lora_linear import LoraLinear, adapter_placements
from automodel.core.peft.targets import find_target_experts, find_target_modules

__all__ = [
    "ExpertsLora",
    "LoraConfig",
    "LoraLinear",
    "adapter_modules",
    "adapter_parameters",
    "adapter_placements",
    "apply_peft",
    "expert_adapters",
    "find_target_experts",
    "find_target_modules",
    "load_adapter",
    "merge_adapters",
    "reset_adapters",
    "save_adapter",
    "save_pretrained_adapter",
    "unmerge_adapters",
]
