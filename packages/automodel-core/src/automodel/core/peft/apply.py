"""Adding adapters to a model (``apply_peft``) and folding them in and out (``merge_adapters``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from automodel.core.peft.config import LoraConfig, as_lora_config
from automodel.core.peft.experts import ExpertsLora, attach_experts_lora, merge_experts_lora
from automodel.core.peft.lora_linear import ADAPTER_PARAMS, LoraLinear
from automodel.core.peft.targets import find_target_experts, find_target_modules

ModelT = TypeVar("ModelT", bound=nn.Module)


def apply_peft(model: ModelT, config: LoraConfig | Mapping[str, Any]) -> ModelT:
    """Returns ``model`` with LoRA adapters on the targeted linears and everything else frozen.

    The model is changed in place: each targeted ``nn.Linear`` is replaced by a ``LoraLinear``
    that shares its weight and bias, each targeted fused MoE experts module gets per-expert
    factors (``ExpertsLora``, run by its grouped forward; see ``find_target_experts``), every base
    parameter gets ``requires_grad=False`` and only the adapter tensors train. Call it *before* FSDP2 / tensor parallelism (``parallelize``,
    ``fully_shard``): the adapters are then sharded along with their base layers.

    Args:
        model: any ``nn.Module`` (a transformers ``PreTrainedModel`` typically).
        config: a ``LoraConfig``, a dict of its fields, or a peft ``LoraConfig`` / its dict.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: nothing matches, a match is not a plain ``nn.Linear``, the model already has
            adapters, or it is already sharded.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")  # doctest: +SKIP
        >>> model = apply_peft(model, LoraConfig(rank=16, alpha=32, target_modules="all-linear"))
    """
    config = as_lora_config(config)
    if adapter_modules(model) or expert_adapters(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters; automodel keeps one adapter per "
            "model: merge_adapters(model, unload=True) first to stack a new one on the merged weights"
        )
    names = find_target_modules(model, config)
    experts = find_target_experts(model, config)
    modules = dict(model.named_modules())
    if experts and (config.use_dora or config.dropout > 0 or config.quantize_base is not None):
        raise ValueError(
            f"LoRA on MoE experts ({next(iter(experts))!r}, ...) supports neither DoRA, dropout "
            f"nor a quantized base (got use_dora={config.use_dora}, dropout={config.dropout}, "
            f"quantize_base={config.quantize_base!r}), like peft's parameter adapters: set them "
            "off or exclude the experts (exclude_modules=[...'experts'])"
        )
    for name in experts:
        _refuse_sharded_experts(name, modules[name])
    for name in names:
        base = modules[name]
        _refuse_sharded(name, base)
        if type(base) is not nn.Linear:
            raise ValueError(
                f"{name!r} is a {type(base).__name__}, not a plain torch.nn.Linear: automodel "
                "cannot wrap it; add it to exclude_modules"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        base = modules[name]
        assert isinstance(base, nn.Linear)
        lora = LoraLinear(
            base,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            init=config.init,
        )
        _set_submodule(model, name, lora)
    for name, projections in experts.items():
        attach_experts_lora(
            name,
            modules[name],
            projections,
            rank=config.rank,
            alpha=config.alpha,
            use_rslora=config.use_rslora,
            init=config.init,
        )
    if config.quantize_base is not None:
        from automodel.core.peft.qlora import quantize_nf4

        for lora in adapter_modules(model).values():
            quantize_nf4(lora)
    model._automodel_lora_config = config  # type: ignore[assignment]  # read by save_adapter
    return model


def reset_adapters(model: ModelT, *, seed: int | None = None) -> ModelT:
    """Returns ``model`` with every adapter initialized again, as ``apply_peft`` initializes them.

    For models built on the meta device: ``apply_peft`` (before ``parallelize``) leaves the adapters
    empty, and once the base weights are materialized and loaded this gives them their initial
    values (the DoRA magnitude is computed from the loaded weights). Works on FSDP2 / TP sharded
    models: values are drawn at full shape and each rank keeps its slice.

    Args:
        model: a model with adapters.
        seed: draw from ``torch.Generator().manual_seed(seed)``: equal adapters on every rank,
            whatever the ranks' RNG states. None uses the global RNG.

    Returns:
        The same ``model`` object.

    Example:
        >>> model = apply_peft(meta_model, LoraConfig(rank=8))        # doctest: +SKIP
        >>> model = parallelize(model, config, mesh)                  # doctest: +SKIP
        >>> model.to_empty(device="cuda"); load_base_weights(model)   # doctest: +SKIP
        >>> reset_adapters(model, seed=0)                             # doctest: +SKIP
    """
    modules = adapter_modules(model)
    experts = expert_adapters(model)
    if not modules and not experts:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; apply_peft first")
    config: LoraConfig | None = getattr(model, "_automodel_lora_config", None)
    init = config.init if config is not None else "default"
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    reshard_fsdp(model)
    for lora in modules.values():
        lora.reset_adapter_parameters(init, generator=generator)
    for expert_lora in experts.values():
        expert_lora.reset_adapter_parameters(init, generator=generator)
    return model


def adapter_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Returns ``{qualified name: LoraLinear}`` for every adapted layer of ``model``, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def expert_adapters(model: nn.Module) -> dict[str, ExpertsLora]:
    """Returns ``{experts module FQN: ExpertsLora}`` for every adapted MoE experts module."""
    return {
        name[: -len(".lora")] if name.endswith(".lora") else name: m
        for name, m in model.named_modules()
        if isinstance(m, ExpertsLora)
    }


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Returns ``{qualified name: parameter}`` of the adapter tensors only (what an optimizer needs)."""
    params = {
        f"{name}.{p}": getattr(m, p)
        for name, m in adapter_modules(model).items()
        for p in ADAPTER_PARAMS
        if p in m._parameters
    }
    for name, lora in expert_adapters(model).items():
        params.update({f"{name}.lora.{p}": param for p, param in lora.named_parameters()})
    return params


def merge_adapters(model: ModelT, *, unload: bool = False) -> ModelT:
    """Returns ``model`` with every adapter folded into its base weight (forward = plain linears).

    Args:
        model: a model with adapters from ``apply_peft`` / ``load_adapter``.
        unload: also swap each ``LoraLinear`` back to a plain ``nn.Linear`` holding the merged
            weight, dropping the adapter: the model is then a standard model again
            (``save_pretrained`` writes ordinary weights, e.g. for vLLM without LoRA).

    Returns:
        The same ``model`` object.

    Example:
        >>> merge_adapters(model)                 # doctest: +SKIP
        >>> unmerge_adapters(model)               # back to training the adapter  # doctest: +SKIP
    """
    modules = adapter_modules(model)
    experts = expert_adapters(model)
    if not modules and not experts:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge; apply_peft first")
    reshard_fsdp(model)
    for name, lora in modules.items():
        lora.merge()
        if unload:
            _set_submodule(model, name, lora.to_linear())
    for name in experts:
        experts_module = model.get_submodule(name)
        merge_experts_lora(experts_module, merge=True)
        if unload:
            del experts_module.lora
    if unload and hasattr(model, "_automodel_lora_config"):
        del model._automodel_lora_config
    return model


def unmerge_adapters(model: ModelT) -> ModelT:
    """Returns ``model`` with merged adapters subtracted from the base weights again.

    Example:
        >>> unmerge_adapters(merge_adapters(model))  # same outputs, adapter trainable again  # doctest: +SKIP
    """
    modules = adapter_modules(model)
    experts = expert_adapters(model)
    if not modules and not experts:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to unmerge")
    reshard_fsdp(model)
    for lora in modules.values():
        lora.unmerge()
    for name in experts:
        merge_experts_lora(model.get_submodule(name), merge=False)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _refuse_sharded_experts(name: str, module: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if (
        isinstance(getattr(module, "gate_up_proj", None), DTensor)
        or "FSDP" in type(module).__name__
    ):
        raise ValueError(
            f"{name!r} is already sharded (DTensor / FSDP / expert parallel): call apply_peft "
            "before parallelize / fully_shard so the adapters are sharded with their experts"
        )


def _refuse_sharded(name: str, module: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if isinstance(module.weight, DTensor) or "FSDP" in type(module).__name__:
        raise ValueError(
            f"{name!r} is already sharded (DTensor / FSDP): call apply_peft before parallelize / "
            "fully_shard so the adapters are sharded together with their base layers"
        )


def reshard_fsdp(model: nn.Module) -> None:
    """Puts FSDP2 modules back in their sharded state, so in-place writes reach the real shards.

    After a forward without backward (evaluation), FSDP2 may keep gathered copies registered;
    writing into those would be lost at the next all-gather.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
